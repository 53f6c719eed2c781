"""Defaults and precision: learning rate by mode, the precision `auto` picks (bf16 where
native, fp16 + loss scaling elsewhere on CUDA, fp32 on the CPU), memory-mapped
checkpoints, one log line per step and the progress bar."""
from __future__ import annotations

import logging
import re
import sys

import pytest
import torch

from training_fixtures import *  # noqa: F401,F403
from training_fixtures import train_config


def test_learning_rate_defaults_by_mode_and_an_explicit_rate_wins():
    from training.config import LR_BY_MODE, TrainConfig, load_config

    assert TrainConfig().lr == 0.0 and TrainConfig().mode == "lora"
    assert LR_BY_MODE == {"full": 1e-5, "lora": 1e-4, "frozen": 1e-4}
    assert load_config(None, ["mode=full"]).learning_rate == 1e-5  # the paper's rate for the whole UNet
    assert load_config(None, ["mode=lora"]).learning_rate == 1e-4
    assert load_config(None, []).learning_rate == 1e-4
    assert load_config(None, ["mode=lora", "lr=3e-6"]).learning_rate == 3e-6
    assert load_config(None, ["mode=full", "lr=2e-4"]).learning_rate == 2e-4
    with pytest.raises(ValueError, match=r"^lr: -0.0001 is below the minimum 0; give a number in 0..1 \(0: the mode's"):
        load_config(None, ["lr=-1e-4"])


class FakeCuda:
    """torch.cuda as a machine with one GPU of the given compute capability reports it."""

    def __init__(self, monkeypatch, capability: tuple[int, int], bf16_supported: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)


@pytest.mark.parametrize("capability,bf16,expected", [
    ((9, 0), True, "bf16"),    # H100
    ((8, 0), True, "bf16"),    # A100
    ((8, 6), True, "bf16"),    # RTX 30xx
    ((7, 0), True, "fp16"),    # V100: torch says bf16 "works" (emulated): still fp16 + scaling
    ((7, 5), False, "fp16"),   # T4
    ((8, 0), False, "fp16"),   # a build without bf16 kernels
])
def test_auto_precision_is_bf16_only_where_native(monkeypatch, capability, bf16, expected):
    from training.models.precision import choose_precision, grad_scaler

    FakeCuda(monkeypatch, capability, bf16)
    cuda = torch.device("cuda", 0)
    assert choose_precision("auto", cuda) == expected
    assert choose_precision("auto", torch.device("cpu")) == "fp32"
    for explicit in ("fp32", "bf16", "fp16"):  # an explicit choice is kept
        assert choose_precision(explicit, cuda) == explicit
    assert grad_scaler("fp16", torch.device("cpu")).is_enabled()
    assert not grad_scaler("bf16", torch.device("cpu")).is_enabled()
    assert not grad_scaler("fp32", torch.device("cpu")).is_enabled()


def test_fp16_trains_with_loss_scaling_and_an_overflow_only_lowers_the_scale(sd15_checkpoint, dataset_dir,
                                                                             tmp_path):
    from training.run.trainer import Trainer

    t = Trainer(train_config(dataset_dir, tmp_path, precision="fp16", lr=0.0, steps=3))
    try:
        assert t.precision == "fp16" and t.module.precision == "fp16" and t.scaler.is_enabled()
        assert [g["lr"] for g in t.optimizer.param_groups] == [1e-4, 1e-4]  # lora's default rate
        assert t.scaler.get_scale() == 65536.0  # torch's initial scale; at random init it may overflow once
        t.scaler.load_state_dict({**t.scaler.state_dict(), "scale": 256.0})  # one that fits: this step trains
        before = {n: p.detach().clone() for n, p in t.params.items()}
        values = t.train_step()  # seed 0: step 1 draws an identity sample at t = 65, so L_id is in it
        assert values["loss_scale"] == 256.0 and "scale_overflow" not in values and "skipped" not in values
        assert all(torch.isfinite(torch.tensor(values[k])) for k in ("noise", "loc", "id", "total"))
        assert any(not torch.equal(before[n], p) for n, p in t.params.items())  # it trained
        # A scale the fp32 gradients cannot hold: the scaler skips the update and halves it;
        # this is not the NaN guard's bad step.
        state = t.scaler.state_dict()
        t.scaler.load_state_dict({**state, "scale": 3e38})
        before = {n: p.detach().clone() for n, p in t.params.items()}
        values = t.train_step()
        assert values["scale_overflow"] == 1.0 and "skipped" not in values and t.skipped_steps == []
        assert all(torch.equal(before[n], p) for n, p in t.params.items())
        assert t.scaler.get_scale() == pytest.approx(1.5e38)
        assert t.state()["scaler"]["scale"] == pytest.approx(1.5e38)  # checkpoints carry the scale
        t.save()
    finally:
        t.close()
    resumed = Trainer(train_config(dataset_dir, tmp_path, precision="fp16", lr=0.0, steps=3))
    try:
        assert resumed.step == 2 and resumed.scaler.get_scale() == pytest.approx(1.5e38)
    finally:
        resumed.close()


