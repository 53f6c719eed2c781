"""The DIP Trainer node (in-process) and the path rule every path-taking node shares."""
from __future__ import annotations

import importlib
import os
import shutil

import pytest
import torch

from conftest import TEST_CHECKPOINT, load_pack
from training_fixtures import *  # noqa: F401,F403


@pytest.fixture(scope="module")
def pack_modules():
    load_pack()
    return (importlib.import_module("portraitbooth_pack_under_test.nodes.paths"),
            importlib.import_module("portraitbooth_pack_under_test.nodes.training"))


@pytest.fixture
def input_dir(tmp_path, monkeypatch):
    """ComfyUI's input folder pointed at a temp folder for one test."""
    import folder_paths

    old = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    folder.mkdir()
    folder_paths.set_input_directory(str(folder))
    monkeypatch.delenv("PORTRAITBOOTH_ALLOW_ANY_PATH", raising=False)
    yield folder
    folder_paths.set_input_directory(old)


def test_paths_outside_comfyui_folders_are_refused_unless_allowed(pack_modules, input_dir, tmp_path, monkeypatch):
    paths, _ = pack_modules
    (input_dir / "data").mkdir()
    assert paths.checked_path("data", "dataset") == (input_dir / "data").resolve()  # relative: inside input/
    assert paths.checked_path(str(input_dir / "data"), "dataset") == (input_dir / "data").resolve()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (input_dir / "link").symlink_to(outside)
    import folder_paths

    custom_nodes = folder_paths.get_folder_paths("custom_nodes")[0]
    for bad in ("/etc", "../elsewhere", "data/../../elsewhere", "link", str(outside), custom_nodes):
        with pytest.raises(paths.PathNotAllowedError, match="PORTRAITBOOTH_ALLOW_ANY_PATH=1"):
            paths.checked_path(bad, "dataset")
    monkeypatch.setenv("PORTRAITBOOTH_ALLOW_ANY_PATH", "1")
    assert paths.checked_path(str(outside), "dataset") == outside.resolve()


def test_dip_trainer_node_trains_continues_and_saves_into_models(pack_modules, input_dir, dataset_dir,
                                                                 sd15_checkpoint, tmp_path):
    import folder_paths

    from portraitbooth_core.weights.file import load_portraitbooth

    _, node_module = pack_modules
    node = node_module.DIPTrainer
    schema = node.define_schema()
    assert schema.node_id == "PortraitBoothDIPTrainer" and schema.display_name == "DIP Trainer"
    assert schema.category == "PortraitBooth/training"
    shutil.copytree(dataset_dir, input_dir / "faces")
    run_name = f"test_{os.getpid()}"
    run_dir = os.path.join(folder_paths.get_output_directory(), node_module.RUNS, run_name)
    common = dict(ckpt_name=TEST_CHECKPOINT, dataset="faces", run_name=run_name, output_name=run_name, mode="lora",
                  batch_size=2, grad_accum=1, learning_rate=1e-3, lora_rank=4, save_every=1, seed=0,
                  gradient_checkpointing=True, extra_settings="id_max_timestep=999\nlog_every=1")
    target = None
    try:
        curve, name = node.execute(steps=2, **common).args
        target = folder_paths.get_full_path("portraitbooth", name)
        assert name == f"{run_name}.safetensors" and target is not None
        assert curve.shape[0] == 1 and curve.shape[-1] == 3 and float(curve.std()) > 0
        assert load_portraitbooth(target).info.training["steps"] == 2
        _, name = node.execute(steps=3, **common).args  # same run: continues at step 2
        assert load_portraitbooth(target).info.training["steps"] == 3
        steps = [line for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        assert len(steps) == 3  # steps 1, 2, then only 3: nothing was trained twice
        assert torch.is_inference_mode_enabled() is False
        paths, _ = pack_modules
        with pytest.raises(paths.PathNotAllowedError, match="outside ComfyUI's input, output and models"):
            node.execute(steps=1, **{**common, "dataset": str(tmp_path)})
        with pytest.raises(ValueError, match="may not set dataset"):
            node.execute(steps=1, **{**common, "extra_settings": f"dataset=\"{tmp_path}\""})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if target:
            os.unlink(target)
