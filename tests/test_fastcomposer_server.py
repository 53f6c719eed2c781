"""FastComposer through the real ComfyUI: a stand-in release imported with the CLI, then the
shipped FastComposer templates run over the HTTP API.

The release (standins/fastcomposer.py) has the real layout with random weights; its image
encoder is a full-size ViT-L/14, the only CLIP vision size ComfyUI's Load CLIP Vision
recognizes (built once, ~1 GB, cached beside the host; each encoding takes a few seconds on
a CPU). The UNet is small, the sizes and step counts tiny. The photos are real.
"""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

import diffusers  # noqa: E402,F401  (requirements-test.txt)
import transformers  # noqa: E402,F401

from conftest import started_server  # noqa: E402
from headless import comfyui as host  # noqa: E402
from headless.client import ComfyError  # noqa: E402
from headless.workflows import load_api_workflow, with_inputs  # noqa: E402
from standins.fastcomposer import build_fastcomposer_release  # noqa: E402
from standins.sd15 import build_portraitbooth_file  # noqa: E402
from training.__main__ import main as cli  # noqa: E402

ARCFACE_FILE = "portraitbooth_arcface_standin.safetensors"
ARCFACE_KIND = "arcface:standin_r50/w600k_r50.onnx"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # Versioned name: a change to the stand-in's layout must not reuse an old file.
    release = build_fastcomposer_release(host.host_dir() / "cache" / "standins" / "fastcomposer_vitl_v1.bin",
                                         "vit-l", seed=0)
    models = tmp_path_factory.mktemp("models")
    assert cli(["import-fastcomposer", str(release), "--models", str(models)]) == 0
    build_portraitbooth_file(models / "portraitbooth" / ARCFACE_FILE, face_kind=ARCFACE_KIND, face_dim=512)
    return models


@pytest.fixture(scope="module")
def server(tmp_path_factory, models, sd15_checkpoint):
    server = started_server(tmp_path_factory.mktemp("comfy-fastcomposer"),
                            extra_model_paths={kind: str(models / kind)
                                               for kind in ("diffusion_models", "clip_vision", "portraitbooth")})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def photos(server, photos_dir, tmp_path_factory):
    # The same photo under a second name: LoadImage re-runs, so "same face, same image" is
    # computed twice instead of coming from ComfyUI's cache.
    copy = tmp_path_factory.mktemp("photos") / "obama_again.jpg"
    shutil.copyfile(photos_dir / "obama.jpg", copy)
    return {name: server.client.upload_image(path)
            for name, path in (("obama", photos_dir / "obama.jpg"), ("biden", photos_dir / "biden.jpg"),
                               ("obama_again", copy))}


def _image(server, result, node) -> np.ndarray:
    (file,) = result.images(node)
    return np.asarray(Image.open(io.BytesIO(server.client.fetch(file))).convert("RGB"), dtype=np.int16)


def portrait(server, photo, checkpoint, **changes) -> np.ndarray:
    graph = with_inputs(load_api_workflow("portraitbooth_fastcomposer_single_subject"), {
        "1": {"ckpt_name": checkpoint},
        "5": {"image": photo},
        "9": {"width": 64, "height": 64},
        "10": {"seed": 3, "steps": 3},
        **changes,
    })
    return _image(server, server.client.run(graph, timeout=600), "12")


def test_template_defaults_are_fastcomposers():
    graph = load_api_workflow("portraitbooth_fastcomposer_single_subject")
    assert graph["7"]["inputs"]["start_percent"] == pytest.approx(0.3)
    sampler = graph["10"]["inputs"]
    assert (sampler["sampler_name"], sampler["steps"], sampler["cfg"]) == ("euler", 50, 5.0)
    two = load_api_workflow("portraitbooth_fastcomposer_two_subjects")
    assert {two[n]["inputs"]["start_percent"] for n in ("9", "10", "11")} == {0.3}
    assert (two["16"]["inputs"]["steps"], two["16"]["inputs"]["cfg"]) == (50, 5.0)


def test_single_subject_template_follows_the_face(server, photos, sd15_checkpoint):
    first = portrait(server, photos["obama"], sd15_checkpoint)
    assert first.shape == (64, 64, 3) and first.std() > 0
    assert np.array_equal(portrait(server, photos["obama_again"], sd15_checkpoint), first), \
        "same face, same seed: same image"
    # At the template's start_percent 0.3 the face only steers the last steps, which move a
    # random-weight UNet little (measured: mean |diff| ~0.02 levels at 3 steps), but it must
    # reach the image; from the first step on the change is large (measured ~0.8).
    other = portrait(server, photos["biden"], sd15_checkpoint)
    assert not np.array_equal(other, first), "a different face must change the image"
    early = {"7": {"start_percent": 0.0}}
    assert np.abs(portrait(server, photos["biden"], sd15_checkpoint, **early)
                  - portrait(server, photos["obama"], sd15_checkpoint, **early)).mean() > 0.2


def test_person_crop_without_face_encoder_is_refused(server, photos, sd15_checkpoint):
    with pytest.raises(ComfyError) as info:
        portrait(server, photos["obama"], sd15_checkpoint, **{"6": {"crop": "person around face"}})
    message = str(info.value)
    assert "PortraitBoothCLIPVisionIdentity" in message and "needs a face encoder" in message, message


def test_face_recognizer_projector_fed_a_clip_embedding_names_both_kinds(server, photos, sd15_checkpoint):
    with pytest.raises(ComfyError) as info:
        portrait(server, photos["obama"], sd15_checkpoint, **{"3": {"portraitbooth_name": ARCFACE_FILE}})
    message = str(info.value)
    assert "PortraitBoothApplySTEA" in message, message
    assert ARCFACE_KIND in message and "clip_vision:vit-l-14" in message, message


def test_two_subject_template_runs_in_both_modes(server, photos, sd15_checkpoint):
    images = {}
    for mode in ("regional attention", "multidiffusion"):
        graph = with_inputs(load_api_workflow("portraitbooth_fastcomposer_two_subjects"), {
            "1": {"ckpt_name": sd15_checkpoint},
            "5": {"image": photos["obama"]},
            "6": {"image": photos["biden"]},
            "9": {"text": "a photo of a man and a man side by side in a park"},
            "11": {"text": "a photo of a man, serious"},
            "15": {"width": 128, "height": 64},
            "16": {"steps": 3, "seed": 5, "mode": mode},
        })
        images[mode] = _image(server, server.client.run(graph, timeout=600), "18")
        assert images[mode].shape == (64, 128, 3) and images[mode].std() > 0
    assert not np.array_equal(images["regional attention"], images["multidiffusion"])
