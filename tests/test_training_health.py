"""A training run never collapses silently (issue 23, section 1).

The identity and expression tokens' attention in the face is logged per step from the maps
L_loc already captures (portraitbooth_core/ecac/health.py); a token dead in every layer
group for collapse_patience logged steps raises the collapse alarm (training/run/health.py),
which warns or, with on_collapse=stop, ends the run with its checkpoint saved. L_loc's log
floor (loc_floor=log) keeps a gradient on a dead token where the paper's floor has none.

The collapsing runs are real trainings: the recipe's defaults on the stand-in SD1.5, except
a full-UNet fine-tune whose L_loc has no floor (ecac_beta=0) and weight 10, so that it only
pushes the identity token out of the background. From step 7 its attention in the face is
below 1e-4 in every layer group (1e-11 by step 17); the healthy run (the defaults) holds it
at about 0.01-0.2.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TEST_CHECKPOINT, load_pack
from training_fixtures import *  # noqa: F401,F403
from training_fixtures import train_config

# What makes the run collapse (module docstring); everything else is the recipe's default.
COLLAPSE = {"mode": "full", "ecac_beta": 0.0, "ecac_lambda": 10.0}
PATIENCE = 3  # logged steps: short runs (the default is for real ones)


# -- the log floor keeps a gradient ---------------------------------------------------------------

def _dead_token_gradient(form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of 8 pixels x 5 tokens where the identity token (0) is dead (A ~ 1e-10); the
    gradient of L_loc on them (lambda 1, mu 0). Returns (gradient of the identity logits, A)."""
    from portraitbooth_core.ecac.loss import ECACSettings, localization_loss

    logits = torch.zeros(1, 8, 5, dtype=torch.float32)
    logits[..., 0] = math.log(1e-10) + math.log(4)  # softmax: ~1e-10 against four tokens at 0
    logits.requires_grad_(True)
    probs = logits.softmax(-1)
    mask = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])  # face: the top row
    a_id, a_ex = probs[..., 0].reshape(1, 2, 4), probs[..., 1].reshape(1, 2, 4)
    loss = localization_loss([a_id], [a_ex], mask, ECACSettings(lam=1.0, mu=0.0, floor_form=form))
    loss.total.backward()
    return logits.grad[0, :, 0], probs[0, :, 0].detach()


def test_log_floor_pulls_a_dead_token_where_the_paper_floor_cannot():
    paper, a = _dead_token_gradient("paper")
    assert float(a.max()) < 2e-10  # the token is dead
    # paper: d/dz relu(beta - A) = -A (1 - A): nothing left to pull with
    assert float(paper.abs().max()) < 1e-9, paper
    log, _ = _dead_token_gradient("log")
    # log: d/dz beta (log beta - log A) = -beta (1 - A) per face pixel, over the 8 pixels' mean
    expected = -0.8 * (1 - a[:4]) / 8
    torch.testing.assert_close(log[:4], expected, rtol=1e-4, atol=0)
    assert float(log[4:].abs().max()) < 1e-9  # outside the face: the push-out term only, as the paper's


def test_log_floor_costs_nothing_at_the_floor_and_has_the_papers_slope_there():
    from portraitbooth_core.ecac.loss import below_floor

    a = torch.tensor([0.8, 0.9, 1.0, 0.79], requires_grad=True)
    value = below_floor(a, 0.8, "log")
    assert value.detach()[:3].tolist() == [0.0, 0.0, 0.0] and float(value.detach()[3]) > 0
    value.sum().backward()
    assert float(a.grad[3]) == pytest.approx(-0.8 / 0.79)  # -beta / A: -1 at the floor, as relu(beta - A)
    assert below_floor(torch.zeros(3), 0.0, "log").tolist() == [0.0, 0.0, 0.0]  # gamma = 0: no floor
    assert torch.isfinite(below_floor(torch.zeros(3), 0.1, "log")).all()  # an underflowed A: finite


