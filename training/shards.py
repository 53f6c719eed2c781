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
    """Random access to every sample of a built dataset: `read(i)` -> {ext: bytes}."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.folder} has no {INDEX}; build it with `python -m training build`.")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: unknown dataset format {self.index.get('format')!r} "
                             f"(this version reads {FORMAT})")
        self.entries: list[tuple[str, str, dict]] = []  # (tar name, key, {ext: [offset, size]})
        for shard in self.index["shards"]:
            meta = json.loads((self.folder / f"{shard['name']}.json").read_text())
            for key in sorted(meta["samples"]):
                self.entries.append((meta["tar"], key, meta["samples"][key]))
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, i: int) -> dict[str, bytes]:
        tar, key, members = self.entries[i]
        f = self._files.get(tar)
        if f is None:
            f = self._files[tar] = open(self.folder / tar, "rb")
        out = {"__key__": key.encode()}
        for ext, (offset, size) in members.items():
            f.seek(offset)
            out[ext] = f.read(size)
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
