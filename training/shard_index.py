"""The compact sample index: sample -> (shard, key, member byte ranges) as one numpy array
on disk, opened memory-mapped.

index.json plus one JSON per shard is what the builder writes and what tools read; held as
Python dicts it costs ~0.9 GiB per million samples in every rank. This file packs the
same facts into fixed-width rows (~90 bytes a sample) that every rank and loader worker
maps from the page cache, so a process's own memory does not grow with the dataset.

It is created from the JSON files (atomically, beside the dataset when the folder is
writable, else in a local cache) the first time a dataset is opened, and recreated when
index.json or a shard JSON changes (their content hash and, locally, their size and mtime
form its fingerprint). Every name in it is checked again on open, like the JSON's.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from .storage import DatasetLocation, cache_folder, write_bytes_atomic

COMPACT_META = "index.compact.json"
COMPACT_ARRAY = "index.compact.npy"
COMPACT_FORMAT = "portraitbooth-compact-index/1"
INDEX = "index.json"


class CompactIndex:
    """Rows of `array` (fields key, offset[E], size[E]; size -1: the sample lacks that
    member) in global sample order: shards in index order, keys sorted within a shard."""

    def __init__(self, location: DatasetLocation, meta: dict, array_path: Path):
        self.location, self.meta, self.array_path = location, meta, Path(array_path)
        self.exts: list[str] = list(meta["exts"])
        shards = meta["shards"]
        counts = np.array([int(s["count"]) for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.names = [str(s["name"]) for s in shards]
        # Names come from a file anyone may have written: checked again, as the JSON's were.
        self.tars = [location.resolve(s["tar"], f"{location.describe(s['json'])} field 'tar'") for s in shards]
        self._array = None
        array = self.array
        if array.shape != (int(meta["samples"]),) or int(self.starts[-1]) != array.shape[0]:
            raise ValueError(f"{self.array_path}: {array.shape} rows for {meta['samples']} samples; it is "
                             f"damaged: delete it (it is recreated from the JSON index).")

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.array_path, mmap_mode="r", allow_pickle=False)
            names = self._array.dtype.names or ()
            if names != ("key", "offset", "size"):
                raise ValueError(f"{self.array_path}: not a compact index (fields {names}); delete it.")
        return self._array

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None  # a worker maps the file itself; a memmap would pickle as a copy
        return state

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def rows(self, shard: int) -> tuple[int, int]:
        """(first global index, count) of a shard."""
        return int(self.starts[shard]), int(self.starts[shard + 1] - self.starts[shard])

    def entry(self, i: int) -> tuple[int, str, dict[str, tuple[int, int]]]:
        """(shard, key, {ext: (offset, size)}) of sample i."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside the dataset's {len(self)} samples")
        row = self.array[i]
        members = {ext: (int(o), int(s)) for ext, o, s in zip(self.exts, row["offset"], row["size"]) if s >= 0}
        return self.shard_of(i), bytes(row["key"]).decode("utf-8"), members

    def shard_digest(self, shard: int) -> str:
        """A hash of everything the index says about one shard (keys and member ranges): it
        changes whenever that shard is rebuilt with other contents or layout."""
        start, count = self.rows(shard)
        h = hashlib.sha256(json.dumps([self.names[shard], self.exts], sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.array[start:start + count]).tobytes())
        return h.hexdigest()[:32]


def fingerprint(location: DatasetLocation, index: dict, index_bytes: bytes) -> str:
    """What the compact index was made from: index.json's bytes and, for a local folder,
    every shard JSON's size and mtime. A URL dataset is taken as immutable apart from
    index.json (one request per shard at every start would cost more than it saves)."""
    h = hashlib.sha256(COMPACT_FORMAT.encode() + b"\0" + index_bytes)
    if not location.remote:
        for n, shard in enumerate(index["shards"]):
            target = location.resolve(f"{shard.get('name')}.json", f"{location.describe(INDEX)} shards[{n}].name")
            try:
                size, mtime = location.stat(target)
            except OSError:
                size, mtime = -1, -1  # missing: building the index names it
            h.update(f"\0{shard.get('name')}\0{size}\0{mtime}".encode())
    return h.hexdigest()[:32]


def _members(members, shown: str, key: str) -> dict:
    ok = isinstance(members, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and 0 <= x < 2**40 for x in v)
        for v in members.values())
    if not ok:
        raise ValueError(f"{shown}: sample {key[:40]!r} must map members to [offset, size]; rebuild the dataset.")
    return members


