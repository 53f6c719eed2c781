"""One photo + a prompt -> an identity-conditioned image, through the real ComfyUI.

Everything is a stand-in in a real format: the random SD1.5 checkpoint, an insightface
pack whose ArcFace is a small random ONNX, and a PortraitBooth file the test writes;
the photos are real and found by the shipped RetinaFace.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from headless.client import ComfyError
from standins.sd15 import build_portraitbooth_file
from headless.workflows import load_api_workflow, with_inputs
from conftest import started_server
from face_fixtures import insightface_root  # noqa: F401  (fixture)

PACK = "standin_r50"
WEIGHTS = "portraitbooth_standin.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory, insightface_root, sd15_checkpoint):  # noqa: F811
    weights = tmp_path_factory.mktemp("portraitbooth")
    build_portraitbooth_file(weights / WEIGHTS, face_kind=f"arcface:{PACK}/w600k_r50.onnx", face_dim=512)
    server = started_server(tmp_path_factory.mktemp("comfy-identity"),
                            extra_model_paths={"insightface": str(insightface_root),
                                               "portraitbooth": str(weights)})
    yield server
    server.stop()


def portrait(server, photo_name, checkpoint, prompt="a photo of a man, portrait", seed=1, **changes):
    graph = with_inputs(load_api_workflow("portraitbooth_single_subject"), {
        "1": {"ckpt_name": checkpoint},
        "2": {"portraitbooth_name": WEIGHTS},
        "3": {"image": photo_name},
        "4": {"pack": PACK, "detector": "retinaface (zero-download)", "recognizer": "arcface (pack)"},
        "6": {"text": prompt},
        "8": {"width": 64, "height": 64},
        "9": {"seed": seed, "steps": 2},
        **changes,
    })
    result = server.client.run(graph, timeout=300)
    (file,) = result.images("11")
    return np.asarray(Image.open(io.BytesIO(server.client.fetch(file))).convert("RGB"), dtype=np.int16)


def test_single_subject_workflow_makes_an_image_that_follows_the_face(server, photos_dir, sd15_checkpoint):
    obama = server.client.upload_image(photos_dir / "obama.jpg")
    biden = server.client.upload_image(photos_dir / "biden.jpg")

    first = portrait(server, obama, sd15_checkpoint)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(portrait(server, obama, sd15_checkpoint), first), "same face, same seed: same image"
    other = portrait(server, biden, sd15_checkpoint)
    assert np.abs(other - first).mean() > 0.2, "a different face must change the image"


def test_a_prompt_without_the_class_word_is_refused_with_the_accepted_words(server, photos_dir, sd15_checkpoint):
    obama = server.client.upload_image(photos_dir / "obama.jpg")
    with pytest.raises(ComfyError) as info:
        portrait(server, obama, sd15_checkpoint, prompt="a photo of a dog on a beach")
    message = str(info.value)
    assert "PortraitBoothApplySTEA" in message and "man" in message and "woman" in message, message


def test_weights_for_another_face_encoder_are_refused(server, photos_dir, sd15_checkpoint):
    # The file was trained on 512-d ArcFace; the zero-download dlib gives 128-d.
    obama = server.client.upload_image(photos_dir / "obama.jpg")
    with pytest.raises(ComfyError) as info:
        portrait(server, obama, sd15_checkpoint,
                 **{"4": {"pack": "none (zero-download RetinaFace)", "recognizer": "dlib (zero-download)"}})
    message = str(info.value)
    assert "128" in message and "512" in message, message
