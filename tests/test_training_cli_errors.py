"""Errors a person can act on (issue "A training run is never silently wrong", section 3).

Each mistake below, made on the command line (`python -m training ...` as a subprocess),
prints one `error:` line naming the file or setting and the fix, exits with a non-zero
code and shows no traceback. Several were already right before the issue; the cases pin
them all.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from training_fixtures import *  # noqa: F401,F403
from training_fixtures import train_config

ENV = {"OMP_NUM_THREADS": "1"}


def cli(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=REPO, env={**os.environ, **ENV},
                          capture_output=True, text=True, timeout=timeout)


def one_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one `error:` line of a refused command, without its prefix (ComfyUI's start-up
    lines may come before it)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    return errors[0][len("error: "):]


# -- --config and --set ----------------------------------------------------------------------------

CONFIG_CASES = {
    # case: (config file text, None for no file; --set items; the error, {config} the file's path)
    "missing --config file": (None, [], "{config}: the config file does not exist; check the path, or leave the "
                                        "file out and give settings with --set name=value."),
    "malformed TOML": ("steps = 4\nmicro_batch = \n", [], "{config}: not valid TOML (Invalid value (at line 2"),
    "unknown key": ("id_max_t = 250\n", [], "{config}: unknown training setting(s): id_max_t (did you mean "
                                            "id_max_timestep?)."),
    "steps as text": ('steps = "four"\n', [], "{config}: steps: expected int, got 'four'; give a whole number in "
                                              "1..10000000."),
    "--set steps=abc": ("", ["steps=abc"], "steps: expected int, got 'abc'; give a whole number in 1..10000000."),
    "--set without =": ("", ["steps"], "--set expects name=value, got 'steps'; e.g. --set steps=2000."),
    "--set micro_batch=0": ("", ["micro_batch=0"], "micro_batch: 0 is below the minimum 1; give a whole number in "
                                                   "1..64."),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_and_set_mistakes_name_the_file_or_setting(case, tmp_path):
    text, sets, expected = CONFIG_CASES[case]
    config = tmp_path / "run.toml"
    if text is not None:
        config.write_text(text)
    result = cli("train", "--device", "cpu", "--config", config, *[a for s in sets for a in ("--set", s)])
    assert one_error(result).startswith(expected.format(config=config)), result.stderr[-2000:]


def test_an_unknown_key_without_a_near_name_lists_the_known_ones(tmp_path):
    message = one_error(cli("train", "--device", "cpu", "--set", "zzz=1", "--set", "stepz=2"))
    assert message.startswith("unknown training setting(s): stepz (did you mean steps?), zzz; known: checkpoint, ")


# -- the files a command reads ---------------------------------------------------------------------

INPUT_CASES = {
    # case: (arguments, the error; {ckpt} the stand-in SD1.5 file, {data} the test dataset, {tmp} a fresh folder)
    "missing --checkpoint file": (["train", "--device", "cpu", "--checkpoint", "{tmp}/nope.safetensors",
                                   "--dataset", "{data}", "--output", "{tmp}/run"],
                                  "checkpoint: {tmp}/nope.safetensors does not exist; check the path, or give the "
                                  "SD1.5 .safetensors checkpoint to start from."),
    "no --checkpoint": (["train", "--device", "cpu", "--dataset", "{data}", "--output", "{tmp}/run"],
                        "checkpoint: not set; give the SD1.5 .safetensors checkpoint to start from."),
    "missing --dataset folder": (["train", "--device", "cpu", "--checkpoint", "{ckpt}", "--dataset", "{tmp}/none",
                                  "--output", "{tmp}/run"],
                                 "the dataset folder {tmp}/none does not exist; give the folder `python -m training "
                                 "build` wrote, or build the dataset with `python -m training build <people folders> "
                                 "<dataset>`."),
    "--dataset that is no dataset": (["train", "--device", "cpu", "--checkpoint", "{ckpt}", "--dataset", "{tmp}",
                                      "--output", "{tmp}/run"],
                                     "{tmp} is not a dataset: it has no index.json. Give the folder `python -m "
                                     "training build` wrote, or build"),
    "no --dataset": (["train", "--device", "cpu", "--checkpoint", "{ckpt}", "--output", "{tmp}/run"],
                     "no dataset given (the dataset setting is empty); give the folder `python -m training build` "
                     "wrote"),
    "export without a run": (["export", "--device", "cpu", "--output", "{tmp}/run"],
                             "--output {tmp}/run: no checkpoint in {tmp}/run/checkpoints; give --output (or `output` "
                             "in --config) the run folder `python -m training train` wrote."),
    "precompute, missing dataset": (["precompute", "{tmp}/none", "--model", "{ckpt}", "--device", "cpu"],
                                    "the dataset folder {tmp}/none does not exist"),
    "precompute, missing --model": (["precompute", "{data}", "--model", "{tmp}/nope.safetensors", "--device", "cpu"],
                                    "--model: {tmp}/nope.safetensors does not exist; check the path, or give the "
                                    "SD1.5 .safetensors checkpoint to start from."),
    "build, missing source folder": (["build", "{tmp}/people", "{tmp}/built"],
                                     "the source folder {tmp}/people does not exist; give a folder with one "
                                     "sub-folder of photos and videos per person (or a CelebV-Text root)."),
}


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_missing_or_wrong_input_files_are_named(case, sd15_checkpoint, dataset_dir, tmp_path):
    from conftest import MODELS_DIR

    args, expected = INPUT_CASES[case]
    where = {"ckpt": MODELS_DIR / "checkpoints" / sd15_checkpoint, "data": dataset_dir, "tmp": tmp_path}
    result = cli(*[a.format(**where) for a in args])
    code = 1 if case == "export without a run" else 2  # export's "nothing to export" code, as before
    assert one_error(result, code).startswith(expected.format(**where)), result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a refused command leaves nothing behind


# -- building a dataset ----------------------------------------------------------------------------

def _stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines without the progress bar's redraws (tqdm ends them with carriage returns)."""
    return [line for line in result.stderr.replace("\r", "\n").splitlines()
            if line.strip() and not line.startswith("people:")]


