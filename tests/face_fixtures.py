"""Fixtures of the face tests (import them with `from face_fixtures import *`).

Stand-in insightface packs are built once per session into a temp folder laid out like
ComfyUI's models/insightface/models/<pack>/.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from standins_face import build_arcface_onnx, build_scrfd_onnx


def read_photo(photos_dir: Path, name: str) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(photos_dir / name).convert("RGB"))


def dot_image(points, size=(300, 400)) -> np.ndarray:
    """Black RGB image with white 6x6 dots: the SCRFD stand-in's "faces"."""
    img = np.zeros((*size, 3), np.uint8)
    for x, y in points:
        img[y - 3:y + 3, x - 3:x + 3] = 255
    return img


@pytest.fixture(scope="session")
def insightface_root(tmp_path_factory) -> Path:
    """<root>/models/{standin_r50 (det+rec+extra), no_recognizer, corrupt}/ like a models/insightface folder."""
    root = tmp_path_factory.mktemp("insightface")
    full = root / "models" / "standin_r50"
    build_scrfd_onnx(full / "det_10g.onnx")
    build_arcface_onnx(full / "w600k_r50.onnx")
    # A pack unpacked one level too deep, as antelopev2 zips often are.
    nested = root / "models" / "antelopev2" / "antelopev2"
    build_scrfd_onnx(nested / "scrfd_10g_bnkps.onnx", batched=True)
    build_arcface_onnx(nested / "glintr100.onnx", seed=1)
    partial = root / "models" / "no_recognizer"
    build_scrfd_onnx(partial / "det_10g.onnx")
    broken = root / "models" / "corrupt"
    build_scrfd_onnx(broken / "det_10g.onnx")
    data = (full / "w600k_r50.onnx").read_bytes()
    (broken / "w600k_r50.onnx").write_bytes(data[: len(data) // 3])  # an interrupted download
    return root


@pytest.fixture(scope="session")
def zero_download_encoder():
    """RetinaFace + dlib, no parsing weights (fallback masks)."""
    from portraitbooth_core.face import build_encoder

    return build_encoder(None, provider="cpu")