def test_the_paper_floor_stays_the_default_and_unchanged():
    from portraitbooth_core.ecac.loss import ECACSettings, token_terms
    from training.config import TrainConfig
    from training.run.losses import ecac_settings

    assert ECACSettings().floor_form == "paper" and TrainConfig().loc_floor == "paper"
    assert ecac_settings(TrainConfig()).floor_form == "paper"
    assert ecac_settings(TrainConfig(loc_floor="log")).floor_form == "log"
    gen = torch.Generator().manual_seed(0)
    attn, mask = torch.rand(3, 4, 4, generator=gen), (torch.rand(3, 4, 4, generator=gen) > 0.5).float()
    weight = torch.tensor([1.0, 0.0, 1.0])
    paper = ((attn * (1 - mask)).flatten(1).mean(1) + (F.relu(0.8 - attn) * mask).flatten(1).mean(1))
    assert torch.equal(token_terms(attn, mask, 0.8, weight), (paper * weight).sum() / weight.sum())


# -- the numbers the monitor logs ------------------------------------------------------------------

def test_attention_health_is_the_share_in_the_face_and_its_concentration_per_layer_group():
    from portraitbooth_core.ecac.health import attention_sums, layer_groups, summarize

    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])  # faces: 1/4 and 1/2 of the image
    identity = torch.tensor([[[0.8, 0.1], [0.1, 0.0]], [[0.5, 0.5], [0.0, 0.0]]])
    expression = torch.full((2, 2, 2), 0.05)
    layers = [("input.7.0", torch.stack([identity, expression], 1)),
              ("output.3.0", torch.stack([identity, expression], 1)),
              ("output.4.0", torch.stack([identity, expression], 1)[:, :, :1, :1])]  # a 1x1 layer: mask area-averaged
    groups = layer_groups(n for n, _ in layers)
    assert groups == ["input", "output"]
    # sample 2 has no expression word: only sample 1 counts for the expression token
    sums = attention_sums(layers, mask, torch.ones(2), torch.tensor([1.0, 0.0]), groups)
    values = summarize(sums, groups)
    # input: identity face (0.8 + 0.5) / 2; share in face 0.8 / 1.0 and 1.0; area (0.25 + 0.5) / 2
    assert values["attn/identity/input/face"] == pytest.approx(0.65)
    assert values["attn/area/input"] == pytest.approx(0.375)
    assert values["attn/identity/input/conc"] == pytest.approx(0.9 / 0.375)
    assert values["attn/expression/input/face"] == pytest.approx(0.05)
    assert values["attn/expression/input/conc"] == pytest.approx(0.25 / 0.25)
    # output: its two layers' samples averaged; at 1x1 the face is the mask's mean (0.25, 0.5), the
    # map 0.8, 0.5, so the share in the face is the face's area and the face value the map's
    assert values["attn/identity/output/face"] == pytest.approx((0.8 + 0.5 + 0.8 + 0.5) / 4)
    assert values["attn/identity/output/conc"] == pytest.approx(((0.8 + 1.0 + 0.25 + 0.5) / 4) / 0.375)
    # a step without identity samples logs nothing
    assert summarize(attention_sums(layers, mask, torch.zeros(2), torch.ones(2), groups), groups) == {}


def _step(identity: dict[str, float], expression: dict[str, float] | None = None) -> dict:
    values = {f"attn/identity/{g}/face": v for g, v in identity.items()}
    values.update({f"attn/expression/{g}/face": v for g, v in (expression or {}).items()})
    return values


