"""The compact sample index: sample -> (shard, key, member byte ranges) as one numpy array
on disk, opened memory-mapped.

index.json plus one JSON per shard is what the builder writes and what tools read; held as
Python dicts it costs ~0.9 GiB per million samples in every rank. This file packs the
same facts into fixed-width rows (~90 bytes a sample) that every rank and loader worker
maps from the page cache, so a process's own memory does not grow with the dataset.

It is created from the JSON files (atomically) the first time a dataset is opened, and
recreated when index.json or a shard JSON changes (their content hash and, locally, their
size and mtime form its fingerprint). Where it is kept: from the DIP Trainer node, in a
cache folder of the node's (ComfyUI's temp folder), so that nothing is written into a
dataset someone uploaded to input/; from the command line, beside the dataset when the
folder is writable (the user's own folder; another machine's trainer reuses it), else in
storage.cache_root(). A compact index found beside a dataset is used only when its
fingerprint matches and its shard list is index.json's (one that claims the fingerprint
but lists other shards is refused); one in a cache is checked the same way and made again
when it does not match. Every name in it is checked again on open, like the JSON's.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from portraitbooth_core.bounded_json import load_json_bytes
from portraitbooth_core.paths import BadInputError, PathNotAllowedError, check_file_name

from .names import FILE, NAME, NameField, check_names, name_fields
from .storage import DatasetFileError, DatasetLocation, cache_folder, write_bytes_atomic

log = logging.getLogger("portraitbooth.training")

COMPACT_META = "index.compact.json"
COMPACT_ARRAY = "index.compact.npy"
COMPACT_FORMAT = "portraitbooth-compact-index/1"
INDEX = "index.json"

# ~150 bytes a shard; a shard JSON ~250 bytes a sample (the builder writes 1000 a shard).
MAX_COMPACT_META_BYTES = 32 << 20
MAX_SHARD_JSON_BYTES = 64 << 20

# Every field of a shard JSON and of the compact index's meta that names a file or a sample
# (names.py). A shard's name is opened as its JSON and its precomputed side file.
_SHARD = ("{}.json", "precomputed/{}.safetensors")
SHARD_NAMES = name_fields("<shard>.json", NameField("tar", FILE), NameField("samples{}", NAME))
COMPACT_NAMES = name_fields(COMPACT_META, NameField("shards[].name", FILE, _SHARD), NameField("shards[].json", FILE),
                            NameField("shards[].tar", FILE), NameField("array", FILE))


class CompactIndexError(DatasetFileError):
    """A compact index that claims to be made from this index.json but does not match it."""


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
            raise CompactIndexError(f"{self.array_path}: {array.shape[0] if array.ndim else 0} rows, but its "
                                    f"{COMPACT_META} shards count {int(self.starts[-1])} samples; it is damaged: "
                                    f"delete both (they are made again from {INDEX}).")

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            array = np.load(self.array_path, mmap_mode="r", allow_pickle=False)
            fields = array.dtype.fields or {}
            width = (len(self.exts),)
            ok = tuple(fields) == ("key", "offset", "size") and fields["key"][0].kind == "S" and \
                array.ndim == 1 and all(fields[f][0].shape == width and fields[f][0].base == np.dtype("<i8")
                                        for f in ("offset", "size"))
            if not ok:
                raise CompactIndexError(f"{self.array_path}: not a compact index of this layout; delete it (it is "
                                        f"recreated from the JSON index).")
            self._array = array
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
    index.json (one request per shard at every start would cost more than it saves).
    A missing shard JSON stops here, at the first one (no index could be made)."""
    h = hashlib.sha256(COMPACT_FORMAT.encode() + b"\0" + index_bytes)
    if not location.remote:
        for n, shard in enumerate(index["shards"]):
            what = f"{location.describe(INDEX)} shards[{n}].name"
            target = location.resolve(f"{shard.get('name')}.json", what)
            try:
                size, mtime = location.stat(target)
            except OSError as exc:
                raise DatasetFileError(f"{what}: its shard file {shard.get('name')}.json could not be read "
                                       f"({exc.strerror or type(exc).__name__}); rebuild (or re-copy) the "
                                       f"dataset.") from None
            h.update(f"\0{shard.get('name')}\0{size}\0{mtime}".encode())
    return h.hexdigest()[:32]