@pytest.mark.parametrize("has", ["recognizer", "detector"])
def test_an_incomplete_pack_says_what_build_can_do_without_the_missing_file(has, people_dir, tmp_path):
    from standins_face import build_arcface_onnx, build_scrfd_onnx

    pack = tmp_path / "packs" / "halfpack"
    build_arcface_onnx(pack / "w600k_r50.onnx") if has == "recognizer" else build_scrfd_onnx(pack / "det_10g.onnx")
    built = tmp_path / "built"
    result = cli("build", people_dir, built, "--pack", pack, "--resolution", 64)
    missing = "a face detector (SCRFD" if has == "recognizer" else "a face recognizer (ArcFace"
    assert one_error(result).startswith(f"The face model pack in {pack} is incomplete: missing {missing}")
    hint = {"recognizer": "Or keep this pack's recognizer and find faces with the zero-download RetinaFace "
                          "detector: add --detector retinaface.",
            "detector": "(--recognizer dlib needs no download, but `python -m training train` refuses a dataset "
                        "built with it unless it trains without the identity loss, --set id_weight=0.)"}[has]
    assert result.stderr.rstrip().endswith(hint), result.stderr[-2000:]
    assert not built.exists()
    if has == "recognizer":  # the hint works: this pack's ArcFace with RetinaFace builds a dataset train takes
        result = cli("build", people_dir, built, "--pack", pack, "--detector", "retinaface", "--resolution", 64,
                     "--caption-template", "a photo of a {word}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((built / "index.json").read_text())["face_encoder"]["kind"].startswith("arcface")
        assert not [line for line in _stderr_lines(result) if line.startswith("warning:")], result.stderr[-2000:]


@pytest.fixture(scope="module")
def built_without_pack(people_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A build with the zero-download backends (no --pack), by two worker processes."""
    built = tmp_path_factory.mktemp("nopack") / "built"
    result = cli("build", people_dir, built, "--resolution", 64, "--caption-template", "a photo of a {word}",
                 "--workers", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return built, result


def test_a_build_without_a_pack_warns_that_train_will_refuse_the_dataset(built_without_pack, sd15_checkpoint,
                                                                          tmp_path):
    from conftest import MODELS_DIR

    built, result = built_without_pack
    warnings = [line for line in _stderr_lines(result) if line.startswith("warning: ")]
    assert warnings == [
        "warning: this dataset's faces are encoded by the dlib:resnet128 recognizer (128-d embeddings), and `python "
        "-m training train` refuses such a dataset: its identity loss (DIP) needs the ArcFace recognizer of an "
        "insightface pack. To train with the identity loss, build into a new folder with --pack "
        "models/insightface/models/antelopev2 (--detector retinaface keeps the zero-download detector); to train "
        "this dataset as it is, give train --set id_weight=0 (no identity loss)."], result.stderr[-3000:]
    # What the warning says train does, train does: it refuses the dataset, naming the same two ways on.
    refused = one_error(cli("train", "--device", "cpu", "--checkpoint", MODELS_DIR / "checkpoints" / sd15_checkpoint,
                            "--dataset", built, "--output", tmp_path / "run", "--set", "steps=1"))
    assert refused.startswith(f"the dataset {built} was built with the dlib:resnet128 face encoder (128-d "
                              f"embeddings), which has no differentiable recognizer"), refused
    assert "--pack models/insightface/models/antelopev2" in refused and "`--set id_weight=0`" in refused, refused


def test_build_workers_print_each_notice_once(built_without_pack):
    """Each worker makes its own face encoder; the notices of making it (CPU provider, the
    ellipse masks) are the builder's to print, once, in its own format."""
    _, result = built_without_pack
    lines = _stderr_lines(result)
    assert any("face masks: no parsing_bisenet.pth found" in line for line in lines), result.stderr[-3000:]
    repeated = sorted({line for line in lines if lines.count(line) > 1})
    assert not repeated, result.stderr[-3000:]
    assert not [line for line in lines if line.startswith("WARNING:")], result.stderr[-3000:]


# -- continuing a run with settings that change what it trains -------------------------------------

@pytest.fixture(scope="module")
def four_step_run(sd15_checkpoint, dataset_dir, recognizer_pack, tmp_path_factory) -> tuple[Path, Path]:
    """A 4-step run (in-process: quicker than the command line) and its settings as a config."""
    from training import api

    folder = tmp_path_factory.mktemp("four") / "run"
    cfg = train_config(dataset_dir, folder, steps=4, micro_batch=1, lr=1e-4, save_every=2, num_workers=0)
    api.run_training(cfg.to_dict())
    config = folder.parent / "run.json"
    config.write_text(json.dumps(cfg.to_dict()))
    return folder, config


@pytest.mark.parametrize("sets, named", [
    (["lora_rank=8"], "lora_rank 4 -> 8 (recorded -> now)"),
    (["mode=frozen"], "mode 'lora' -> 'frozen' (recorded -> now)"),
    (["lr=1e-3", "steps=5"], "lr 0.0001 -> 0.001 (recorded -> now)"),  # steps may change, lr may not
])
def test_resuming_with_a_setting_that_changes_the_result_is_refused_by_name(four_step_run, sets, named):
    folder, config = four_step_run
    before = _listing(folder)
    result = cli("train", "--device", "cpu", "--config", config, *[a for s in sets for a in ("--set", s)])
    message = one_error(result)
    assert message.startswith(f"--output {folder}: this run was trained with other settings, so it cannot continue "
                              f"with these: {named}. To go on: pass the recorded values"), message
    assert _listing(folder) == before  # refused: not a file written, not even the run lock's


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ctrl_c_says_where_the_run_stands_and_how_to_resume_it(four_step_run, tmp_path):
    """Ctrl-C (SIGINT) in the middle of a run: before the fix, a KeyboardInterrupt traceback."""
    source, config = four_step_run
    folder = tmp_path / "run"
    shutil.copytree(source, folder)
    args = ["train", "--device", "cpu", "--config", str(config), "--output", str(folder), "--set", "steps=1000"]
    # As from a terminal: a suite started in the background (`cmd &` in a script, nohup)
    # hands its children SIGINT ignored, and Python then leaves it ignored.
    proc = subprocess.Popen([sys.executable, "-m", "training", *args], cwd=REPO, env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        metrics, end = folder / "metrics.jsonl", time.monotonic() + 240
        logged = len(metrics.read_text().splitlines())
        while len(metrics.read_text().splitlines()) == logged and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)  # until the resumed run has logged a step of its own
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    message = one_error(subprocess.CompletedProcess(args, proc.returncode, out, err), code=130)
    assert message.startswith("interrupted (Ctrl-C) at step ") and " of 1000. The run in " in message, message
    newest = sorted((folder / "checkpoints").glob("step-*.pt"))[-1]
    assert f"the newest is {newest} (step {int(newest.name[5:13])})" in message, message
    assert message.endswith(f"Resume it with: python -m training {shlex.join(args)}"), message


# -- help and the FastComposer importer ------------------------------------------------------------

def test_help_describes_every_command():
    result = subprocess.run([sys.executable, "-m", "training", "--help"], cwd=REPO, env={**os.environ, **ENV},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = " ".join(result.stdout.split())  # argparse wraps the descriptions
    assert "train train PortraitBooth on a dataset" in listed, result.stdout
    assert "export write the weight file the nodes load from a run's newest checkpoint" in listed, result.stdout


def test_a_truncated_fastcomposer_file_says_only_what_is_known_of_its_size(tmp_path):
    import torch

    whole = tmp_path / "whole.bin"
    torch.save({"unet.conv_in.weight": torch.zeros(64, 64)}, whole)
    cut = tmp_path / "pytorch_model.bin"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    message = one_error(cli("import-fastcomposer", cut, "--models", tmp_path / "models"))
    assert message.startswith(f"{cut} ({cut.stat().st_size:,} bytes) could not be read: it is truncated or corrupt")
    assert "about 1.37 billion parameters, 2.75 GB in fp16, twice that in fp32; download it again." in message
    assert "2.2-2.5 GB" not in message
