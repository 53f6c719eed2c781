"""Training configuration (file + command-line overrides) and the dataset CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from training_fixtures import *  # noqa: F401,F403


def test_file_then_overrides(tmp_path):
    from training.config import load_config

    path = tmp_path / "train.toml"
    path.write_text('mode = "full"\nsteps = 50\nlr = 2e-5\n[extra]\nnote = "first run"\n')
    cfg = load_config(path, ["steps=7", "gradient_checkpointing=true", "loc_layers=all", 'extra={"a": 1}'])
    assert (cfg.mode, cfg.steps, cfg.lr, cfg.gradient_checkpointing, cfg.loc_layers) == ("full", 7, 2e-5, True, "all")
    assert cfg.extra == {"a": 1}
    assert load_config(None, ["lr=1"]).lr == 1.0  # ints where floats are expected are fine
    with pytest.raises(ValueError, match="unknown training setting.*stepz"):
        load_config(None, ["stepz=3"])
    with pytest.raises(ValueError, match="^mode: 'dreambooth' is not one of full, lora, frozen"):
        load_config(None, ["mode=dreambooth"])
    with pytest.raises(ValueError, match="steps: expected int"):
        load_config(None, ["steps=many"])


def test_8bit_adam_without_bitsandbytes_names_the_package(sd15_checkpoint, dataset_dir, tmp_path):
    from portraitbooth_core.optional import MissingDependencyError, available
    from training.run.trainer import Trainer
    from training_fixtures import train_config

    if available("bitsandbytes"):
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(MissingDependencyError, match="pip install bitsandbytes"):
        Trainer(train_config(dataset_dir, tmp_path, optimizer="adamw8bit"))


def test_build_cli_prints_the_report(people_dir, recognizer_pack, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "training", "build", str(people_dir), str(out), "--pack",
                             str(recognizer_pack), "--detector", "retinaface", "--recognizer", "arcface",
                             "--provider", "cpu", "--resolution", "64", "--caption-template",
                             "a photo of a {word}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dataset: 5 samples" in result.stdout
    assert "skipped obama/corrupt.jpg: corrupt or unreadable image" in result.stdout
    assert json.loads((out / "index.json").read_text())["samples"] == 5
