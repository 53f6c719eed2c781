"""Training checkpoints: atomic writes, keep the last K, exact resume.

A checkpoint is one torch file holding only tensors and plain containers, so it loads
with `torch.load(weights_only=True)`: trainable weights, optimizer, scheduler, EMA and
the step. Nothing in it is per rank: the step fixes the data position, and every random
draw is keyed by (seed, global sample position) (data.py), so a run resumes exactly on
any number of ranks with the same global batch. (Checkpoints of older versions also hold
per-rank RNG states; they are ignored.) It is written to a temp file, fsynced, renamed
and the folder fsynced: a crash (even SIGKILL mid-write) leaves the previous checkpoints
intact and at most a stray temp file.
"""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import torch

PATTERN = re.compile(r"^step-(\d{8})\.pt$")
FAULT_ENV = "PORTRAITBOOTH_FAULT_KILL_IN_CHECKPOINT"  # fault injection for the crash test: a step number


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: str | os.PathLike, step: int, state: dict, keep_last: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}.pt"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        if os.environ.get(FAULT_ENV) == str(step):
            # Crash test: die with half of the file written and nothing renamed yet.
            f.flush()
            f.truncate(f.tell() // 2)
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(folder: str | os.PathLike) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint that loads; a damaged newer one (a crash
    that somehow left a complete-looking name) is reported and passed over."""
    import logging

    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file means "not complete"
            logging.getLogger("portraitbooth.training").warning("skipping unreadable checkpoint %s: %s", path, exc)
    return None


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = load_latest(folder)
    return found[0] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Memory-mapped: tensors are read from the file as they are used (copied to the GPU,
    into the parameters), so N ranks resuming on one node share the page cache instead of
    each holding the whole checkpoint (~14 GB in full mode) in RAM. The mapping is
    private: writing into a loaded tensor never changes the file."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
