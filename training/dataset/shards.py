"""Dataset shards: tar files in the WebDataset layout plus a JSON index.

A sample is the group of tar members sharing a key (`000042.jpg`, `000042.json`, ...), so
the shards stream with `webdataset`/`tar` tools too. Beside every shard a small JSON
lists each member's byte offset: a rank on any node reads exactly its own samples by
seek + read, without scanning or downloading whole shards, which is what exact resume
and DDP sharding need (any sample, any order, no per-worker state).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Mapping

from portraitbooth_core.paths import check_file_name, check_text, inside

from .index_file import FORMAT, INDEX, INDEX_NAMES, MAX_INDEX_BYTES, MAX_SHARDS, check_index, read_index  # noqa: F401
from .shard_index import open_compact
from .storage import MAX_OPEN_FILES, DatasetLocation, DatasetNotFoundError, RangeReader, missing_dataset_message

def write_json_atomic(path: Path, data) -> None:
    """Temp file, fsync, rename: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Collects samples and writes them as one shard (tar + offsets JSON) on `close`."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = Path(folder), name
        self.tmp = self.folder / f".{name}.tar.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.keys: list[str] = []

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: byte-identical rebuilds
            self.tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)

    def close(self) -> dict:
        """Finish the shard atomically; returns its index entry."""
        self.tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        offsets: dict[str, dict[str, list[int]]] = {}
        with tarfile.open(self.tmp, "r") as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                offsets.setdefault(key, {})[ext] = [m.offset_data, m.size]
        tar_name = f"{self.name}.tar"
        write_json_atomic(self.folder / f"{self.name}.json", {"tar": tar_name, "samples": offsets})
        os.replace(self.tmp, self.folder / tar_name)
        return {"name": self.name, "tar": tar_name, "count": len(self.keys)}

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def check_dataset(folder: str | os.PathLike) -> DatasetLocation:
    """The dataset at `folder`, checked to have an index.json (nothing else is read), or
    DatasetNotFoundError saying why it is no dataset and how to make one."""
    if not os.fspath(folder).strip():  # Path("") would be the current folder
        raise DatasetNotFoundError("no dataset given (the dataset setting is empty); give the folder "
                                   "`python -m training build` wrote, or build the dataset with it.")
    location = DatasetLocation(folder)
    if not location.exists(INDEX):
        raise DatasetNotFoundError(missing_dataset_message(location))
    return location


class ShardReader:
    """Random access to every sample of a built dataset: `read(i)` -> {ext: bytes}.

    `folder` is a local path (a shared filesystem mount too) or an fsspec URL (storage.py).
    The sample index is the memory-mapped compact index (shard_index.py), made from the
    JSON index on first use, so a process's memory does not grow with the dataset; at most
    `max_open` shard files are open at once (least recently used closed first).

    index.json and the shard JSONs may come from anyone (a dataset uploaded to a shared
    server): every name in them is resolved inside the dataset folder (portraitbooth_core.paths),
    and a malformed field is an error naming the file and the field."""

    def __init__(self, folder: str | os.PathLike, max_open: int = MAX_OPEN_FILES,
                 index_cache: str | os.PathLike | None = None):
        """index_cache: where the compact index is kept (a folder of the caller's, e.g. the
        node's in ComfyUI's temp folder); the dataset folder is then never written. None:
        beside the dataset when it is writable (the command line: the user's own folder),
        else storage.cache_root()."""
        self.location = check_dataset(folder)
        self.folder = self.location.root
        self.index, raw = read_index(self.location)
        self.compact = open_compact(self.location, self.index, raw, index_cache)
        self.files = RangeReader(self.location, max_open)
        self._targets: dict[str, str | Path] = {}  # read_range's resolved names

    def __len__(self) -> int:
        return len(self.compact)

    def read(self, i: int) -> dict[str, bytes]:
        shard, key, members = self.compact.entry(i)
        tar = self.compact.tars[shard]
        out = {"__key__": key.encode()}
        if not members:
            return out
        # A sample's members lie next to each other in its tar (512-byte headers between):
        # one read for all of them (one request on an object store) when that holds.
        lo = min(o for o, _ in members.values())
        hi = max(o + s for o, s in members.values())
        if hi - lo <= sum(s for _, s in members.values()) + 1024 * len(members):
            span = self.files.read(tar, lo, hi - lo)
            for ext, (offset, size) in members.items():
                out[ext] = span[offset - lo:offset - lo + size]
        else:
            for ext, (offset, size) in members.items():
                out[ext] = self.files.read(tar, offset, size)
        return out

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        """Bytes of another file of the dataset (e.g. a precomputed side file, whose name holds
        a shard name from index.json), through the same bounded set of open files. `name` is
        resolved inside the dataset folder first: '..', an absolute name or a symlink leading
        out is refused (PathNotAllowedError), whether or not its target exists."""
        target = self._targets.get(name)
        if target is None:
            target = self._targets[name] = self.location.resolve(name, self.location.describe(name))
        return self.files.read(target, offset, size)

    def close(self) -> None:
        self.files.close()


RECOGNIZER_DIRS_ENV = "PORTRAITBOOTH_RECOGNIZER_DIRS"  # more folders holding packs, for the command line


def default_recognizer_roots() -> list[Path]:
    """Where the command line looks for a dataset's recognizer: the folders in
    PORTRAITBOOTH_RECOGNIZER_DIRS (os.pathsep-separated), then the ComfyUI host's
    models/insightface/models when one is found."""
    roots = [Path(p) for p in os.environ.get(RECOGNIZER_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    try:
        from headless.comfyui import find_comfyui

        roots.append(find_comfyui() / "models" / "insightface" / "models")
    except Exception:  # noqa: BLE001 - no ComfyUI host: only the listed folders
        pass
    return roots


def recorded_recognizer(face: dict, roots=None) -> Path | None:
    """The recognizer ONNX a dataset was built with, found by its pack folder and file name
    under `roots` (folders holding packs, e.g. models/insightface/models). From a node
    (roots given) an absolute path in the file is never opened: an older index.json's
    `recognizer_path` is reduced to its pack and file name. Without roots (the command line,
    whose user built the dataset) an older absolute path is still read, and new records are
    looked up under default_recognizer_roots(). None when the dataset names none or it is
    not found."""
    rec = face.get("recognizer")
    old = face.get("recognizer_path")
    if isinstance(rec, dict):
        pack, file = rec.get("pack"), rec.get("file")
    elif isinstance(old, str) and old.strip():
        check_text(old, f"{INDEX} face_encoder.recognizer_path")
        if roots is None:
            return Path(old)
        legacy = Path(old.replace("\\", "/"))
        pack, file = legacy.parent.name, legacy.name
    else:
        return None
    check_file_name(str(pack), f"{INDEX} face_encoder.recognizer.pack")
    what = f"{INDEX} face_encoder.recognizer.file"
    for root in (default_recognizer_roots() if roots is None else roots):
        if (Path(root) / pack).is_dir():
            candidate = inside(Path(root) / pack, str(file), what)
            if candidate.is_file():
                return candidate
    return None
