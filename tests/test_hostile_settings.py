"""Hostile settings (issue 22, round 2 of the hostile graphs).

Every training setting has one range (training/config.py LIMITS), checked the same way
whichever way a value arrives: the DIP Trainer's widgets (whose min, max and default are
that range), its extra_settings, and the command line's TOML/JSON config and --set. The
cases are generated from LIMITS, so a setting added later is covered. lora_targets is
matched without backtracking, an interrupt stops a DIP Trainer run within a step, and
each refusal names its input once.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import time

import pytest

from conftest import TEST_CHECKPOINT
from headless.client import ComfyError
from training_fixtures import *  # noqa: F401,F403


def _numeric() -> list[str]:
    from training.config import KINDS

    return [name for name, kind in KINDS.items() if kind in (int, float)]


def _bad_numbers(name: str) -> list[tuple[str, object, str, str]]:
    """(case, value, JSON / --set / extra_settings text, TOML text) that `name` must refuse:
    NaN, +-inf, just above its maximum, just below its minimum (its minimum when that is
    excluded), and text."""
    from training.config import KINDS, LIMITS

    limit, kind = LIMITS[name], KINDS[name]
    cases = [("nan", math.nan, "NaN", "nan"), ("+inf", math.inf, "Infinity", "inf"),
             ("-inf", -math.inf, "-Infinity", "-inf"), ("text", "many", '"many"', '"many"')]
    above = limit.high + 1 if kind is int else limit.high + max(1.0, abs(limit.high))
    below = limit.low if limit.low_open else (limit.low - 1 if kind is int else limit.low - max(1.0, abs(limit.low)))
    for case, value in (("above max", above), ("below min", below)):
        cases.append((case, value, json.dumps(value), repr(value) if kind is int else repr(float(value))))
    if kind is int:  # a float where a whole number is expected
        cases.append(("fraction", limit.low + 0.5, json.dumps(limit.low + 0.5), repr(limit.low + 0.5)))
    return cases


def _refusal(call) -> str:
    from training.config import SettingError

    with pytest.raises(SettingError) as caught:
        call()
    return str(caught.value)


# -- the table itself ------------------------------------------------------------------------------

def test_every_setting_has_one_range_and_its_default_is_inside_it():
    from training.config import KINDS, LIMITS, TrainConfig, check_setting

    defaults = TrainConfig()
    assert set(LIMITS) == set(KINDS)
    for name, limit in LIMITS.items():
        default = getattr(defaults, name)
        if KINDS[name] in (int, float):
            assert limit.low is not None and limit.high is not None, name
            assert math.isfinite(limit.low) and math.isfinite(limit.high) and limit.low < limit.high, name
            assert isinstance(limit.low, KINDS[name]) and isinstance(limit.high, KINDS[name]), name
        else:
            assert limit.low is None and limit.high is None, name
        if limit.choices:
            assert default in limit.choices, name
        assert check_setting(name, default) == default, name
    from portraitbooth_core.face.arcface_torch import FEATURES

    assert LIMITS["recognizer_feature"].choices == FEATURES


# -- every numeric setting, every way in --------------------------------------------------------------

@pytest.mark.parametrize("name", _numeric())
def test_extra_settings_refuse_non_finite_out_of_range_and_mistyped_numbers(name):
    from training.api import SettingsError, settings_from_text
    from training.config import describe_limit

    for case, _value, text, _toml in _bad_numbers(name):
        with pytest.raises(SettingsError) as caught:
            settings_from_text(f"# notes\n{name}={text}")
        message = str(caught.value)
        assert message.startswith(f"extra_settings line 2: {name}: ") and describe_limit(name) in message, \
            (case, message)


@pytest.mark.parametrize("name", _numeric())
def test_command_line_config_and_set_refuse_the_same_values(name, tmp_path):
    from training.__main__ import _config, parser
    from training.config import describe_limit, load_config

    for case, value, text, toml in _bad_numbers(name):
        args = parser().parse_args(["train", "--set", f"{name}={text}"])
        message = _refusal(lambda: _config(args))
        assert message.startswith(f"{name}: ") and describe_limit(name) in message, (case, "--set", message)
        path = tmp_path / f"{case}.toml"
        path.write_text(f"{name} = {toml}\n")
        message = _refusal(lambda: load_config(path))
        assert message.startswith(f"{path}: {name}: ") and describe_limit(name) in message, (case, "toml", message)
        path = tmp_path / f"{case}.json"
        path.write_text(json.dumps({name: value}))  # NaN and Infinity as JSON writers put them
        message = _refusal(lambda: load_config(path))
        assert message.startswith(f"{path}: {name}: ") and describe_limit(name) in message, (case, "json", message)


@pytest.mark.parametrize("name", _numeric())
def test_a_config_built_in_code_is_refused_when_validated(name):
    from training.config import TrainConfig, describe_limit

    for case, value, _text, _toml in _bad_numbers(name):
        message = _refusal(lambda: TrainConfig(**{name: value}).validate())
        assert message.startswith(f"{name}: ") and describe_limit(name) in message, (case, message)


def test_the_command_line_prints_the_refusal_without_a_traceback(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    path = tmp_path / "run.toml"
    path.write_text("steps = 10\nema_decay = inf\n")
    result = subprocess.run([sys.executable, "-m", "training", "train", "--config", str(path), "--device", "cpu"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: {path}: ema_decay: inf is not a finite number; give a number in 0..0.999999" in result.stderr


# -- the DIP Trainer's widgets ---------------------------------------------------------------------

def _trainer_module(pack_nodes):
    package = pack_nodes["PortraitBoothDIPTrainer"].__module__.rsplit(".", 1)[0]
    return importlib.import_module(f"{package}.dip_trainer")


def _widget_inputs(**over) -> dict:
    return dict(ckpt_name=TEST_CHECKPOINT, dataset="faces", run_name="", output_name="hostile_settings", mode="lora",
                steps=1, batch_size=1, grad_accum=1, learning_rate=1e-3, lora_rank=4, save_every=1, seed=0,
                gradient_checkpointing=False, extra_settings="", recognizer="") | over


def test_widgets_take_min_max_and_default_from_the_setting_and_refuse_what_it_refuses(pack_nodes, sd15_checkpoint):
    from comfy_api.latest import io

    from portraitbooth_core.paths import BadInputError
    from training.config import LIMITS, TrainConfig

    module = _trainer_module(pack_nodes)
    node = pack_nodes["PortraitBoothDIPTrainer"]
    specs = {spec.id: spec for spec in node.define_schema().inputs}
    assert set(module.WIDGET_SETTINGS) == {k for k, s in specs.items() if isinstance(s, (io.Int.Input, io.Float.Input))}
    for widget, setting in module.WIDGET_SETTINGS.items():
        spec, limit = specs[widget], LIMITS[setting]
        assert (spec.min, spec.max, spec.default) == (limit.low, limit.high, getattr(TrainConfig(), setting)), widget
        for case, value, _text, _toml in _bad_numbers(setting):
            if case == "text":
                continue  # ComfyUI converts a widget's value to its type before the node sees it
            with pytest.raises(BadInputError) as caught:  # on entry to execute, before anything else
                node.execute(**_widget_inputs(**{widget: value}))
            assert str(caught.value).startswith(f"{widget}: "), (widget, case, str(caught.value))
            assert str(node.validate_inputs(**{widget: value})).startswith(f"{widget}: "), (widget, case)
    assert specs["mode"].options[0] == TrainConfig().mode and set(specs["mode"].options) == set(LIMITS["mode"].choices)


def test_extra_settings_of_the_node_refuse_like_the_command_line(pack_nodes, sd15_checkpoint):
    node = pack_nodes["PortraitBoothDIPTrainer"]
    for text, words in (("micro_batch=512", "extra_settings line 1: micro_batch: 512 is above the maximum 64"),
                        ("lr=1e309", "extra_settings line 1: lr: inf is not a finite number"),
                        ("ema_decay=Infinity", "extra_settings line 1: ema_decay: inf is not a finite number"),
                        ("\nid_weight=NaN", "extra_settings line 2: id_weight: nan is not a finite number")):
        with pytest.raises(ValueError) as caught:
            node.execute(**_widget_inputs(extra_settings=text))
        assert str(caught.value).startswith(words), str(caught.value)


# -- lora_targets --------------------------------------------------------------------------------

def test_a_pathological_lora_targets_is_refused_or_matched_at_once(tiny_model):
    import re

    from torch import nn

    from training.config import DEFAULT_LORA_TARGETS, OLD_DEFAULT_LORA_TARGETS, load_config
    from training.models.lora import LoRASet, TargetMatcher

    start = time.perf_counter()  # the pattern took 29.6 s in re.search
    message = _refusal(lambda: load_config(None, ["lora_targets=^([a-z_0-9.]|[a-z_0-9.]){0,20}!"]))
    assert message.startswith("lora_targets: '^([a-z_0-9.]|[a-z_0-9.]){0,20}!' is a regular expression")
    assert DEFAULT_LORA_TARGETS in message
    assert time.perf_counter() - start < 1.0
    # the longest value the setting takes, every part a run of wildcards: still at once
    worst = ", ".join(["*a" * 30 + "*b"] * 64)
    assert load_config(None, {"lora_targets": worst}).lora_targets == worst
    unet = tiny_model.model.diffusion_model
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"^lora_targets: .* names no Linear/Conv2d layer of the UNet"):
        LoRASet().attach(unet, worst, 4, 4.0)
    assert time.perf_counter() - start < 1.0
    # the default adapts the layers the old regular expression did, and a saved run's old
    # default is read as it
    layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    new = TargetMatcher(tuple(DEFAULT_LORA_TARGETS.split(", ")))
    assert [n for n in layers if new(n)] == [n for n in layers if re.search(OLD_DEFAULT_LORA_TARGETS, n)] != []
    assert load_config(None, {"lora_targets": OLD_DEFAULT_LORA_TARGETS}).lora_targets == DEFAULT_LORA_TARGETS
    assert [n for n in layers if TargetMatcher(("attn*.to_*",))(n)] == \
        [n for n in layers if re.search(r"attn[^.]*\.to_[^.]*$", n)]


# -- messages that name their input (item 9) ------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("lora_targets=attn1.(to_q", "extra_settings line 1: lora_targets: 'attn1.(to_q' is a regular expression"),
    ("dip_margin=-100", "extra_settings line 1: dip_margin: -100 is below the minimum 0"),
    ("validate_every=1\nvalidation_steps=0", "extra_settings line 2: validation_steps: 0 is below the minimum 1"),
])
def test_raw_errors_of_round_one_now_name_the_setting(text, words):
    from training.api import SettingsError, settings_from_text

    with pytest.raises(SettingsError) as caught:
        settings_from_text(text)
    assert str(caught.value).startswith(words), str(caught.value)


def test_identity_file_weights_that_are_not_numbers_name_the_input(pack_nodes, tmp_path, monkeypatch):
    import folder_paths
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from portraitbooth_core.face import IdentityFileError, build_identity, save_identity
    from portraitbooth_core.face import identity_file

    folder = tmp_path / "ids"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "portraitbooth_identities",
                        ([str(folder)], {".safetensors"}))
    raw = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    path, _ = save_identity(folder / "me.safetensors", build_identity(raw, "arcface:x", ["a.jpg", "b.jpg"],
                                                                      weights="1, 2"))
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()[identity_file.METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    load = pack_nodes["PortraitBoothLoadIdentity"]
    for weights in (["1", "2"], [1, math.nan], [True, 1], "1, 2"):
        header["combine"]["weights"] = weights
        save_file(tensors, str(path), metadata={identity_file.METADATA_KEY: json.dumps(header)})
        with pytest.raises(IdentityFileError) as caught:
            load.execute(identity_name="me.safetensors")
        assert str(caught.value).startswith("identity_name: me.safetensors: malformed identity metadata: combine's "
                                            "weights"), str(caught.value)


# -- through a real server: refusals once under their input, and /interrupt ---------------------------------

@pytest.fixture(scope="module")
def trainer_server(comfy_server, dataset_dir):
    """The session's server with the training dataset in its input folder."""
    shutil.copytree(dataset_dir, comfy_server.input_dir / "hostile_settings_faces", dirs_exist_ok=True)
    return comfy_server


