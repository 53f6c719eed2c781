"""Face analysis through the real ComfyUI, driven over HTTP with the shipped workflow."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from headless.client import ComfyError
from conftest import REPO


def face_workflow(image_name: str) -> dict:
    graph = json.loads((REPO / "workflows" / "api" / "portraitbooth_face_analysis.json").read_text())
    graph["1"]["inputs"]["image"] = image_name
    return graph


def test_real_photo_gives_a_preview_and_a_face_mask(comfy, photos_dir):
    name = comfy.upload_image(photos_dir / "astronaut.png")
    result = comfy.run(face_workflow(name), timeout=300)

    preview = Image.open(io.BytesIO(comfy.fetch(result.images("4")[0])))
    assert preview.size == (512, 512)  # the astronaut photo's size
    mask = np.asarray(Image.open(io.BytesIO(comfy.fetch(result.images("6")[0]))).convert("L")) / 255.0
    # The face covers a small part of the photo, in its upper half.
    assert 0.01 < mask.mean() < 0.25
    rows = np.nonzero(mask.max(axis=1) > 0.5)[0]
    assert rows.min() < 256


def test_a_photo_without_a_face_fails_naming_the_image(comfy, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), (120, 130, 140)).save(blank)
    with pytest.raises(ComfyError) as info:
        comfy.run(face_workflow(comfy.upload_image(blank)), timeout=300)
    message = str(info.value)
    assert "PortraitBoothAnalyzeFaces" in message and "image 1" in message.lower(), message
