"""A run folder belongs to the run that made it (issue 22, items 5 and 6).

Another owner may neither continue nor prune a run, and a run continues only with the
settings that change its result, unless `overwrite` is on; what overwrite then does (take
the run over, start it over, prune its checkpoints) is said in the output. In-process
through training.api, the command line, and one DIP Trainer graph on a real server.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODELS_DIR, REPO, TEST_CHECKPOINT
from training_fixtures import *  # noqa: F401,F403

# The settings that never change what a run trains; every other TrainConfig field must
# stop a resume. Kept here as well as in training/run/ownership.py so that moving a
# setting out of the checked list is a visible decision, while a new setting is checked
# without anyone listing it.
LOGISTICS = {"output", "steps", "num_workers", "prefetch_factor", "gradient_checkpointing", "log_every",
             "save_every", "keep_last", "validate_every", "validation_steps", "validation_cfg", "tensorboard",
             "export_every", "export_name", "extra",
             # the collapse alarm watches the run; changing it (stop -> warn) changes no result
             "collapse_threshold", "collapse_patience", "on_collapse"}


def result_settings() -> list[str]:
    from training.config import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in LOGISTICS]


def settings(data_dir: Path, run_dir: Path, **over) -> dict:
    """The victim run's settings (3 steps, a checkpoint each), changed by `over`."""
    base = {"checkpoint": str(MODELS_DIR / "checkpoints" / TEST_CHECKPOINT), "dataset": str(data_dir),
            "output": str(run_dir), "steps": 3, "micro_batch": 1, "grad_accum": 2, "lr": 1e-3, "save_every": 1,
            "lora_rank": 4, "lora_alpha": 4.0, "num_workers": 0}
    return {**base, **over}


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder: (size, mtime_ns), to show that nothing changed."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_names(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "checkpoints").glob("step-*.pt"))


@pytest.fixture(scope="module")
def legit_run(sd15_checkpoint, dataset_dir, recognizer_pack, tmp_path_factory) -> Path:
    """Run `legit1`: 3 steps, checkpoints 1-3 (keep_last 3), made by a script (no owner
    named: its folder name is its owner)."""
    from training import api

    folder = tmp_path_factory.mktemp("legit") / "runs" / "legit1"
    api.run_training(settings(dataset_dir, folder))
    assert checkpoint_names(folder) == ["step-00000001.pt", "step-00000002.pt", "step-00000003.pt"]
    return folder


@pytest.fixture
def victim(legit_run, tmp_path) -> Path:
    """A fresh copy of run `legit1` for one test to act on."""
    folder = tmp_path / "runs" / "legit1"
    shutil.copytree(legit_run, folder)
    return folder


def test_the_checked_settings_are_every_setting_but_a_few_logistics_ones():
    from training import api
    from training.run import ownership

    assert list(ownership.RESULT_SETTINGS) == result_settings() == list(api.RESUME_SETTINGS)
    assert set(ownership.LOGISTICS) == LOGISTICS
    for name in ("checkpoint", "dataset", "seed", "micro_batch", "grad_accum", "lr", "mode", "lora_rank"):
        assert name in ownership.RESULT_SETTINGS


def test_another_owners_run_is_neither_continued_nor_pruned_without_overwrite(victim, dataset_dir):
    from training import api

    before = listing(victim)
    theirs = settings(dataset_dir, victim, steps=4, keep_last=1)
    for call in (lambda: api.check_resume(theirs, owner="mine", node_words=True),
                 lambda: api.run_training(theirs, owner="mine", node_words=True)):
        with pytest.raises(api.ResumeError) as caught:
            call()
        text = str(caught.value)
        assert "belongs to output_name 'legit1'" in text and "not 'mine'" in text, text
        assert "prune its checkpoints (steps 1, 2, 3)" in text, text
        assert "use another output_name" in text and "turn on overwrite to take this run over" in text, text
    assert listing(victim) == before  # nothing deleted, nothing written (not even run.json)
    assert api.check_resume(theirs, owner="legit1") == 3  # its owner continues it
    (victim / "run.json").unlink()  # a run of an older version: its folder name is its owner
    assert api.check_resume(theirs, owner="legit1") == 3
    with pytest.raises(api.ResumeError, match="belongs to output_name 'legit1' \\(recorded in its folder name"):
        api.check_resume(theirs, owner="mine")