def test_the_monitor_alarms_once_per_death_of_a_token_dead_in_every_layer_group():
    from portraitbooth_core.ecac.health import CollapseMonitor

    monitor = CollapseMonitor(1e-4, patience=3)
    dead, alive_in_one = {"input": 1e-10, "output": 1e-9}, {"input": 1e-10, "output": 0.3}
    assert monitor.observe(1, _step(alive_in_one)) == []  # one group still attends: alive
    assert monitor.observe(2, _step(dead)) == [] and monitor.observe(3, _step(dead)) == []
    assert monitor.observe(4, {}) == []  # no identity sample this step: neither counts nor breaks the streak
    assert monitor.observe(4, _step({"input": math.nan})) == []  # a diverged step's NaN: the same
    (alarm,) = monitor.observe(5, _step(dead, {"output": 0.05}))
    assert (alarm.step, alarm.token, alarm.streak) == (5, "identity", 3)
    assert "step 5: the identity token is dead" in alarm.describe() and "input 1e-10" in alarm.describe()
    assert monitor.observe(6, _step(dead)) == []  # once per death
    assert monitor.observe(7, _step(alive_in_one)) == []  # recovered ...
    assert [a.step for a in (monitor.observe(s, _step(dead)) for s in (8, 9, 10)) for a in a] == [10]  # ... died again
    assert CollapseMonitor(0.0, 1).observe(1, _step({"input": 0.0})) == []  # threshold 0: off


# -- the settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("line,words", [
    ("on_collapse=halt", "on_collapse: 'halt' is not one of warn, stop"),
    ("loc_floor=logit", "loc_floor: 'logit' is not one of paper, log"),
    ("collapse_threshold=2", "collapse_threshold: 2 is above the maximum 1; give a number in 0..1 (0: no alarm)"),
    ("collapse_patience=0", "collapse_patience: 0 is below the minimum 1; give a whole number in 1..10000000"),
])
def test_collapse_settings_are_refused_the_same_from_set_and_extra_settings(line, words):
    from training.__main__ import _config, parser
    from training.api import SettingsError, settings_from_text
    from training.config import SettingError

    with pytest.raises(SettingError) as from_cli:
        _config(parser().parse_args(["train", "--set", line]))
    with pytest.raises(SettingsError) as from_node:
        settings_from_text(line)
    assert str(from_cli.value).startswith(words), str(from_cli.value)
    assert str(from_node.value) == f"extra_settings line 1: {from_cli.value}"


def test_the_collapse_alarm_settings_do_not_stop_a_run_from_continuing():
    from training.run.ownership import RESULT_SETTINGS

    assert {"collapse_threshold", "collapse_patience", "on_collapse"}.isdisjoint(RESULT_SETTINGS)
    assert "loc_floor" in RESULT_SETTINGS  # another loss: another run


# -- real runs -------------------------------------------------------------------------------------

