"""dlib's ResNet face recognizer: a real, zero-download recognizer (128-d).

Weights come from the `face-recognition-models` package (the recognizer and the 5-point
shape predictor are public domain); `dlib-bin` provides prebuilt dlib wheels, so nothing
needs a compiler. Descriptors of one person are usually within L2 0.6 of each other.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..optional import MissingDependencyError, require
from .types import DetectedFace

SAME_PERSON_L2 = 0.6  # dlib's documented threshold on raw descriptors


def model_files() -> tuple[Path, Path]:
    """(5-point shape predictor, ResNet recognizer) inside face-recognition-models.

    Located through the package's spec rather than importing it: its __init__ imports
    pkg_resources, which recent setuptools no longer ship.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("face_recognition_models", "The dlib face recognizer")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = (models / "shape_predictor_5_face_landmarks.dat",
             models / "dlib_face_recognition_resnet_model_v1.dat")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: reinstall 'face-recognition-models'.")
    return files


class DlibRecognizer:
    """Embeds faces found by our detector with dlib's ResNet (landmarks by dlib's 5-point model)."""

    kind = "dlib:resnet128"
    name = "dlib ResNet (face-recognition-models)"
    dim = 128
    # Cosine of two descriptors at the L2 threshold: descriptors have norm ~1.39 (measured
    # on the obama/biden photos), so |a-b|^2 = 2 n^2 (1 - cos) gives cos ~ 0.9. Measured:
    # same person 0.95-0.97, obama vs biden 0.80-0.82.
    same_person_cosine = 0.9

    def __init__(self, num_jitters: int = 0):
        self.dlib = require("dlib", "The dlib face recognizer")
        predictor, resnet = model_files()
        self.shape_predictor = self.dlib.shape_predictor(str(predictor))
        self.model = self.dlib.face_recognition_model_v1(str(resnet))
        self.num_jitters = num_jitters

    def embed_faces(self, image: np.ndarray, faces: list[DetectedFace]) -> np.ndarray:
        """Raw 128-d descriptors [N, 128] for these faces of an HxWx3 uint8 RGB image."""
        image = np.ascontiguousarray(image)
        out = []
        for face in faces:
            x1, y1, x2, y2 = (int(round(v)) for v in face.box)
            shape = self.shape_predictor(image, self.dlib.rectangle(x1, y1, x2, y2))
            out.append(np.array(self.model.compute_face_descriptor(image, shape, self.num_jitters)))
        return np.stack(out).astype(np.float32) if out else np.zeros((0, 128), np.float32)