def test_with_overwrite_another_owners_run_is_taken_over_and_the_output_says_so(victim, dataset_dir):
    from training import api

    result = api.run_training(settings(dataset_dir, victim, steps=4, keep_last=1), owner="mine", overwrite=True)
    assert result.step == 4 and checkpoint_names(victim) == ["step-00000004.pt"]
    notes = "\n".join(result.notes)
    assert f"took over the run in {victim} from output_name 'legit1' at step 3" in notes, notes
    assert ("keep_last=1 deleted the checkpoints of output_name 'legit1': step-00000001.pt, step-00000002.pt, "
            "step-00000003.pt") in notes, notes
    record = json.loads((victim / "run.json").read_text())
    assert record["output_name"] == "mine" and record["history"][-1]["event"] == "taken over"
    with pytest.raises(api.ResumeError, match="belongs to output_name 'mine' \\(recorded in its run.json\\)"):
        api.check_resume(settings(dataset_dir, victim, steps=5), owner="legit1")


def changed(name: str, value):
    """Another valid value of a setting, and any setting it needs to stay valid."""
    choices = {"mode": "frozen", "optimizer": "adamw8bit", "precision": "fp32", "dip_region": "full",
               "precomputed": "off", "loc_layers": "all", "recognizer_feature": "stage3", "loc_floor": "log"}
    if name == "stage0_steps":
        return {name: 5, "stage0_teacher": "teacher_postfuse.safetensors"}
    if name in choices:
        return {name: choices[name]}
    if isinstance(value, bool):
        return {name: not value}
    if isinstance(value, int):
        return {name: value + 1}
    if isinstance(value, float):
        return {name: value / 2 if value else 0.001}
    if isinstance(value, str):
        return {name: f"{value}_other" if value else "other.safetensors"}
    raise AssertionError(f"no changed value for {name}={value!r}: add one to changed()")


@pytest.mark.parametrize("name", result_settings())
def test_resume_with_a_result_changing_setting_changed_is_refused_naming_it(legit_run, dataset_dir, name):
    from training import api
    from training.config import load_config

    recorded = load_config(None, settings(dataset_dir, legit_run)).to_dict()[name]
    change = changed(name, recorded)
    before = listing(legit_run)
    with pytest.raises(api.ResumeError) as caught:
        api.check_resume(settings(dataset_dir, legit_run, **change))
    text = str(caught.value)
    now = load_config(None, settings(dataset_dir, legit_run, **change)).to_dict()[name]
    assert f"{name} {recorded!r} -> {now!r}" in text and "(recorded -> now)" in text, text
    assert "pass the recorded values to continue it" in text and "overwrite=True to start this run over" in text
    assert listing(legit_run) == before


def test_node_words_name_the_node_inputs_and_logistics_changes_continue(legit_run, dataset_dir, tmp_path):
    from training import api

    other = tmp_path / "other.safetensors"
    with pytest.raises(api.ResumeError) as caught:
        api.check_resume(settings(dataset_dir, legit_run, checkpoint=str(other), dataset=str(tmp_path), seed=7,
                                  micro_batch=2, lr=2e-3), owner="legit1", node_words=True)
    text = str(caught.value)
    for said in (f"ckpt_name (checkpoint) '{MODELS_DIR / 'checkpoints' / TEST_CHECKPOINT}' -> '{other}'",
                 f"dataset '{dataset_dir}' -> '{tmp_path}'", "seed 0 -> 7", "batch_size (micro_batch) 1 -> 2",
                 "learning_rate (lr) 0.001 -> 0.002", "another output_name (with run_name empty)",
                 "turn on overwrite to start this run over"):
        assert said in text, (said, text)
    assert "grad_accum" not in text  # unchanged
    # Steps (extending is continuing), loading, logging and saving do not change the result;
    # nor does another split of the same global batch (as on another number of ranks).
    same = settings(dataset_dir, legit_run, steps=9, keep_last=1, num_workers=2, prefetch_factor=4, log_every=5,
                    save_every=2, gradient_checkpointing=True, micro_batch=2, grad_accum=1,
                    checkpoint=os.path.relpath(MODELS_DIR / "checkpoints" / TEST_CHECKPOINT))
    assert api.check_resume(same, owner="legit1", node_words=True) == 3