def _members(members, shown: str, key: str) -> dict:
    ok = isinstance(members, dict) and all(
        isinstance(e, str) and isinstance(v, list) and len(v) == 2 and
        all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**40 for x in v)
        for e, v in members.items())
    if not ok:
        raise DatasetFileError(f"{shown} samples[{key[:40]!r}]: must map members to [offset, size]; "
                               f"rebuild the dataset.")
    return members


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def build_compact(location: DatasetLocation, index: dict, fp: str) -> tuple[dict, np.ndarray]:
    """Read every shard JSON once and pack it (the only time they are all read)."""
    index_shown = location.describe(INDEX)
    chunks, shards, exts = [], [], set()
    for n, shard in enumerate(index["shards"]):
        json_name = f"{shard.get('name')}.json"
        target = location.resolve(json_name, f"{index_shown} shards[{n}].name")
        shown = location.describe(json_name)
        meta = location.read_json(target, shown, MAX_SHARD_JSON_BYTES)
        samples = meta.get("samples") if isinstance(meta, dict) else None
        if not isinstance(samples, dict):
            raise DatasetFileError(f"{shown}: 'samples' must map sample keys to members; rebuild the dataset.")
        tar = meta.get("tar")
        location.resolve(tar, f"{shown} field 'tar'")
        check_names(meta, SHARD_NAMES, shown)
        if "tar" in shard and shard["tar"] != tar:
            raise DatasetFileError(f"{index_shown} shards[{n}].tar: not the tar {shown} names; rebuild the dataset.")
        keys = sorted(samples)
        members = [_members(samples[k], shown, k) for k in keys]
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


def check_meta(meta, index: dict, fp: str, shown: str) -> bool:
    """Whether a compact index's meta may be used for this index.json: False when it was
    made from another one (stale, or not a compact index: made again); CompactIndexError
    when it claims this index.json's fingerprint (anyone can compute it) but its shards,
    counts or names are not index.json's. Nothing is opened."""
    if not isinstance(meta, dict) or meta.get("format") != COMPACT_FORMAT or meta.get("fingerprint") != fp:
        return False
    check_names(meta, COMPACT_NAMES, shown)
    shards, listed = meta.get("shards"), index["shards"]
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards) or len(shards) != len(listed):
        raise CompactIndexError(f"{shown} shards: its shard list is not the one in {INDEX} "
                                f"({len(shards) if isinstance(shards, list) else 'none'} shards, {INDEX} lists "
                                f"{len(listed)}); delete {COMPACT_META} (it is made again from {INDEX}).")
    for n, (mine, theirs) in enumerate(zip(shards, listed)):
        count = _count(mine.get("count"))
        if mine.get("name") != theirs.get("name") or mine.get("json") != f"{theirs.get('name')}.json" or \
                count is None or ("tar" in theirs and theirs["tar"] != mine.get("tar")):
            raise CompactIndexError(f"{shown} shards[{n}]: not {INDEX}'s shards[{n}] (another name, file or tar, or "
                                    f"no sample count); delete {COMPACT_META} (it is made again from {INDEX}).")
    exts = meta.get("exts")
    if not isinstance(exts, list) or len(set(map(str, exts))) != len(exts) or \
            not all(isinstance(e, str) and check_file_name(e, f"{shown} exts") == e for e in exts):
        raise CompactIndexError(f"{shown} exts: not a list of distinct member names; delete {COMPACT_META}.")
    if _count(meta.get("samples")) != sum(int(s["count"]) for s in shards) or meta.get("array") != COMPACT_ARRAY:
        raise CompactIndexError(f"{shown} samples/array: do not match its shards; delete {COMPACT_META}.")
    return True