def _graph(**over) -> dict:
    inputs = _widget_inputs(dataset="hostile_settings_faces", output_name=f"hostile_settings_{os.getpid()}",
                            extra_settings="id_weight=0") | over
    return {"1": {"class_type": "PortraitBoothDIPTrainer", "inputs": inputs}}


def test_widget_and_extra_settings_refusals_are_reported_once_under_their_input(trainer_server):
    client = trainer_server.client
    # at queue time: ComfyUI's own min/max (the node's widget range), and the node's check
    # of its model-file combo
    queued = {"batch_size": (dict(batch_size=512), "Value 512 bigger than max of 64"),
              "steps": (dict(steps=-5), "Value -5 smaller than min of 1"),
              "ckpt_name": (dict(ckpt_name="missing.safetensors"), "put SD1.5 checkpoint (.safetensors) files in")}
    for name, (over, words) in queued.items():
        with pytest.raises(ComfyError) as caught:
            client.submit(_graph(**over))
        errors = caught.value.details["node_errors"]["1"]["errors"]
        assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == name, (name, errors)
        assert words in json.dumps(errors[0]), (name, errors)
    # A V3 combo's choices: ComfyUI 0.3.75 does not check them (the node refuses on entry to
    # execute), 0.8.0 does at queue time. Either way: once, under the input's name.
    try:
        odd_mode = client.submit(_graph(mode="sideways"))
    except ComfyError as exc:
        errors = exc.details["node_errors"]["1"]["errors"]
        assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == "mode", errors
        odd_mode = None
    # what ComfyUI cannot check refuses on entry to execute: once, naming the input
    ran = {"learning_rate": dict(learning_rate=math.nan), "dataset": dict(dataset="faces\x00"),
           "extra_settings line 1: micro_batch": dict(extra_settings="micro_batch=512"),
           "extra_settings line 2: lora_targets": dict(extra_settings="id_weight=0\nlora_targets="
                                                                      "^([a-z_0-9.]|[a-z_0-9.]){0,20}!")}
    prompts = {name: client.submit(_graph(**over)) for name, over in ran.items()}
    if odd_mode is not None:
        prompts["mode"] = odd_mode
    for name, prompt_id in prompts.items():
        with pytest.raises(ComfyError) as caught:
            client.wait(prompt_id, timeout=120)
        failures = [data for kind, data in caught.value.details if kind == "execution_error"]
        assert len(failures) == 1 and failures[0]["exception_message"].startswith(f"{name}: "), (name, failures)