def test_overwrite_starts_a_run_with_other_settings_over_and_says_so(victim, dataset_dir):
    from training import api

    before = listing(victim)
    with pytest.raises(api.ResumeError, match=r"seed 0 -> 1 \(recorded -> now\)"):
        api.run_training(settings(dataset_dir, victim, seed=1, steps=1))
    assert listing(victim) == before
    assert api.check_resume(settings(dataset_dir, victim, seed=1, steps=1), overwrite=True) is None  # starts over
    result = api.run_training(settings(dataset_dir, victim, seed=1, steps=1), owner="mine", overwrite=True)
    notes = "\n".join(result.notes)
    assert f"started the run in {victim} (the run of output_name 'legit1') over" in notes, notes
    assert "(seed 0 -> 1)" in notes, notes
    assert "deleted 3 checkpoint(s) (steps 1, 2, 3) and its logs" in notes, notes
    assert result.step == 1 and checkpoint_names(victim) == ["step-00000001.pt"]
    assert [r["step"] for r in result.metrics] == [1]  # the old run's steps are not plotted
    record = json.loads((victim / "run.json").read_text())
    assert record["settings"]["seed"] == 1 and record["output_name"] == "mine"


def test_the_command_line_refuses_other_settings_and_overwrite_starts_over(victim, dataset_dir):
    args = [sys.executable, "-m", "training", "train", "--device", "cpu", "--checkpoint",
            str(MODELS_DIR / "checkpoints" / TEST_CHECKPOINT), "--dataset", str(dataset_dir), "--output", str(victim)]
    sets = [f"--set={k}={json.dumps(v)}" for k, v in settings(dataset_dir, victim).items()
            if k not in ("checkpoint", "dataset", "output")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = listing(victim)
    refused = subprocess.run([*args, *sets, "--set", "seed=1", "--set", "steps=4"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"error: --output {victim}: this run was trained with other settings" in refused.stderr, refused.stderr
    assert "seed 0 -> 1 (recorded -> now)" in refused.stderr and "or --overwrite to start this run over" in \
        refused.stderr, refused.stderr[-3000:]
    assert listing(victim) == before
    fresh = subprocess.run([*args, *sets, "--set", "seed=1", "--set", "steps=1", "--overwrite"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "[train] overwrite: started the run in" in fresh.stdout and "(seed 0 -> 1)" in fresh.stdout, fresh.stdout
    assert checkpoint_names(victim) == ["step-00000001.pt"]


@pytest.mark.slow  # a server of its own
def test_a_dip_trainer_graph_cannot_continue_or_prune_another_users_run(start_server, dataset_dir, recognizer_pack):
    from headless.client import ComfyError

    server = start_server()
    shutil.copytree(dataset_dir, server.input_dir / "faces")
    shutil.copytree(recognizer_pack, server.input_dir / "packs" / recognizer_pack.name, dirs_exist_ok=True)
    owner, other = f"legit1_{os.getpid()}", f"mine_{os.getpid()}"
    targets = [MODELS_DIR / "portraitbooth" / f"{n}.safetensors" for n in (owner, other)]

    def graph(output_name: str, **over) -> dict:
        inputs = {"ckpt_name": TEST_CHECKPOINT, "dataset": "faces", "run_name": owner, "output_name": output_name,
                  "mode": "lora", "steps": 3, "batch_size": 1, "grad_accum": 1, "learning_rate": 1e-3,
                  "lora_rank": 4, "save_every": 1, "seed": 0, "gradient_checkpointing": False,
                  "extra_settings": "", "recognizer": f"packs/{recognizer_pack.name}/w600k_r50.onnx"} | over
        return {"1": {"class_type": "PortraitBoothDIPTrainer", "inputs": inputs}}

    try:
        server.client.run(graph(owner), timeout=600)
        run = server.output_dir / "portraitbooth_runs" / owner
        assert checkpoint_names(run) == ["step-00000001.pt", "step-00000002.pt", "step-00000003.pt"]
        before = listing(run)
        with pytest.raises(ComfyError) as caught:  # run_name names another user's run
            server.client.run(graph(other, steps=4, extra_settings="keep_last=1"), timeout=600)
        text = str(caught.value)
        assert f"run_name '{owner}': this run folder belongs to output_name '{owner}'" in text, text
        assert "turn on overwrite to take this run over" in text, text
        assert listing(run) == before and not targets[1].exists()
        taken = server.client.run(graph(other, steps=4, extra_settings="keep_last=1", overwrite=True), timeout=600)
        report = "\n".join(taken.texts("1"))
        assert f"took over the run in {run} from output_name '{owner}' at step 3" in report, report
        assert f"keep_last=1 deleted the checkpoints of output_name '{owner}'" in report, report
        assert f"run_name '{owner}': step 4 (continued from step 3)" in report, report
        assert checkpoint_names(run) == ["step-00000004.pt"]
    finally:
        for target in targets:
            target.unlink(missing_ok=True)