def build_compact(location: DatasetLocation, index: dict, fp: str) -> tuple[dict, np.ndarray]:
    """Read every shard JSON once and pack it (the only time they are all read)."""
    index_shown = location.describe(INDEX)
    chunks, shards, exts = [], [], set()
    for n, shard in enumerate(index["shards"]):
        json_name = f"{shard.get('name')}.json"
        target = location.resolve(json_name, f"{index_shown} shards[{n}].name")
        shown = location.describe(json_name)
        meta = location.read_json(target, shown)
        samples = meta.get("samples") if isinstance(meta, dict) else None
        if not isinstance(samples, dict):
            raise ValueError(f"{shown}: 'samples' must map sample keys to members; rebuild the dataset.")
        tar = meta.get("tar")
        location.resolve(tar, f"{shown} field 'tar'")
        keys = sorted(samples)
        members = [_members(samples[k], shown, k) for k in keys]
        for k in keys:
            if not isinstance(k, str) or not k or "\0" in k:
                raise ValueError(f"{shown}: sample key {k!r} is not a plain name; rebuild the dataset.")
        for m in members:
            exts.update(m)
        chunks.append((keys, members))
        shards.append({"name": str(shard.get("name")), "json": json_name, "tar": tar, "count": len(keys)})
    exts_list = sorted(exts)
    total = sum(len(k) for k, _ in chunks)
    width = max([len(k.encode("utf-8")) for keys, _ in chunks for k in keys] or [1])
    dtype = np.dtype([("key", f"S{width}"), ("offset", "<i8", (len(exts_list),)), ("size", "<i8", (len(exts_list),))])
    array = np.zeros(total, dtype=dtype)
    array["size"] = -1
    row = 0
    for keys, members in chunks:
        for key, m in zip(keys, members):
            array["key"][row] = key.encode("utf-8")
            for e, ext in enumerate(exts_list):
                if ext in m:
                    array["offset"][row, e], array["size"][row, e] = m[ext]
            row += 1
    meta = {"format": COMPACT_FORMAT, "fingerprint": fp, "samples": total, "exts": exts_list,
            "shards": shards, "array": COMPACT_ARRAY}
    return meta, array


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_compact(folder: Path, meta: dict, array: np.ndarray) -> None:
    """Array first, then the meta naming it: a reader that finds the meta finds its array."""
    write_bytes_atomic(folder / COMPACT_ARRAY, _npy_bytes(array))
    write_bytes_atomic(folder / COMPACT_META, json.dumps(meta, sort_keys=True).encode())


def _load_local(location: DatasetLocation, folder: Path, fp: str) -> CompactIndex | None:
    meta_path = folder / COMPACT_META
    if not meta_path.is_file() or not (folder / COMPACT_ARRAY).is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # damaged: made again
    if not isinstance(meta, dict) or meta.get("format") != COMPACT_FORMAT or meta.get("fingerprint") != fp:
        return None
    try:
        np.load(folder / COMPACT_ARRAY, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None  # a damaged array (a full disk?): made again
    return CompactIndex(location, meta, folder / COMPACT_ARRAY)


def _copy_remote(location: DatasetLocation, cache: Path, fp: str) -> CompactIndex | None:
    """A compact index uploaded with a URL dataset: copied to the local cache (a memory map
    needs a local file) when it matches."""
    if not location.exists(COMPACT_META):
        return None
    try:
        meta = json.loads(location.read_bytes(location.path(COMPACT_META)))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("fingerprint") != fp or meta.get("format") != COMPACT_FORMAT:
        return None
    write_bytes_atomic(cache / COMPACT_ARRAY, location.read_bytes(location.path(COMPACT_ARRAY)))
    write_bytes_atomic(cache / COMPACT_META, json.dumps(meta, sort_keys=True).encode())
    return _load_local(location, cache, fp)


def open_compact(location: DatasetLocation, index: dict, index_bytes: bytes) -> CompactIndex:
    """The dataset's compact index: found beside it or in the cache, else made now."""
    fp = fingerprint(location, index, index_bytes)
    cache = cache_folder(location)
    places = [cache] if location.remote else [Path(location.root), cache]
    for folder in places:
        found = _load_local(location, folder, fp)
        if found is not None:
            return found
    if location.remote:
        found = _copy_remote(location, cache, fp)
        if found is not None:
            return found
    meta, array = build_compact(location, index, fp)
    for folder in places:
        try:
            write_compact(folder, meta, array)
        except OSError:  # a read-only share: the local cache instead
            continue
        return CompactIndex(location, meta, folder / COMPACT_ARRAY)
    raise OSError(f"could not write the compact index of {location.text} beside it or in {cache}; "
                  f"set PORTRAITBOOTH_INDEX_CACHE to a writable folder.")


def write_compact_index(folder: str | os.PathLike) -> Path:
    """Write (or refresh) the compact index of a finished local dataset; the builder can
    call this after index.json so that no trainer has to make it. Returns the array path."""
    location = DatasetLocation(folder)
    raw = location.read_bytes(location.path(INDEX))
    index = json.loads(raw)
    fp = fingerprint(location, index, raw)
    meta, array = build_compact(location, index, fp)
    write_compact(Path(location.root), meta, array)
    return Path(location.root) / COMPACT_ARRAY
