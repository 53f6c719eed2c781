"""Files the pack writes: atomically, and readable like any other file the process makes.

Atomic: the bytes go to a hidden temp file beside the target, which os.replace then puts
in place, so a crash never leaves a half-written file under the real name for ComfyUI to
list. Mode: safetensors' save_file (like tempfile.mkstemp) creates its file with mode 0600,
which a ComfyUI running as another user, or a group that shares the models folder, cannot
read. The temp file is therefore created here first, with the mode the process umask gives
any new file, and given that mode again once written (whatever the writer did to it).
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator


def _create_new(tmp: Path) -> int:
    """Create `tmp` (refusing anything already there, a planted symlink included) and return
    the permission bits the umask (or the folder's default ACL) gave it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path to write `path`'s content to (with any writer, e.g. save_file(tensors, str(tmp)));
    on leaving the block without an error it gets the umask's mode and replaces `path`
    (a symlink lying at `path` is replaced, never written through). On an error nothing
    changes and the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash of an earlier process with this pid
    mode = _create_new(tmp)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """`data` as the whole content of `path`, atomically, with the umask's mode."""
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


__all__ = ["atomic_target", "write_bytes_atomic"]
