"""One run, one owner (issue "A training run is never silently wrong", section 2).

A run folder is held by one live run (run.lock, an flock the kernel drops with the
process): a second run is refused naming the holder, and a killed holder frees it at once.
Killing torchrun's process group ends every rank (torch starts each in a session of its
own) before it writes anything more. Half-written checkpoints a killed run left are
removed when the next run starts; finished ones stay.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from training_fixtures import *  # noqa: F401,F403
from training_fixtures import train_config
from test_training_distributed import run_cli  # one runner: own process group, killed on a hang

ENV = {"OMP_NUM_THREADS": "1"}


def _python(code: str, *args: str, log: Path) -> subprocess.Popen:
    """A helper process running `code`: lines on stdout (a pipe), the rest in `log`."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env={**os.environ, **ENV},
                                stdout=subprocess.PIPE, stderr=err, start_new_session=True)


HOLD = """
import os, sys, time
from training.run.lifecycle import RunLock
lock = RunLock.acquire(sys.argv[1], "a test holder")
if sys.argv[2] == "fork":  # a child that outlives its parent, as a DataLoader worker may
    if os.fork() == 0:  # the child runs from here on once the at-fork handlers have run
        print("child", os.getpid(), flush=True)
        time.sleep(120)
        os._exit(0)
print("held", flush=True)
time.sleep(120)
"""


def _wait_lines(proc: subprocess.Popen, log: Path, *words: str, seconds: float = 60) -> dict[str, str]:
    """The first line starting with each of `words`, in whatever order they come; a helper
    that does not say them in time fails the test with what it said (not a wait for its sleep)."""
    import select

    found, text, end = {}, b"", time.monotonic() + seconds
    fd = proc.stdout.fileno()
    while len(found) < len(words):
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            raise AssertionError(f"the helper did not say {words} ({'it ended' if ready else 'timed out'}); it said "
                                 f"{text!r}, rc {proc.poll()}, stderr: {log.read_text()[-2000:]}")
        text += chunk
        # Complete lines only: a read can end inside a line, and a half line kept here would stay.
        for line in text.decode(errors="replace").split("\n")[:-1]:
            word = next((w for w in words if line.startswith(w)), None)
            if word is not None:
                found.setdefault(word, line)
    return found


def test_the_helper_reader_keeps_a_line_whole_when_it_arrives_in_two_reads(tmp_path):
    """CI once read "child" before its pid: a line is taken only once its newline came."""
    split = "import os, time\nos.write(1, b'child')\ntime.sleep(0.5)\nos.write(1, b' 42\\nheld\\n')\n"
    proc = _python(split, log=tmp_path / "split.log")
    try:
        assert _wait_lines(proc, tmp_path / "split.log", "child", "held") == {"child": "child 42", "held": "held"}
    finally:
        _kill([proc.pid])
        proc.wait()


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_holder_frees_the_folder(tmp_path):
    from training.run.lifecycle import LOCK_FILE, RunLock, RunLockedError

    holder = _python(HOLD, str(tmp_path / "run"), "plain", log=tmp_path / "holder.log")
    try:
        _wait_lines(holder, tmp_path / "holder.log", "held")
        with pytest.raises(RunLockedError) as refused:
            RunLock.acquire(tmp_path / "run", "the second run")
        message = str(refused.value)
        assert f"{tmp_path / 'run'} is in use by another run: pid {holder.pid} on host {socket.gethostname()}, " \
               f"started 20" in message and "(a test holder)" in message, message
        holder.kill()
        holder.wait()
    finally:
        _kill([holder.pid])
    assert (tmp_path / "run" / LOCK_FILE).exists()  # what the killed run left: a file, no lock
    lock = RunLock.acquire(tmp_path / "run", "the next run")  # at once: the kernel dropped the flock
    record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["by"] == "the next run"
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_one_process_cannot_hold_a_folder_twice_and_a_released_folder_is_free(tmp_path):
    """The DIP Trainer runs in ComfyUI's process: two runs there on one folder conflict too."""
    from training.run.lifecycle import RunLock, RunLockedError

    with RunLock.acquire(tmp_path / "run", "first"):
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} .*\(first\)"):
            RunLock.acquire(tmp_path / "run", "second")
    RunLock.acquire(tmp_path / "run", "third").release()
    assert not (tmp_path / "run").exists()  # made for the run, which wrote nothing: not left behind


def test_run_training_refuses_a_held_folder_as_a_resume_error_before_loading_anything(tmp_path):
    """The DIP Trainer refuses a run on ResumeError: a folder in use is one, naming the holder."""
    from training import api
    from training.run.lifecycle import RunLock

    with RunLock.acquire(tmp_path / "run", "python -m training train --config a.toml"):
        with pytest.raises(api.ResumeError, match=rf"in use by another run: pid {os.getpid()} .*\(python -m "
                                                  rf"training train --config a\.toml\)\. .* or use another output_name"):
            api.run_training({"output": str(tmp_path / "run"), "checkpoint": "none.safetensors",
                              "dataset": str(tmp_path / "none")}, owner="me", node_words=True)
    assert not (tmp_path / "run").exists()


def test_a_forked_child_of_a_killed_holder_does_not_keep_the_folder_locked(tmp_path):
    """flock stays while any copy of its descriptor is open, and a forked child (a DataLoader
    worker) has copies: the lock closes them in every child."""
    from training.run.lifecycle import RunLock

    holder, child = _python(HOLD, str(tmp_path / "run"), "fork", log=tmp_path / "holder.log"), None
    try:
        child = int(_wait_lines(holder, tmp_path / "holder.log", "child", "held")["child"].split()[1])
        holder.kill()
        holder.wait()
        assert _alive(child)
        RunLock.acquire(tmp_path / "run", "the next run").release()
    finally:
        _kill([holder.pid] + ([child] if child else []))


