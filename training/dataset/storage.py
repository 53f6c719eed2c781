"""Where a dataset's files live: a local folder (a shared filesystem mount is one too) or an
fsspec URL (`s3://bucket/data`, `memory://data`, ...), and reading byte ranges from them.

Local reads go through a bounded set of open files (least recently used closed first) with
positional reads (`os.pread`), so a dataset of any number of shards stays under the
open-file limit, and a file handle is never shared by forked loader workers. URL reads are
one ranged request per call (`fs.cat_file`), which object stores serve without a handle.
fsspec is optional: it is imported only for a URL with a protocol.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from portraitbooth_core.bounded_json import load_json_bytes
from portraitbooth_core.paths import BadInputError, _relative_parts, inside

MAX_OPEN_FILES = 64  # per process: ranks x loader workers x this stays far below `ulimit -n`
_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")  # two letters at least: C:// is a drive


class DatasetFileError(BadInputError):
    """A file of a dataset that cannot be used (unreadable, malformed, or naming what it may
    not); the message names the file and the field, and says what to do."""


class DatasetNotFoundError(DatasetFileError, FileNotFoundError):
    """No dataset where one was named: the setting is empty, the folder does not exist, or
    it holds no index.json; the message names the folder and how to make a dataset."""


def missing_dataset_message(location: "DatasetLocation") -> str:
    """Why `location` (which has no index.json) is not a dataset, and the fix."""
    build = "build the dataset with `python -m training build <people folders> <dataset>`"
    if location.remote:
        return f"{location.describe('index.json')} does not exist; {build}, or give the URL of one it wrote."
    root = location.root
    if not root.exists():
        return (f"the dataset folder {root} does not exist; give the folder `python -m training build` wrote, "
                f"or {build}.")
    if not root.is_dir():
        return f"{root} is a file, not a dataset folder; give the folder `python -m training build` wrote."
    return (f"{root} is not a dataset: it has no index.json. Give the folder `python -m training build` wrote, "
            f"or {build}.")


def url_protocol(where: str) -> str | None:
    """'s3' for 's3://bucket/x', None for a local path (or a file:// URL)."""
    m = _PROTOCOL.match(where)
    if not m or m.group(1).lower() == "file":
        return None
    return m.group(1).lower()


class DatasetLocation:
    """A dataset folder, local or behind an fsspec URL. Names read from the dataset's own
    files are resolved with `resolve`, which keeps them inside the folder."""

    def __init__(self, where: str | os.PathLike):
        text = os.fspath(where)
        self.text = text
        self.protocol = url_protocol(text)
        self.fs = None
        if self.protocol is None:
            self.root = Path(text[len("file://"):] if text.lower().startswith("file://") else text)
            return
        from portraitbooth_core.optional import require

        fsspec = require("fsspec", f"reading the dataset at the URL {text!r}")
        try:
            self.fs, root = fsspec.core.url_to_fs(text)
        except ImportError as exc:  # a protocol whose backend is another package (s3fs, gcsfs, ...)
            raise ImportError(f"dataset {text!r}: fsspec needs another package for the '{self.protocol}' "
                              f"protocol: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"dataset {text!r}: fsspec does not know the protocol '{self.protocol}' ({exc}); "
                             f"use a local path or a URL fsspec can open.") from None
        self.root = root.rstrip("/")

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def __repr__(self) -> str:
        return f"DatasetLocation({self.text!r})"

    def identity(self) -> str:
        """A stable name of this folder (the key of its local index cache)."""
        if self.remote:
            return f"{self.protocol}://{self.root}"
        return str(self.root.resolve())

    def describe(self, name: str) -> str:
        """`name` as a user would write it: a path or a URL (for messages)."""
        if self.remote:
            return f"{self.protocol}://{self.root}/{name}"
        return str(self.root / name)

    def resolve(self, name: str, what: str) -> str | Path:
        """The file `name` (relative, from a dataset file) inside the folder; absolute names,
        '..' and (locally) symlinks leading out are refused with `what` in the message."""
        if not self.remote:
            return inside(self.root, name, what)
        parts = _relative_parts(name, what)
        return "/".join([self.root, *parts])

    def path(self, name: str) -> str | Path:
        """A name the pack itself chose (index.json, precomputed/...), not read from a file."""
        return "/".join([self.root, name]) if self.remote else self.root / name

    # -- whole files -----------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        """Whether the folder has an entry `name` (a pack-chosen name). Locally a symlink counts
        whatever it points at: reading it goes through resolve, which refuses one leading
        out the same way whether or not its target exists."""
        return self.fs.exists(self.path(name)) if self.remote else os.path.lexists(self.path(name))

    def read_bytes(self, target: str | Path) -> bytes:
        return self.fs.cat_file(target) if self.remote else Path(target).read_bytes()

    def stat(self, target: str | Path) -> tuple[int, int]:
        """(size, modification time in ns; 0 where the store has none)."""
        if not self.remote:
            st = os.stat(target)
            return st.st_size, st.st_mtime_ns
        info = self.fs.info(target)
        return int(info.get("size") or 0), 0

    def write_bytes_atomic(self, name: str, data: bytes) -> None:
        """Whole file or nothing: a temp file renamed over the target."""
        target = self.path(name)
        if self.remote:
            tmp = f"{target}.{os.getpid()}.tmp"
            self.fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, target)
            return
        write_bytes_atomic(Path(target), data)

    def remove(self, name: str) -> None:
        """Delete a file the pack wrote (missing is fine)."""
        target = self.path(name)
        if self.remote:
            if self.fs.exists(target):
                self.fs.rm(target)
        else:
            Path(target).unlink(missing_ok=True)

    def read_limited(self, target: str | Path, max_bytes: int) -> bytes:
        """A whole file, but never more than max_bytes + 1 of it (the caller refuses a file
        that long before parsing it): an uploaded multi-GB "index" is not read."""
        if self.remote:
            return self.fs.cat_file(target, start=0, end=max_bytes + 1)
        with open(target, "rb") as f:
            return f.read(max_bytes + 1)

    def read_json(self, target: str | Path, shown: str | None = None, max_bytes: int = 64 << 20):
        """A JSON file of the dataset, its size and nesting bounded before parsing
        (portraitbooth_core.bounded_json); errors name the file, never quote it."""
        shown = shown or str(target)
        try:
            data = self.read_limited(target, max_bytes)
        except OSError as exc:
            raise DatasetFileError(f"{shown}: could not be read ({exc.strerror or type(exc).__name__}); rebuild "
                                   f"(or re-copy) the dataset.") from None
        return load_json_bytes(data, shown, max_bytes)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RangeReader:
    """Byte ranges of a location's files, with at most `max_open` local files open at once.

    Safe across fork (a DataLoader worker reopens its own files: the parent's are dropped,
    never read from two processes) and cheap to pickle (no open files travel)."""

    def __init__(self, location: DatasetLocation, max_open: int = MAX_OPEN_FILES):
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.location, self.max_open = location, max_open
        self._files: OrderedDict = OrderedDict()
        self._pid = os.getpid()
        self.opened = 0  # files opened so far in this process (tests: the bound holds)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = OrderedDict(), -1
        return state

    def open_count(self) -> int:
        return len(self._files) if self._pid == os.getpid() else 0

    def _file(self, target: Path):
        if self._pid != os.getpid():  # forked: the parent's handles are not ours to use
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.get(target)
        if f is not None:
            self._files.move_to_end(target)
            return f
        while len(self._files) >= self.max_open:
            _, old = self._files.popitem(last=False)
            old.close()
        f = self._files[target] = open(target, "rb")
        self.opened += 1
        return f

    def read(self, target: str | Path, offset: int, size: int) -> bytes:
        if size == 0:
            return b""
        if self.location.remote:
            data = self.location.fs.cat_file(target, start=offset, end=offset + size)
        else:
            f = self._file(target)
            if hasattr(os, "pread"):
                data = os.pread(f.fileno(), size, offset)
            else:  # Windows: no positional read; handles are per process anyway
                f.seek(offset)
                data = f.read(size)
        if len(data) != size:
            raise OSError(f"{target}: {size} bytes expected at offset {offset}, {len(data)} read; the file is "
                          f"truncated or was replaced after the dataset was indexed. Rebuild (or re-copy) the dataset.")
        return data

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files.clear()


def cache_root() -> Path:
    """Where the command line keeps indexes of datasets that cannot be written to (a URL, a
    read-only share): $PORTRAITBOOTH_INDEX_CACHE, else ~/.cache/portraitbooth/dataset-index.
    (The DIP Trainer node passes its own root, in ComfyUI's temp folder.)"""
    env = os.environ.get("PORTRAITBOOTH_INDEX_CACHE", "").strip()
    return Path(env) if env else Path.home() / ".cache" / "portraitbooth" / "dataset-index"


def cache_folder(location: DatasetLocation, root: str | os.PathLike | None = None) -> Path:
    """The cache folder of one dataset under `root` (default cache_root()): keyed by the
    dataset's identity, so a dataset keeps its folder and the fingerprint inside tells a
    stale index from a current one."""
    base = Path(root) if root is not None else cache_root()
    return base / hashlib.sha256(location.identity().encode()).hexdigest()[:24]