def test_the_alarm_is_quiet_on_a_healthy_run_that_logs_the_attention_everywhere(sd15_checkpoint, dataset_dir,
                                                                                 tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.run.metrics import read_metrics
    from training.run.trainer import Trainer

    t = Trainer(train_config(dataset_dir, tmp_path, steps=8, collapse_patience=PATIENCE, tensorboard=True))
    try:
        with caplog.at_level(logging.INFO, logger="portraitbooth.training"):
            t.run()
    finally:
        t.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert not any("alarm" in r for r in records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "dead" in r.getMessage()]
    faces = [v for r in records for k, v in r.items() if k.startswith("attn/identity/") and k.endswith("/face")]
    concs = [v for r in records for k, v in r.items() if k.startswith("attn/identity/") and k.endswith("/conc")]
    assert len(faces) >= 8 and len(concs) == len(faces)  # at least one layer group per step
    assert min(faces) > 10 * t.config.collapse_threshold and all(math.isfinite(c) and c > 0 for c in concs)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 8 and any("attn in face (share/x area): identity input " in line for line in lines)
    events = EventAccumulator(str(next((tmp_path / "tensorboard").glob("events.out.tfevents.*")))).Reload()
    assert any(tag.startswith("train/attn/identity/") and tag.endswith("/face") for tag in events.Tags()["scalars"])


def _identity_faces(record: dict) -> list[float]:
    return [v for k, v in record.items() if k.startswith("attn/identity/") and k.endswith("/face")]


@pytest.fixture
def node_input(tmp_path, recognizer_pack, dataset_dir):
    """ComfyUI's input folder pointed at a temp folder with the dataset and the stand-in recognizer."""
    import folder_paths

    old = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    shutil.copytree(recognizer_pack, folder / "packs" / recognizer_pack.name)
    shutil.copytree(dataset_dir, folder / "faces")
    folder_paths.set_input_directory(str(folder))
    yield folder
    folder_paths.set_input_directory(old)


def test_the_alarm_fires_on_a_run_made_to_collapse_and_the_dip_trainer_reports_it(node_input, sd15_checkpoint):
    import importlib

    import folder_paths

    load_pack()
    node_module = importlib.import_module("portraitbooth_pack_under_test.nodes.dip_trainer")
    run = f"collapse_{os.getpid()}"
    run_dir = os.path.join(folder_paths.get_output_directory(), node_module.RUNS, run)
    settings = "\n".join(f"{k}={v}" for k, v in COLLAPSE.items() if k != "mode") + f"\ncollapse_patience={PATIENCE}"
    target = None
    try:
        out = node_module.DIPTrainer.execute(
            ckpt_name=TEST_CHECKPOINT, dataset="faces", run_name=run, output_name=run, mode=COLLAPSE["mode"],
            steps=12, batch_size=2, grad_accum=1, learning_rate=1e-3, lora_rank=4, save_every=1000, seed=0,
            gradient_checkpointing=False, recognizer="packs/standin/w600k_r50.onnx", extra_settings=settings)
        _, name, report = out.args
        target = folder_paths.get_full_path("portraitbooth", name)
        records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        fired = [r for r in records if "alarm" in r]
        assert len(fired) == 1, [r.get("alarm") for r in records]  # warned once, and the run went on to the end
        (alarm,) = fired
        assert alarm["alarm"].startswith(f"step {alarm['step']}: the identity token is dead")
        assert "loc_floor=log" in alarm["alarm"] and "on_collapse=stop" in alarm["alarm"]
        measured = [_identity_faces(r) for r in records[:alarm["step"]] if _identity_faces(r)]
        # dead in every group for PATIENCE steps, and logged as the small numbers they are (not rounded to 0)
        assert all(0 < max(faces) < 1e-4 for faces in measured[-PATIENCE:]), measured[-PATIENCE:]
        assert max(measured[0]) > 1e-3  # and alive when the run began
        assert records[-1]["step"] == 12 and target is not None  # warn: trained to the end and exported
        assert alarm["alarm"] in report and "step 12 (new run)" in report
        assert "attention in the face at step 12" in out.ui["text"][0]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if target:
            os.unlink(target)


def test_on_collapse_stop_ends_the_command_line_run_with_its_checkpoint_and_the_fix(sd15_checkpoint, dataset_dir,
                                                                                   recognizer_pack, tmp_path):
    from conftest import MODELS_DIR

    settings = {"mode": COLLAPSE["mode"], "ecac_beta": 0, "ecac_lambda": 10, "collapse_patience": PATIENCE,
                "on_collapse": "stop", "steps": 40, "micro_batch": 2, "lr": 1e-3, "save_every": 1000,
                "num_workers": 0}
    args = ["train", "--checkpoint", MODELS_DIR / "checkpoints" / TEST_CHECKPOINT, "--dataset", dataset_dir,
            "--output", tmp_path / "run", *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]]
    result = subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]  # one line a person can act on
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = records[-1]["step"]
    assert "alarm" in records[-1] and step < 40  # stopped at the alarm
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*.pt")] == [f"step-{step:08d}.pt"]
    assert not list((tmp_path / "run").glob("*.safetensors"))  # no weight file from a collapsed run
    assert f"on_collapse=stop: the run in {tmp_path / 'run'} stopped at step {step} of 40" in result.stderr
    assert "the identity token is dead" in result.stderr and "loc_floor=log" in result.stderr