def test_stale_temp_checkpoints_are_removed_and_finished_ones_kept(tmp_path):
    from training.run.lifecycle import remove_stale_temps

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    kept = ["step-00000003.pt", "step-00000004.pt", "notes.txt", ".step-x.pt.1.tmp", ".step-00000005.pt.tmp"]
    stale = [".step-00000004.pt.123.tmp", ".step-00000005.pt.99999.tmp"]
    for name in kept + stale:
        (folder / name).write_bytes(b"x")
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)
    assert remove_stale_temps(tmp_path / "no-run") == []


# -- the command line ------------------------------------------------------------------------------

def _cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return run_cli(args, env=ENV, timeout=timeout)


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe: a long run never blocks on a full pipe
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env={**os.environ, **ENV}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(what, proc: subprocess.Popen, log: Path, seconds: float = 240):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        found = what()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the test could act:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"waited {seconds} s in vain:\n{log.read_text()[-3000:]}")


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))


def _long_config(tmp_path: Path, dataset_dir: Path, run: Path, **overrides) -> Path:
    from training.config import TrainConfig

    recipe = TrainConfig()  # the recipe's own mix of identity, text-only and unconditional samples
    cfg = train_config(dataset_dir, run, **{"steps": 100_000, "save_every": 1, "keep_last": 2, "grad_accum": 1,
                                            "micro_batch": 1, "id_max_timestep": recipe.id_max_timestep,
                                            "p_text_only": recipe.p_text_only, "p_uncond": recipe.p_uncond,
                                            **overrides})
    path = tmp_path / f"{run.name}.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


@pytest.mark.slow  # three runs, each its own process: ~20 s on 2 cores
def test_a_second_train_on_one_output_is_refused_until_the_first_is_killed(sd15_checkpoint, dataset_dir,
                                                                           recognizer_pack, tmp_path):
    run = tmp_path / "run"
    config = _long_config(tmp_path, dataset_dir, run)
    args = ["-m", "training", "train", "--device", "cpu", "--config", str(config)]
    first = _start(args, tmp_path / "first.log")
    try:
        _wait_for(lambda: _checkpoints(run), first, tmp_path / "first.log")
        second = _cli(args, timeout=90)  # before the fix: a second run beside the first, until killed here
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr, second.stderr[-3000:]
        started = json.loads((run / "run.lock").read_text())["started"]
        assert f"error: --output {run} is in use by another run: pid {first.pid} on host {socket.gethostname()}, " \
               f"started {started} (python -m training train --device cpu --config {config})" in second.stderr, \
            second.stderr[-3000:]
        assert first.poll() is None  # the refusal did not disturb the first run
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        _kill([first.pid])
    newest = int(_checkpoints(run)[-1][5:13])
    # A run killed mid-save leaves a temp file like this one; the next run removes it.
    stale = run / "checkpoints" / f".step-{newest + 1:08d}.pt.{first.pid}.tmp"
    stale.write_bytes(b"half a checkpoint")
    third = _cli([*args, "--set", f"steps={newest + 1}"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"step-{newest:08d}.pt at step {newest}" in third.stdout + third.stderr  # resumed: the lock was free
    assert not stale.exists()
    assert _checkpoints(run) == [f"step-{newest:08d}.pt", f"step-{newest + 1:08d}.pt"]
    assert not (run / "run.lock").exists()  # released when the run ended


def _descendants(root: int) -> set[int]:
    """Every process below `root` (from /proc's parent pids)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        children = {p for p, parent in parents.items() if parent == pid}
        todo.extend(children - found)
        found |= children
    return found


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # torchrun with 2 CPU ranks: ~20 s on 2 cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_torchruns_process_group_ends_every_rank_at_once(sd15_checkpoint, dataset_dir, recognizer_pack,
                                                                 tmp_path):
    """`kill -KILL -- -<torchrun pgid>`: before the fix both ranks went on for seconds, finished
    their step and wrote its checkpoint and the export after torchrun was gone."""
    from training.run.metrics import read_metrics

    run = tmp_path / "ddp"
    config = _long_config(tmp_path, dataset_dir, run)
    log = tmp_path / "torchrun.log"
    launcher = _start(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training",
                       "train", "--device", "cpu", "--config", str(config)], log)
    ranks: set[int] = set()
    try:
        _wait_for(lambda: _checkpoints(run) and read_metrics(run), launcher, log)
        ranks = _descendants(launcher.pid)
        assert len(ranks) >= 2, ranks  # the two ranks (and any loader workers of theirs)
        step_s = max(r["step_s"] for r in read_metrics(run))
        os.killpg(launcher.pid, signal.SIGKILL)  # torchrun's group: torchrun alone, its ranks have sessions of their own
        killed = time.monotonic()
        launcher.wait()
        while any(_alive(p) for p in ranks) and time.monotonic() - killed < 30:
            time.sleep(0.02)
        took = time.monotonic() - killed
        survivors = sorted(p for p in ranks if _alive(p))
        print(f"ranks ended {took:.2f} s after the kill (step time {step_s:.2f} s); survivors: {survivors}")
        assert not survivors and took < 5, (took, survivors)
        # Nothing is written after that: the folder stays as the kill left it for longer than
        # several steps take (the old ranks wrote their next checkpoint within one step).
        after = _listing(run)
        deadline = time.monotonic() + 3 * step_s + 1
        while time.monotonic() < deadline:
            assert _listing(run) == after
            time.sleep(0.1)
        assert not list(run.glob("*.safetensors"))
        from training.run.lifecycle import RunLock

        RunLock.acquire(run, "the next run").release()  # rank 0's lock went with it
    finally:
        _kill([launcher.pid, *ranks])