def _load_local(location: DatasetLocation, folder: Path | None, fp: str, index: dict,
                ours: bool) -> CompactIndex | None:
    """The compact index in `folder` (None: beside the dataset) if it may be used. ours: a
    cache folder of the pack's, where one that does not check out is made again; otherwise
    one that claims this index.json but does not match it is refused with CompactIndexError."""
    if folder is not None:
        meta_path, array_path = folder / COMPACT_META, folder / COMPACT_ARRAY
        if not meta_path.is_file() or not array_path.is_file():
            return None
    else:  # the dataset's own folder: its files resolved inside it (a symlink leading out is refused)
        if not location.exists(COMPACT_META) or not location.exists(COMPACT_ARRAY):
            return None
        meta_path = location.resolve(COMPACT_META, location.describe(COMPACT_META))
        array_path = location.resolve(COMPACT_ARRAY, location.describe(COMPACT_ARRAY))
    shown = str(meta_path)
    try:
        with open(meta_path, "rb") as f:
            meta = load_json_bytes(f.read(MAX_COMPACT_META_BYTES + 1), shown, MAX_COMPACT_META_BYTES)
    except (OSError, BadInputError):
        return None  # damaged or not one of ours: made again
    try:
        if not check_meta(meta, index, fp, shown):
            return None
        return CompactIndex(location, meta, array_path)
    except (BadInputError, PathNotAllowedError) as exc:  # its names or shards are not index.json's
        if not ours:
            raise
        log.warning("%s; making it again", exc)
    except (OSError, ValueError):  # a damaged array (a full disk?): made again
        if not ours:
            raise CompactIndexError(f"{array_path}: damaged; delete it and {COMPACT_META} (they are made again "
                                    f"from {INDEX}).") from None
    return None


def _copy_remote(location: DatasetLocation, cache: Path, fp: str, index: dict) -> CompactIndex | None:
    """A compact index uploaded with a URL dataset: copied to the local cache (a memory map
    needs a local file) when it matches."""
    if not location.exists(COMPACT_META):
        return None
    shown = location.describe(COMPACT_META)
    try:
        meta = location.read_json(location.path(COMPACT_META), shown, MAX_COMPACT_META_BYTES)
    except (OSError, ValueError):
        return None
    if not check_meta(meta, index, fp, shown):
        return None
    write_bytes_atomic(cache / COMPACT_ARRAY, location.read_bytes(location.path(COMPACT_ARRAY)))
    write_bytes_atomic(cache / COMPACT_META, json.dumps(meta, sort_keys=True).encode())
    return _load_local(location, cache, fp, index, ours=False)


def open_compact(location: DatasetLocation, index: dict, index_bytes: bytes,
                 cache_root: str | os.PathLike | None = None) -> CompactIndex:
    """The dataset's compact index: found beside it or in the cache, else made now.

    cache_root given (the DIP Trainer node): it is made and kept only in this dataset's
    folder under cache_root; the dataset folder is read, never written. None (the command
    line): written beside the dataset when that is writable, else under cache_root()."""
    fp = fingerprint(location, index, index_bytes)
    cache = cache_folder(location, cache_root)
    if not location.remote:
        found = _load_local(location, None, fp, index, ours=False)
        if found is not None:
            return found
    found = _load_local(location, cache, fp, index, ours=True)
    if found is not None:
        return found
    if location.remote:
        found = _copy_remote(location, cache, fp, index)
        if found is not None:
            return found
    meta, array = build_compact(location, index, fp)
    places = [cache] if location.remote or cache_root is not None else [Path(location.root), cache]
    for folder in places:
        try:
            write_compact(folder, meta, array)
        except OSError:  # a read-only share: the local cache instead
            continue
        return CompactIndex(location, meta, folder / COMPACT_ARRAY)
    fix = "make that folder writable" if cache_root is not None else \
        "set PORTRAITBOOTH_INDEX_CACHE to a writable folder"
    raise OSError(f"could not write the compact index of {location.text} in {' or '.join(map(str, places))}; {fix}.")


def write_compact_index(folder: str | os.PathLike) -> Path:
    """Write (or refresh) the compact index of a finished local dataset beside it (the
    builder's own output folder); the builder can call this after index.json so that no
    trainer has to make it. Returns the array path."""
    from .index_file import read_index

    location = DatasetLocation(folder)
    index, raw = read_index(location)
    fp = fingerprint(location, index, raw)
    meta, array = build_compact(location, index, fp)
    write_compact(Path(location.root), meta, array)
    return Path(location.root) / COMPACT_ARRAY
