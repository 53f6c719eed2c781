"""A refused `train` under torchrun (2 CPU ranks, gloo) as a person reads it.

torchrun ends a failed job with its own ChildFailedError traceback and a summary of the
failed ranks. Without a rank's error file the summary says only "To enable traceback see
...", so the last thing on the screen was no help and the rank's one-line `error:` sat
above torchrun's traceback. Each rank now leaves its message in the error file torchrun
reads (TORCHELASTIC_ERROR_FILE), so the summary names it for every failed rank and as
the root cause, the last lines torchrun prints.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODELS_DIR, REPO
from training_fixtures import *  # noqa: F401,F403


def torchrun_train(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "training", "train", "--device", "cpu", *map(str, args)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too (they end with torchrun)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_torchrun_ends_with(result: subprocess.CompletedProcess, message: str) -> None:
    """torchrun's summary names the rank's error for each failed rank and as the root cause,
    on its last line before the closing border; the ranks printed it at most once."""
    assert result.returncode != 0, result.stderr[-3000:]
    lines = result.stderr.rstrip().splitlines()
    # Each node's first rank prints it (unless torchrun stopped that rank first: another failed sooner).
    assert lines.count(f"error: {message}") <= 1, result.stderr[-4000:]
    assert "To enable traceback see" not in result.stderr, result.stderr[-4000:]
    summary = "\n".join(lines[lines.index("Failures:"):])
    failures = summary.replace("Root Cause (first observed failure):", "").split("\n[")[1:]
    assert len(failures) == 2, summary
    for failure in failures:  # its message, or torchrun stopped it after the first failure (SIGTERM)
        assert f"  traceback : error: {message}" in failure or "exitcode  : -15" in failure, summary
    assert lines[-2] == f"  traceback : error: {message}" and set(lines[-1]) == {"="}, result.stderr[-4000:]
    assert "Root Cause (first observed failure):" in lines[-9], summary


@pytest.mark.slow  # torchrun with 2 CPU ranks: ~15 s a run on 2 cores
def test_an_input_refused_before_the_ranks_meet_is_torchruns_root_cause(sd15_checkpoint, tmp_path):
    checkpoint = MODELS_DIR / "checkpoints" / sd15_checkpoint
    result = torchrun_train("--checkpoint", checkpoint, "--dataset", tmp_path / "none", "--output", tmp_path / "run")
    assert_torchrun_ends_with(result, f"the dataset folder {tmp_path / 'none'} does not exist; give the folder "
                                      f"`python -m training build` wrote, or build the dataset with `python -m "
                                      f"training build <people folders> <dataset>`.")


@pytest.mark.slow  # torchrun with 2 CPU ranks: ~15 s a run on 2 cores
def test_a_refusal_only_rank_0_can_see_is_every_ranks_error(sd15_checkpoint, dataset_dir, tmp_path):
    """The run folder's lock: rank 0 alone tries it, after the process group is up."""
    from training.run.lifecycle import RunLock, RunLockedError

    folder = tmp_path / "run"
    holder = RunLock.acquire(folder, "a test holding the folder")
    try:
        with pytest.raises(RunLockedError) as refused:  # what rank 0 is told, in the CLI's words
            from training.run.ownership import hold_run

            hold_run(folder, "the refused run", "cli")
        result = torchrun_train("--checkpoint", MODELS_DIR / "checkpoints" / sd15_checkpoint, "--dataset",
                                dataset_dir, "--output", folder)
    finally:
        holder.release()
    assert_torchrun_ends_with(result, f"--output {refused.value}")


def test_a_crash_under_torchrun_leaves_its_traceback_for_the_summary(tmp_path, monkeypatch):
    """Not a refusal but a bug: torchrun's summary shows the rank's traceback (what torch's
    @record would write), read back here by torchrun's own ProcessFailure."""
    import training.__main__ as cli
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def crash(args):
        raise ZeroDivisionError("a bug in train")

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(cli, "_train", crash)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train", "--device", "cpu"])
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
    assert isinstance(failure.message, dict), failure.message  # a str: torchrun found no error file
    assert failure.message["message"] == "ZeroDivisionError: a bug in train"
    callstack = failure.message["extraInfo"]["py_callstack"]
    assert callstack.startswith("Traceback (most recent call last):") and "in crash" in callstack, callstack
