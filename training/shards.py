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

INDEX = "index.json"
FORMAT = "portraitbooth-shards/1"


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


class ShardReader:
    """Random access to every sample of a built dataset: `read(i)` -> {ext: bytes}.

    index.json and the shard JSONs may come from anyone (a dataset uploaded to a shared
    server): every name in them is resolved inside the dataset folder (portraitbooth_core.paths),
    and a malformed field is an error naming the file and the field."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.folder} has no {INDEX}; build it with `python -m training build`.")
        self.index = _read_json(index_path)
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT:
            found = self.index.get("format") if isinstance(self.index, dict) else type(self.index).__name__
            raise ValueError(f"{index_path}: unknown dataset format {found!r} (this version reads {FORMAT})")
        shards = self.index.get("shards")
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise ValueError(f"{index_path}: 'shards' must be a list of shard entries; rebuild the dataset.")
        self.entries: list[tuple[Path, str, dict]] = []  # (tar path, key, {ext: [offset, size]})
        for n, shard in enumerate(shards):
            meta_path = inside(self.folder, f"{shard.get('name')}.json", f"{index_path} shards[{n}].name")
            meta = _read_json(meta_path)
            samples = meta.get("samples") if isinstance(meta, dict) else None
            if not isinstance(samples, dict):
                raise ValueError(f"{meta_path}: 'samples' must map sample keys to members; rebuild the dataset.")
            tar = inside(self.folder, meta.get("tar"), f"{meta_path} field 'tar'")
            for key in sorted(samples):
                self.entries.append((tar, key, _members(samples[key], meta_path, key)))
        self._files: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, i: int) -> dict[str, bytes]:
        tar, key, members = self.entries[i]
        f = self._files.get(tar)
        if f is None:
            f = self._files[tar] = open(tar, "rb")
        out = {"__key__": key.encode()}
        for ext, (offset, size) in members.items():
            f.seek(offset)
            out[ext] = f.read(size)
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable as JSON ({type(exc).__name__}: {str(exc)[:200]}); "
                         f"rebuild the dataset.") from None


def _members(members, meta_path: Path, key: str) -> dict:
    ok = isinstance(members, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and 0 <= x < 2**40 for x in v)
        for v in members.values())
    if not ok:
        raise ValueError(f"{meta_path}: sample {key[:40]!r} must map members to [offset, size]; rebuild the dataset.")
    return members


RECOGNIZER_DIRS_ENV = "PORTRAITBOOTH_RECOGNIZER_DIRS"  # more folders holding packs, for the command line


def default_recognizer_roots() -> list[Path]:
    """Where the command line looks for a dataset's recognizer: the folders in
    PORTRAITBOOTH_RECOGNIZER_DIRS (os.pathsep-separated), then the ComfyUI host's
    models/insightface/models when one is found."""
    roots = [Path(p) for p in os.environ.get(RECOGNIZER_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    try:
        from .comfy_env import find_comfyui

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