def test_an_interrupt_stops_a_dip_trainer_run_within_one_step(trainer_server, sd15_checkpoint):
    from conftest import MODELS_DIR

    client = trainer_server.client
    name = f"hostile_interrupt_{os.getpid()}"
    steps = 40
    metrics = trainer_server.output_dir / "portraitbooth_runs" / name / "metrics.jsonl"
    target = MODELS_DIR / "portraitbooth" / f"{name}.safetensors"
    prompt_id = client.submit(_graph(output_name=name, steps=steps, save_every=1000,
                                     extra_settings="id_weight=0\nlog_every=1"))
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().strip()):  # the first step is done
            assert time.monotonic() < deadline, "no step was logged within 300 s"
            time.sleep(0.05)
        client.post_json("/interrupt", {})
        at_interrupt = len(metrics.read_text().splitlines())
        with pytest.raises(ComfyError) as caught:
            client.wait(prompt_id, timeout=120)
        assert any(kind == "execution_interrupted" for kind, _ in caught.value.details), caught.value.details
        done = len(metrics.read_text().splitlines())
        assert at_interrupt <= done <= at_interrupt + 1 < steps, (at_interrupt, done)  # the step under way, no more
        assert not target.exists()  # nothing exported from a stopped run
    finally:
        target.unlink(missing_ok=True)