def test_fp32_runs_without_autocast_or_scaling(sd15_checkpoint, dataset_dir, tmp_path):
    import contextlib

    from training.run.trainer import Trainer

    t = Trainer(train_config(dataset_dir, tmp_path, mode="frozen", steps=1))  # precision auto on the CPU
    try:
        assert t.precision == "fp32" and not t.scaler.is_enabled()
        assert isinstance(t.module.autocast(), contextlib.nullcontext)
        assert "loss_scale" not in t.train_step()
    finally:
        t.close()


def _mapped_from(tensor: torch.Tensor, path) -> bool:
    """True when the tensor's memory is a mapping of `path` (Linux /proc/self/maps)."""
    ptr = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5] == str(path):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_checkpoints_load_memory_mapped_not_into_ram(tmp_path):
    from training.run.checkpoint import load_checkpoint, save_checkpoint

    weights = torch.randn(256, 1024)
    path = save_checkpoint(tmp_path, 7, {"step": 7, "params": {"w": weights}, "optimizer": {}}, keep_last=2)
    state = load_checkpoint(path)
    assert state["step"] == 7 and torch.equal(state["params"]["w"], weights)
    assert _mapped_from(state["params"]["w"], path.resolve())  # read from the page cache, shared by ranks
    state["params"]["w"].add_(1)  # a private mapping: the file keeps what was saved
    assert torch.equal(load_checkpoint(path)["params"]["w"], weights)


def test_one_log_line_per_step_and_a_progress_bar_with_eta_and_images_per_second(
        sd15_checkpoint, dataset_dir, tmp_path, monkeypatch, capsys, caplog):
    from training.run import trainer as trainer_module

    console = logging.StreamHandler(sys.stderr)  # what `python -m training` sets up (basicConfig)
    console.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(console)
    caplog.set_level(logging.INFO, logger="portraitbooth.training")
    monkeypatch.setattr(trainer_module, "interactive", lambda: True)  # as in a terminal
    t = trainer_module.Trainer(train_config(dataset_dir, tmp_path, mode="frozen", steps=2, log_every=1))
    try:
        capsys.readouterr()
        caplog.clear()
        t.run()
        out, err = capsys.readouterr()
        steps = [r.getMessage() for r in caplog.records if re.match(r"step \d+ ", r.getMessage())]
        assert [s.split()[1] for s in steps] == ["1", "2"]  # exactly one record per step
        printed = [line for line in (out + err).replace("\r", "\n").splitlines() if re.match(r"step \d+ noise=", line)]
        assert len(printed) == 2 and "[train]" not in out + err, out + err
        # images done/total, the rate (s/img below one image a second, as on this CPU) and the ETA
        assert re.search(r"2(\.00)?/4(\.00)? \[\d\d:\d\d<\d\d:\d\d, [\d.]+(img/s|s/img)", err), err
        assert re.search(r"4(\.00)?/4(\.00)? \[", err), err
        assert "images_s=" in printed[0]
        # A callback drives the caller's own progress UI (the DIP Trainer node): no bar.
        t.config.steps = 3
        seen = []
        t.run(callback=lambda step, total, values: seen.append(step))
        out, err = capsys.readouterr()
        assert seen == [3] and "img" not in err
        assert len([line for line in (out + err).splitlines() if line.startswith("step 3 ")]) == 1
    finally:
        logging.getLogger().removeHandler(console)
        t.close()


def test_no_progress_bar_when_stderr_is_not_a_terminal(sd15_checkpoint, dataset_dir, tmp_path, capsys):
    from training.run.metrics import Progress, interactive

    assert interactive() is False  # pytest captures stderr: not a TTY
    bar = Progress(10, 0, 4, enabled=False)
    bar.update(1, {"total": 1.0})
    bar.close()
    assert capsys.readouterr().err == ""
