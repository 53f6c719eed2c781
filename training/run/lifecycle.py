"""A run's life: its hold on the run folder, and processes that end with their launcher.

One run at a time writes a run folder: the run holds an exclusive lock on <output>/run.lock
(flock), which the kernel drops when the process ends, however it ends (SIGKILL too), so a
killed run never leaves the folder locked. The file names the holder (pid, host, start
time, command) for the refusal a second run gets. Under torchrun only rank 0 takes it.

torchrun starts each rank in a session of its own, so killing torchrun's process group
leaves the ranks running; die_with_launcher ties a rank's life to torchrun's.

Checkpoints are written to `.step-N.pt.<pid>.tmp` and renamed (checkpoint.py); one a run
killed mid-write left behind is removed by the next holder of the lock (remove_stale_temps).

Standard library only: the command line arms die_with_launcher before anything heavy loads.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; see RunLock.acquire
    fcntl = None

log = logging.getLogger("portraitbooth.training")

LOCK_FILE = "run.lock"
LOCK_INFO_MAX_BYTES = 64 << 10  # a holder record is a few hundred bytes
# checkpoint.save_checkpoint's temp names: .step-00000004.pt.<pid>.tmp
STALE_TEMP = re.compile(r"^\.step-\d{8}\.pt\.\d+\.tmp$")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_INTERVAL_S = 0.5


class RunLockedError(RuntimeError):
    """The run folder is held by another run that is still alive; the message names the
    folder, the holder (pid, host, start time, command) and what to do."""


def under_torchrun() -> bool:
    """Whether this process is a rank torchrun (torch.distributed.elastic) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


# -- processes that end with their launcher ------------------------------------------------------

def die_with_parent() -> str:
    """End this process (SIGKILL) as soon as its parent process ends. Linux: the kernel's
    parent-death signal (prctl PR_SET_PDEATHSIG); elsewhere a thread that watches the
    parent pid. Returns which of the two was armed. Call it from the thread that will
    outlive the work: Linux sends the signal when the parent *thread* that started this
    process ends (torchrun and the DataLoader start their children from the main thread)."""
    parent = os.getppid()
    how = "watchdog"
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
            how = "prctl"
    if how == "watchdog":
        threading.Thread(target=_watch_parent, args=(parent,), name="die-with-parent", daemon=True).start()
    if os.getppid() != parent:  # the parent ended before the signal was armed
        _die()
    return how


def die_with_launcher() -> str | None:
    """Under torchrun: end this rank when torchrun ends (die_with_parent), so that killing
    torchrun (or its process group) stops the ranks at once, before they write another
    step, checkpoint or export. None (nothing armed) outside torchrun: a run started from a
    shell keeps running under nohup, as any command does."""
    return die_with_parent() if under_torchrun() else None


def loader_worker_init(_worker_id: int) -> None:
    """DataLoader worker_init_fn under torchrun: a loader worker ends with its rank at once
    (torch's own check notices a dead rank only every few seconds)."""
    die_with_parent()


def _watch_parent(parent: int) -> None:
    import time

    while os.getppid() == parent:
        time.sleep(WATCHDOG_INTERVAL_S)
    _die()


def _die() -> None:
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


# -- the run folder's lock -----------------------------------------------------------------------

_HELD_FDS: set[int] = set()


def _close_held_in_child() -> None:
    # A forked child (a DataLoader worker) gets copies of the lock's descriptor, and flock
    # stays held while any copy is open: the child must not keep a killed run's folder locked.
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def _holder_record(by: str) -> dict:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "by": by[:1000]}
    if under_torchrun():
        record["launcher_pid"] = os.getppid()  # torchrun: what to stop to end every rank
    return record


def describe_holder(record: dict | None) -> str:
    """A lock record in words: 'pid 123 on host h (torchrun pid 120), started <time> (<by>)'."""
    if not isinstance(record, dict) or "pid" not in record:
        return "a process that has not written its details yet"
    def shown(key: str) -> str:  # the file may be anyone's: bounded text, whatever it holds
        return str(record.get(key, "?"))[:300]

    text = f"pid {shown('pid')} on host {shown('host')}"
    if record.get("launcher_pid"):
        text += f" (torchrun pid {shown('launcher_pid')})"
    text += f", started {shown('started')}"
    if record.get("by"):
        text += f" ({shown('by')})"
    return text


class RunLock:
    """The exclusive hold of one run folder (see the module text). Use acquire() / release(),
    or `with RunLock.acquire(folder): ...`."""

    def __init__(self, folder: Path, fd: int | None):
        self.folder, self.path, self._fd = folder, folder / LOCK_FILE, fd
        self.created = False  # acquire made the folder: release removes it again if the run wrote nothing

    @classmethod
    def acquire(cls, folder: str | os.PathLike, by: str,
                fix: str = "wait for it to end, stop it, or use another --output") -> "RunLock":
        """Hold `folder` (created if missing) for this process, or raise RunLockedError naming
        the live holder. A lock whose holder died (killed, crashed) is free: the kernel
        released it with the process. by: who holds it (a command line, an API), recorded
        for a later refusal; fix: what that refusal tells the user to do, in their words."""
        folder = Path(folder)
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        if fcntl is None:
            log.warning("no run folder lock on this platform: do not start two runs on %s at once", folder)
            return cls(folder, None)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise RunLockedError(f"{folder} is in use by another run: {describe_holder(holder)}. Two runs in "
                                     f"one folder interleave their logs and overwrite each other's checkpoints; "
                                     f"{fix}.") from None
            except BaseException:
                os.close(fd)
                raise
            # A holder that released it unlinked the file as we opened it: lock the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        data = json.dumps(_holder_record(by)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        _HELD_FDS.add(fd)
        lock = cls(folder, fd)
        lock.created = created
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the folder back (idempotent). The file goes first, then the lock: a run
        waiting on this file retries on the file the next holder creates."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        _HELD_FDS.discard(fd)
        os.close(fd)  # drops the flock
        if self.created:  # a run refused before it wrote anything leaves no empty folder behind
            _remove_if_empty(self.folder)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (the run wrote into it), or already gone
        pass


def _read_record(fd: int) -> dict | None:
    try:
        data = os.pread(fd, LOCK_INFO_MAX_BYTES, 0)
        record = json.loads(data.decode()) if data else None
    except (OSError, ValueError):  # being written, or not ours: no details
        return None
    return record if isinstance(record, dict) else None


def read_holder(folder: str | os.PathLike) -> dict | None:
    """The record in <folder>/run.lock (the live holder's, or a dead one's left behind)."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_record(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the half-written checkpoint temp files in <folder>/checkpoints (a run killed
    while saving leaves one); finished checkpoints stay. Only while holding the folder's
    RunLock: then no other process is writing any of them. Returns what was deleted."""
    checkpoints = Path(folder) / "checkpoints"
    if not checkpoints.is_dir() or checkpoints.is_symlink():
        return []
    removed = []
    for entry in checkpoints.iterdir():
        if STALE_TEMP.match(entry.name) and (entry.is_symlink() or entry.is_file()):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.info("removed %d half-written checkpoint file(s) a stopped run left in %s: %s", len(removed),
                 checkpoints, ", ".join(sorted(p.name for p in removed)))
    return removed
