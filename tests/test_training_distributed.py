"""The training CLI as users run it: `torchrun` with 2 CPU processes (gloo) against one
process with the same global batch, and a run SIGKILLed in the middle of a checkpoint
write that resumes and ends where the uninterrupted run ends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from training_fixtures import *  # noqa: F401,F403
from training_fixtures import train_config

STEPS = 3
# Gradients of one global batch summed in another order (DDP's all-reduce vs local
# accumulation) differ by float rounding (~1e-7 relative); after 3 Adam steps at lr 1e-3
# the weights agree to well under 1e-5. A wrong data split or a missing all-reduce
# changes them by about lr (1e-3) per step.
DDP_ATOL = 1e-5


def write_config(tmp_path, dataset_dir, name: str, **overrides):
    settings = {"steps": STEPS, "save_every": 1, "keep_last": 5, "grad_accum": 2, "micro_batch": 2, **overrides}
    cfg = train_config(dataset_dir, tmp_path / name, **settings)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def run_cli(args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def final_params(run_dir) -> dict:
    from training.checkpoint import latest_checkpoint, load_checkpoint

    state = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert state["step"] == STEPS
    return state["params"]


@pytest.fixture(scope="module")
def single_run(sd15_checkpoint, dataset_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    result = run_cli(["-m", "training", "train", "--config", str(write_config(tmp, dataset_dir, "run"))])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "run"


def test_torchrun_two_processes_match_one_process(single_run, dataset_dir, tmp_path):
    config = write_config(tmp_path, dataset_dir, "ddp", grad_accum=1)  # 2 ranks x 2 samples = the same 4
    result = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "-m", "training", "train", "--config", str(config)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = final_params(single_run), final_params(tmp_path / "ddp")
    assert one.keys() == two.keys()
    zero_init = [k for k in one if ".up." in k or k == "projector.fc2.weight"]  # LoRA ups, projector output
    assert zero_init and min(float(one[k].abs().max()) for k in zero_init) > 1e-4  # both really trained
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"largest weight difference, 1 vs 2 processes: {worst:.3g}")
    assert worst < DDP_ATOL, worst
    ranks = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ranks["step"] == STEPS


def test_sigkill_during_checkpoint_write_resumes_exactly(single_run, dataset_dir, tmp_path):
    from training.checkpoint import FAULT_ENV, list_checkpoints

    config = write_config(tmp_path, dataset_dir, "crash")
    args = ["-m", "training", "train", "--config", str(config)]
    killed = run_cli(args, env={FAULT_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = tmp_path / "crash" / "checkpoints"
    assert [p.name for p in list_checkpoints(folder)] == ["step-00000001.pt"]
    assert list(folder.glob(".step-00000002.pt.*.tmp"))  # the half-written file, never renamed
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr and "step-00000001.pt" in resumed.stdout + resumed.stderr
    expected, got = final_params(single_run), final_params(tmp_path / "crash")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name  # same machine, same order: bit-exact
    # Export later from the run folder alone: the settings come from the checkpoint.
    exported = run_cli(["-m", "training", "export", "--output", str(tmp_path / "crash"), "--out",
                        str(tmp_path / "later.safetensors")])
    assert exported.returncode == 0, exported.stderr[-3000:]
    from portraitbooth_core.weights.file import load_portraitbooth

    info = load_portraitbooth(tmp_path / "later.safetensors").info
    assert info.training["steps"] == STEPS and info.training["lora"] == {"rank": 4, "alpha": 4.0}