def test_an_interrupt_stops_the_node_within_one_step_without_a_server(pack_nodes, dataset_dir, sd15_checkpoint,
                                                                       tmp_path, monkeypatch):
    """In-process no progress hook checks ComfyUI's interrupt flag (a server's does)."""
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    from conftest import MODELS_DIR

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    shutil.copytree(dataset_dir, tmp_path / "faces")
    name = f"hostile_interrupt_inprocess_{os.getpid()}"
    run = os.path.join(folder_paths.get_output_directory(), _trainer_module(pack_nodes).RUNS, name)
    target = MODELS_DIR / "portraitbooth" / f"{name}.safetensors"
    real = comfy.utils.ProgressBar.update_absolute

    def update(self, value, total=None, preview=None):
        real(self, value, total, preview)
        if value >= 1:  # the user's /interrupt arrives while step 2 trains
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", update)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            pack_nodes["PortraitBoothDIPTrainer"].execute(**_widget_inputs(
                dataset="faces", output_name=name, steps=20, save_every=1000,
                extra_settings="id_weight=0\nlog_every=1"))
        # ComfyUI's layers check the flag in step 2's forward; the node's check after each step
        # covers the work between them: either way no third step
        assert len(open(os.path.join(run, "metrics.jsonl")).read().splitlines()) in (1, 2)
        assert not target.exists()
    finally:
        mm.interrupt_current_processing(False)
        shutil.rmtree(run, ignore_errors=True)
        target.unlink(missing_ok=True)
