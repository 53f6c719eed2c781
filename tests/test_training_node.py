"""The DIP Trainer node (in-process) and the path rule every path-taking node shares."""
from __future__ import annotations

import importlib
import json
import os
import shutil

import pytest
import torch

from conftest import TEST_CHECKPOINT, load_pack
from training_fixtures import *  # noqa: F401,F403
from training_fixtures import steps_with_identity_loss


@pytest.fixture(scope="module")
def pack_modules():
    load_pack()
    return (importlib.import_module("portraitbooth_pack_under_test.nodes.paths"),
            importlib.import_module("portraitbooth_pack_under_test.nodes.dip_trainer"))


# The stand-in recognizer of the test datasets, as a node's `recognizer` input: the
# datasets' recorded pack is not in ComfyUI's models folder, and without a recognizer the
# node refuses to train (no silent switch-off of the identity loss).
RECOGNIZER = "packs/standin/w600k_r50.onnx"


@pytest.fixture
def input_dir(tmp_path, monkeypatch, recognizer_pack):
    """ComfyUI's input folder pointed at a temp folder for one test, the stand-in
    recognizer inside it at RECOGNIZER."""
    import folder_paths

    old = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    folder.mkdir()
    shutil.copytree(recognizer_pack, folder / "packs" / recognizer_pack.name)
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
                  gradient_checkpointing=True, extra_settings="log_every=1",
                  recognizer=RECOGNIZER)
    target = None
    try:
        curve, name, report = node.execute(steps=2, **common).args
        assert report == f"run_name '{run_name}': step 2 (new run); weight file {name}"
        target = folder_paths.get_full_path("portraitbooth", name)
        assert name == f"{run_name}.safetensors" and target is not None
        assert curve.shape[0] == 1 and curve.shape[-1] == 3 and float(curve.std()) > 0
        assert load_portraitbooth(target).info.training["steps"] == 2
        _, name, report = node.execute(steps=3, overwrite=True, **common).args  # same run: continues at step 2
        assert report == f"run_name '{run_name}': step 3 (continued from step 2); weight file {name}"
        assert load_portraitbooth(target).info.training["steps"] == 3
        steps = [line for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        assert len(steps) == 3  # steps 1, 2, then only 3: nothing was trained twice
        # At the recipe's R_t = 250, L_id on exactly the steps that drew it (seed 0: step 1 only).
        from training.config import TrainConfig

        expected = steps_with_identity_loss(TrainConfig(seed=0, micro_batch=2), 3)
        assert ["id" in json.loads(line) for line in steps] == expected and expected[0]
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


def _common(run: str, output: str, **over) -> dict:
    return dict(ckpt_name=TEST_CHECKPOINT, dataset="faces", run_name=run, output_name=output, mode="lora",
                steps=1, batch_size=1, grad_accum=1, learning_rate=1e-3, lora_rank=4, save_every=1, seed=0,
                gradient_checkpointing=False, extra_settings="", recognizer=RECOGNIZER) | over


@pytest.mark.parametrize("field,value", [
    ("output_name", ".."), ("output_name", "a\x00b"), ("output_name", "x" * 5000), ("output_name", "../evil"),
    ("output_name", "sub/name"), ("output_name", ".hidden"), ("run_name", ".."), ("run_name", "a/b"),
    ("run_name", "r\x00"), ("run_name", "y" * 5000), ("dataset", "faces\x00"), ("recognizer", "a\x00.onnx"),
    ("mode", "sideways"), ("ckpt_name", "../../etc/passwd")])
def test_invalid_names_are_refused_before_training_naming_the_input(pack_modules, input_dir, field, value):
    import folder_paths

    paths, node_module = pack_modules
    runs = os.path.join(folder_paths.get_output_directory(), node_module.RUNS)
    before = set(os.listdir(runs)) if os.path.isdir(runs) else set()
    with pytest.raises((ValueError, PermissionError)) as caught:
        node_module.DIPTrainer.execute(**_common(f"bad_{os.getpid()}", f"bad_{os.getpid()}", **{field: value}))
    assert str(caught.value).startswith(field), str(caught.value)[:300]
    assert "embedded null byte" not in str(caught.value)
    after = set(os.listdir(runs)) if os.path.isdir(runs) else set()
    assert after == before  # nothing was created: refused before training


def test_extra_settings_errors_are_in_node_words(pack_modules, input_dir):
    _, node_module = pack_modules
    with pytest.raises(ValueError, match=r"^extra_settings line 2: 'steps 5' is not a setting; write one setting "
                                         r"per line as name=value") as caught:
        node_module.DIPTrainer.execute(**_common("x", "x", extra_settings="# notes\nsteps 5\n"))
    assert "--set" not in str(caught.value)
    with pytest.raises(ValueError, match=r"^extra_settings line 3: unknown training setting\(s\): nope"):
        node_module.DIPTrainer.execute(**_common("x", "x", extra_settings="log_every=1\n\nnope=2"))


def test_overwrite_refused_then_allowed_and_resume_checks_saved_settings(pack_modules, input_dir, dataset_dir,
                                                                         sd15_checkpoint):
    import folder_paths

    from portraitbooth_core.weights.file import load_portraitbooth

    _, node_module = pack_modules
    node = node_module.DIPTrainer
    shutil.copytree(dataset_dir, input_dir / "faces")
    name = f"overwrite_{os.getpid()}"
    target = os.path.join(folder_paths.get_folder_paths("portraitbooth")[0], f"{name}.safetensors")
    run_dir = os.path.join(folder_paths.get_output_directory(), node_module.RUNS, name)  # run name = output name
    shutil.rmtree(run_dir, ignore_errors=True)
    with open(target, "wb") as f:
        f.write(b"someone else's model")
    try:
        with pytest.raises(FileExistsError, match=rf"^output_name: models/portraitbooth/{name}.safetensors already "
                                                  r"exists.*turn on overwrite"):
            node.execute(**_common("", name))
        assert open(target, "rb").read() == b"someone else's model" and not os.path.exists(run_dir)
        _, written, _ = node.execute(**_common("", name), overwrite=True).args
        assert written == f"{name}.safetensors" and load_portraitbooth(target).info.training["steps"] == 1
        assert os.path.isdir(os.path.join(run_dir, "checkpoints"))  # the run folder is the output name's
        # Said before the weight file's own check: overwrite would start this run over.
        with pytest.raises(ValueError, match=r"^run_name '.*': this run was trained with other settings, so it "
                                             r"cannot continue with these: lora_rank 4 -> 8; lora_alpha 4.0 -> 8.0 "
                                             r"\(recorded -> now\).*another output_name.*turn on overwrite to start "
                                             r"this run over"):
            node.execute(**_common("", name, steps=2, lora_rank=8))
        with pytest.raises(ValueError, match=r"mode 'lora' -> 'frozen' \(recorded -> now\)"):
            node.execute(**_common("", name, steps=2, mode="frozen"))
        newest = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))[-1]
        with open(os.path.join(run_dir, "checkpoints", newest), "wb") as f:
            f.write(b"not a checkpoint")
        with pytest.raises(ValueError, match=rf"newest checkpoint .*{newest} cannot be read.*Delete that file"):
            node.execute(**_common("", name, steps=2), overwrite=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if os.path.exists(target):
            os.unlink(target)


def test_a_dataset_naming_files_outside_itself_is_refused_before_training(pack_modules, input_dir, dataset_dir):
    import json

    import folder_paths

    _, node_module = pack_modules
    shutil.copytree(dataset_dir, input_dir / "evil")
    index = json.loads((input_dir / "evil" / "index.json").read_text())
    index["shards"][0]["name"] = "../../../../etc/passwd"
    (input_dir / "evil" / "index.json").write_text(json.dumps(index))
    name = f"evil_{os.getpid()}"
    with pytest.raises(PermissionError, match=r"^dataset: .*index.json shards\[0\].name: '\.\./\.\./\.\./\.\./etc/"
                                              r"passwd.json' leaves its folder"):
        node_module.DIPTrainer.execute(**_common(name, name, dataset="evil"))
    assert not os.path.exists(os.path.join(folder_paths.get_output_directory(), node_module.RUNS, name))


def test_a_dataset_whose_recognizer_is_missing_is_refused_naming_the_recognizer_input(pack_modules, input_dir,
                                                                                      dataset_dir):
    import folder_paths

    _, node_module = pack_modules
    shutil.copytree(dataset_dir, input_dir / "faces")
    name = f"norec_{os.getpid()}"
    with pytest.raises(ValueError) as caught:  # the recorded pack is not under ComfyUI's models/insightface
        node_module.DIPTrainer.execute(**_common(name, name, recognizer=""))
    text = str(caught.value)
    assert text.startswith("recognizer: the dataset ") and "recognizer standin/w600k_r50.onnx" in text, text
    assert "set the node input `recognizer` to that ONNX file (w600k_r50.onnx" in text
    assert "put `id_weight=0` in extra_settings" in text and "--set" not in text
    assert not os.path.exists(os.path.join(folder_paths.get_output_directory(), node_module.RUNS, name))
    api = importlib.import_module("portraitbooth_pack_under_test.training.api")
    settings = {"dataset": str(input_dir / "faces"), "output": str(input_dir / "run"), "id_weight": 0.0}
    assert api.check_identity_loss(settings, [], node=True) is None  # explicit id_weight=0: allowed
    settings["id_weight"] = 1.0
    with pytest.raises(api.IdentityLossError, match="not found under"):
        api.check_identity_loss(settings, [], node=True)


def test_learning_rate_zero_means_the_mode_default(pack_modules):
    _, node_module = pack_modules
    rate = next(i for i in node_module.DIPTrainer.define_schema().inputs if i.id == "learning_rate")
    assert rate.default == 0.0 and "lora and frozen 1e-4, full 1e-5" in rate.tooltip
