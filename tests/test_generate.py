"""The README's run command: headless generation, and what it says when models are missing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from headless.generate import SMOKE_WEIGHTS, plan_models
from standins.sd15 import build_portraitbooth_file
from conftest import MODELS_DIR, REPO


def test_missing_models_are_named_with_their_folders(tmp_path):
    plan = plan_models(tmp_path)
    assert plan.smoke
    assert any(str(tmp_path / "checkpoints") in m and "SD1.5" in m for m in plan.missing)
    assert any(str(tmp_path / "portraitbooth") in m for m in plan.missing)


def test_user_models_are_found_and_the_face_pack_follows_the_weights(tmp_path, sd15_checkpoint):
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(MODELS_DIR / "checkpoints" / sd15_checkpoint, tmp_path / "checkpoints" / "mine.safetensors")
    build_portraitbooth_file(tmp_path / "portraitbooth" / "arc.safetensors",
                             face_kind="arcface:antelopev2/glintr100.onnx", face_dim=512)
    (tmp_path / "portraitbooth" / "not_a_model.safetensors").write_bytes(b"\0" * 64)

    plan = plan_models(tmp_path)
    assert (plan.checkpoint, plan.weights) == ("mine.safetensors", "arc.safetensors")
    assert plan.pack == "antelopev2" and plan.recognizer == "arcface (pack)"
    assert plan.missing == [f"the face pack antelopev2 that arc.safetensors was trained with, in "
                            f"{tmp_path / 'insightface' / 'models' / 'antelopev2'}/ (its *.onnx files)"]

    (tmp_path / "insightface" / "models" / "antelopev2").mkdir(parents=True)
    assert not plan_models(tmp_path).smoke


def test_stand_in_files_never_count_as_the_users_models(tmp_path):
    build_portraitbooth_file(tmp_path / "portraitbooth" / SMOKE_WEIGHTS)
    assert plan_models(tmp_path).weights is None


@pytest.mark.slow  # a fresh ComfyUI and the smoke run: ~25 s
def test_smoke_run_writes_a_png_through_the_http_api(tmp_path, fresh_comfyui):
    out = tmp_path / "out"
    # A smoke run writes its stand-ins into the ComfyUI it runs on: a fresh one, never the host.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMFYUI_PATH": str(fresh_comfyui)}
    proc = subprocess.run([sys.executable, "-m", "headless.generate", "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMOKE RUN" in proc.stderr
    (printed,) = proc.stdout.split()
    assert printed.startswith(str(out)) and Image.open(printed).size == (64, 64)
