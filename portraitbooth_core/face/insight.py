"""insightface: how the pack's models of an insightface pack are loaded and run.

IPAdapter FaceID, InstantID and PuLID run antelopev2 / buffalo_l through
`insightface.app.FaceAnalysis`; running the same files through the same library (its model
zoo for routing and decoding, `norm_crop` for alignment) makes an identity computed here
the identity computed there.

insightface downloads a pack when `FaceAnalysis(name=...)` is given a name that is not an
existing folder, and `model_zoo.get_model(...)` can download a missing file. We only ever
hand `get_model` the absolute path of a file we have just seen on disk, never a name, so
nothing is downloaded: a missing or empty folder is our PackError (see packs.py) before
insightface is called.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType

from ..optional import require
from .errors import PackError
from .runtime import resolve_providers, session_options

FEATURE = "Face analysis with an insightface model pack (antelopev2, buffalo_l, ...)"


def insightface() -> ModuleType:
    """The insightface package, or MissingDependencyError with the opencv-safe install commands."""
    module = require("insightface", FEATURE)
    # insightface 2.1's norm_crop calls scikit-image's SimilarityTransform.estimate, deprecated
    # in 0.26 (requirements-insightface.txt keeps scikit-image below its removal): not the
    # user's to act on, so not in their console on every analysis.
    warnings.filterwarnings("ignore", message=r"`estimate` is deprecated", category=FutureWarning,
                            module=r"insightface\.")
    return module


def load_model(path: str | os.PathLike, providers: list[str]):
    """insightface's model object for one ONNX file (SCRFD, ArcFaceONNX, Attribute, Landmark,
    INSwapper), routed by insightface's own rules; None when insightface does not know it."""
    path = Path(path).resolve()
    if not path.is_file():
        # get_model would otherwise try ~/.insightface/models/<name> and, asked to, download.
        raise PackError(f"Face model file not found: {path}. Put the pack's *.onnx files back in that folder.")
    zoo = insightface().model_zoo
    return zoo.get_model(str(path), providers=list(providers), sess_options=session_options(), download=False)


def use_providers(model, providers: list[str]) -> None:
    """Move an insightface model's session to these providers (routing opened it on the CPU)."""
    if list(model.session.get_providers()) == list(providers):
        return
    preload = getattr(insightface().model_zoo, "preload_cuda_libraries", None)
    if callable(preload):
        preload(providers)  # insightface does this before its own GPU sessions
    model.session.set_providers(list(providers))


def cpu() -> list[str]:
    return resolve_providers("cpu")
