"""Two real photos -> one image with two subjects, through the real ComfyUI and the shipped
two-subject template, in both sampler modes.

Stand-ins in real formats: the random SD1.5 checkpoint and a PortraitBooth file the
test writes for the zero-download face encoder (RetinaFace + dlib, 128-d); the photos
(Obama, Biden) are real and their faces are really detected and embedded.
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

pytestmark = pytest.mark.slow  # own server, two-subject generations: ~15 s

WEIGHTS = "portraitbooth_regions_standin.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd15_checkpoint):
    weights = tmp_path_factory.mktemp("portraitbooth")
    build_portraitbooth_file(weights / WEIGHTS)  # dlib:resnet128, what the zero-download encoder gives
    server = started_server(tmp_path_factory.mktemp("comfy-regions"),
                            extra_model_paths={"portraitbooth": str(weights)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def photos(server, photos_dir):
    return [server.client.upload_image(photos_dir / name) for name in ("obama.jpg", "biden.jpg")]


def two_subjects(server, photos, checkpoint, mode, **changes) -> np.ndarray:
    graph = with_inputs(load_api_workflow("portraitbooth_two_subjects"), {
        "1": {"ckpt_name": checkpoint},
        "2": {"portraitbooth_name": WEIGHTS},
        "3": {"image": photos[0]},
        "4": {"image": photos[1]},
        "8": {"text": "a photo of a man and a man side by side in a park"},  # occurrence k -> region k
        "9": {"text": "a photo of a man, smiling"},
        "10": {"text": "a photo of a man, serious"},
        "14": {"width": 128, "height": 64},
        "15": {"steps": 2, "seed": 5, "mode": mode},
        **changes,
    })
    result = server.client.run(graph, timeout=300)
    (file,) = result.images("17")
    return np.asarray(Image.open(io.BytesIO(server.client.fetch(file))).convert("RGB"), dtype=np.int16)


def test_two_subject_template_makes_an_image_in_both_modes(server, photos, sd15_checkpoint):
    info = server.client.get_json("/object_info")
    for node in ("PortraitBoothRegion", "PortraitBoothMultiSubjectSampler"):
        assert node in info, f"{node} not registered: nodes/__init__.py must list *regions.NODES"
        assert info[node]["category"] == "PortraitBooth/regions"
    attention = two_subjects(server, photos, sd15_checkpoint, "regional attention")
    assert attention.shape == (64, 128, 3) and attention.std() > 0
    assert np.array_equal(two_subjects(server, photos, sd15_checkpoint, "regional attention"), attention)
    fused = two_subjects(server, photos, sd15_checkpoint, "multidiffusion")
    assert fused.shape == (64, 128, 3) and not np.array_equal(fused, attention)


def test_more_faces_than_class_words_stops_the_graph_with_the_fix(server, photos, sd15_checkpoint):
    with pytest.raises(ComfyError) as info:  # the global prompt names one man for two faces
        two_subjects(server, photos, sd15_checkpoint, "regional attention", **{"8": {"text": "a man in a park"}})
    message = str(info.value)
    assert "PortraitBoothApplySTEA" in message and "2 faces were given" in message, message
    assert "one class word per subject" in message, message
