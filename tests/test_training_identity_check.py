"""No silent loss switches: a dataset that cannot feed DIP's identity loss stops `train`
before training with the fix, unless id_weight=0 is set; the builder never resumes a
dataset with another face encoder."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from standins_face import build_arcface_onnx
from training_fixtures import *  # noqa: F401,F403
from training_fixtures import build_settings, train_config


@pytest.fixture(scope="module")
def dlib_dataset(tmp_path_factory, people_dir) -> Path:
    """What `python -m training build` without --pack writes: dlib 128-d embeddings."""
    from portraitbooth_core.face import build_encoder
    from training.build.builder import DatasetBuilder

    out = tmp_path_factory.mktemp("dlib_dataset")
    encoder = build_encoder(None, provider="cpu")  # RetinaFace + dlib: the zero-download default
    report = DatasetBuilder(people_dir, out, encoder, build_settings(shard_size=2), progress=False).build()
    assert report["samples"] == 5, report
    face = json.loads((out / "index.json").read_text())["face_encoder"]
    assert face["kind"].startswith("dlib") and face["dim"] == 128 and face["recognizer"] is None
    return out


def test_train_cli_refuses_a_dlib_build_naming_the_fix(dlib_dataset, sd15_checkpoint, tmp_path):
    cfg = train_config(dlib_dataset, tmp_path / "run", mode="frozen", steps=1)
    config = tmp_path / "train.json"
    config.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "training", "train", "--config", str(config), "--device", "cpu"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    err = result.stderr
    assert "error: " in err and "dlib:resnet128 face encoder (128-d embeddings)" in err, err[-2000:]
    assert "--pack models/insightface/models/antelopev2" in err and "--set id_weight=0" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_dlib_build_trains_when_id_weight_is_zero_with_one_info_line(dlib_dataset, sd15_checkpoint, tmp_path,
                                                                     caplog):
    from training.run.dip_check import IdentityLossError
    from training.run.trainer import Trainer

    with pytest.raises(IdentityLossError, match="no differentiable recognizer"):
        Trainer(train_config(dlib_dataset, tmp_path / "refused", mode="frozen", steps=1))
    caplog.set_level(logging.INFO, logger="portraitbooth.training")
    t = Trainer(train_config(dlib_dataset, tmp_path / "run", mode="frozen", steps=1, id_weight=0.0))
    try:
        assert t.module._frozen[1] is None
        values = t.train_step()
    finally:
        t.close()
    assert "id" not in values and values["total"] > 0
    said = [r.getMessage() for r in caplog.records if "identity loss" in r.getMessage()]
    assert said == ["id_weight=0: training without the identity loss (DIP)"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "L_id" in r.getMessage()]


def test_a_recognizer_that_is_not_found_stops_the_trainer(dataset_dir, tmp_path):
    from training.run import trainer as trainer_module
    from training.run.dip_check import IdentityLossError

    opened = []
    original = trainer_module.load_models
    trainer_module.load_models = lambda *a: opened.append("models")  # must not be reached
    try:
        with pytest.raises(IdentityLossError) as caught:
            trainer_module.Trainer(train_config(dataset_dir, tmp_path / "run"),
                                   recognizer_roots=[tmp_path / "no_packs_here"])
    finally:
        trainer_module.load_models = original
    text = str(caught.value)
    assert "recognizer standin/w600k_r50.onnx" in text and "not found under" in text
    assert "'standin' under models/insightface/models" in text
    assert "--set recognizer=/path/to/w600k_r50.onnx" in text and "--set id_weight=0" in text
    assert opened == []  # refused before any model was loaded


def test_a_recognizer_with_other_embeddings_than_the_dataset_is_refused(dataset_dir, tmp_path, sd15_checkpoint):
    from training.run.dip_check import IdentityLossError
    from training.run.trainer import Trainer

    other = build_arcface_onnx(tmp_path / "other" / "r128.onnx", dim=128)
    with pytest.raises(IdentityLossError, match=r"gives 128-d embeddings, but the dataset's index.json records "
                                                r"512-d ones from arcface:standin/w600k_r50.onnx"):
        Trainer(train_config(dataset_dir, tmp_path / "run", recognizer=str(other)))
    with pytest.raises(IdentityLossError, match=r"recognizer '.*missing.onnx' is not a file"):
        Trainer(train_config(dataset_dir, tmp_path / "run", recognizer=str(tmp_path / "missing.onnx")))


def test_builder_refuses_to_resume_with_another_face_encoder(tmp_path, people_dir, train_encoder):
    from portraitbooth_core.face import build_encoder
    from training.build.settings import STATE
    from training.build.builder import DatasetBuilder

    src = tmp_path / "src"
    shutil.copytree(people_dir / "obama", src / "obama")
    out = tmp_path / "out"
    DatasetBuilder(src, out, train_encoder, build_settings(), progress=False).build()
    state = json.loads((out / STATE).read_text())
    assert state["identity"]["face_encoder"] == {
        "kind": "arcface:standin/w600k_r50.onnx", "dim": 512, "recognizer": {"pack": "standin", "file": "w600k_r50.onnx"},
        "detector": "retinaface", "det_size": 640, "masks": "fallback", "parsing": None}
    shutil.copytree(people_dir / "biden", src / "biden")  # more people: the next build continues
    dlib = build_encoder(None, provider="cpu")
    with pytest.raises(ValueError) as caught:
        DatasetBuilder(src, out, dlib, build_settings(), progress=False).build()
    text = str(caught.value)
    assert "face_encoder.kind: \"arcface:standin/w600k_r50.onnx\" recorded, \"dlib:resnet128\" now" in text
    assert "face_encoder.dim: 512 recorded, 128 now" in text
    assert "face_encoder.recognizer: {\"file\": \"w600k_r50.onnx\", \"pack\": \"standin\"} recorded, null now" in text
    from training.build.settings import BuildSettings
    from training.build.face_crops import CropSettings

    other = BuildSettings(CropSettings(resolution=64, min_face=40), caption_template="a photo of a {word}")
    with pytest.raises(ValueError, match=r"settings.crops.min_face: 32 recorded, 40 now"):
        DatasetBuilder(src, out, train_encoder, other, progress=False).build()
    report = DatasetBuilder(src, out, train_encoder, build_settings(), progress=False).build()  # same encoder: resumes
    assert report["people"] == 2


def test_builder_resumes_a_state_written_before_the_encoder_was_recorded(tmp_path, people_dir, train_encoder):
    from training.build.settings import STATE
    from training.build.builder import DatasetBuilder

    src = tmp_path / "src"
    shutil.copytree(people_dir / "obama", src / "obama")
    out = tmp_path / "out"
    DatasetBuilder(src, out, train_encoder, build_settings(), progress=False).build()
    state = json.loads((out / STATE).read_text())
    state.pop("identity")
    state["fingerprint"] = build_settings().fingerprint()  # what older versions wrote
    (out / STATE).write_text(json.dumps(state))
    shutil.copytree(people_dir / "biden", src / "biden")
    assert DatasetBuilder(src, out, train_encoder, build_settings(), progress=False).build()["people"] == 2
    assert "identity" in json.loads((out / STATE).read_text())
