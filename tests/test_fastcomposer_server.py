"""FastComposer through the real ComfyUI: a stand-in release imported with the CLI, then the
shipped FastComposer templates run over the HTTP API.

The release (standins/fastcomposer.py) has the real layout with random weights; its image
encoder is a full-size ViT-L/14, the only CLIP vision size ComfyUI's Load CLIP Vision
recognizes (built once, ~1 GB, cached beside the host; each encoding takes a few seconds on
a CPU). The UNet is small, the sizes and step counts tiny. The photos are real.
"""
from __future__ import annotations

import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import diffusers  # noqa: E402,F401  (requirements-test.txt)
import transformers  # noqa: E402,F401

from headless.client import ComfyError  # noqa: E402
from headless.workflows import load_api_workflow, with_inputs  # noqa: E402
from portraitbooth_core.weights.meta import FROM_FILE  # noqa: E402
from standins.templates import ARCFACE_FILE, ARCFACE_KIND  # noqa: E402

pytestmark = pytest.mark.slow  # FastComposer stand-in import and its workflows: ~1 min


@pytest.fixture(scope="module")
def server(models_server):
    # The session's server with the stand-ins of standins/templates.py: the release imported
    # with the CLI, and a face-recognizer PortraitBooth file (ARCFACE_FILE) beside
    # FastComposer's postfuse file. Shared with the runs of every template.
    return models_server


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
    # The identity's start is not written into the templates: Apply STEA takes the file's
    # (0.3, see test_file_default_start_reaches_a_fresh_apply_stea).
    graph = load_api_workflow("portraitbooth_fastcomposer_single_subject")
    assert graph["7"]["inputs"]["start_percent"] == FROM_FILE
    sampler = graph["10"]["inputs"]
    assert (sampler["sampler_name"], sampler["steps"], sampler["cfg"]) == ("euler", 50, 5.0)
    two = load_api_workflow("portraitbooth_fastcomposer_two_subjects")
    assert {two[n]["inputs"]["start_percent"] for n in ("9", "10", "11")} == {FROM_FILE}
    assert (two["16"]["inputs"]["steps"], two["16"]["inputs"]["cfg"]) == (50, 5.0)


def _portrait_and_conditioning(server, photo, checkpoint, start_percent) -> tuple[np.ndarray, str, str]:
    """The single-subject template at `start_percent`, with Preview as Text showing the
    CONDITIONING Apply STEA hands the sampler: (image, Apply STEA's text, the conditioning's text)."""
    graph = with_inputs(load_api_workflow("portraitbooth_fastcomposer_single_subject"), {
        "1": {"ckpt_name": checkpoint}, "5": {"image": photo}, "7": {"start_percent": start_percent},
        "9": {"width": 64, "height": 64}, "10": {"seed": 3, "steps": 3},
    })
    graph["20"] = {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}}
    result = server.client.run(graph, timeout=600)
    (used,), (conditioning,) = result.texts("7"), result.texts("20")
    return _image(server, result, "12"), used, conditioning


def _ranges(conditioning_text: str) -> list[tuple[float, float]]:
    """(start_percent, end_percent) of each conditioning entry that has a range, as ComfyUI holds it."""
    return sorted((float(a), float(b)) for a, b in
                  re.findall(r"'start_percent': ([0-9.]+), 'end_percent': ([0-9.]+)", conditioning_text))


def test_file_default_start_reaches_a_fresh_apply_stea(server, photos, sd15_checkpoint):
    """FastComposer's importer stores start 0.3 in the projector file; an Apply STEA left at what
    a fresh node gets must sample with it: the conditioning ComfyUI sees has plain text before
    0.3 and the identity after, the node says where the value came from, and the image is the
    one an explicit 0.3 gives. A value set on the node (0.0, as older saved graphs hold) wins."""
    spec = server.client.object_info("PortraitBoothApplySTEA")["PortraitBoothApplySTEA"]["input"]["required"]
    fresh = spec["start_percent"][1]["default"]
    assert fresh == FROM_FILE and "from the file" in spec["start_percent"][1]["tooltip"]

    image, used, conditioning = _portrait_and_conditioning(server, photos["obama"], sd15_checkpoint, fresh)
    assert used == ("identity from start 0.30 (from the file) to end 1.00; fastcomposer_postfuse.safetensors "
                    "suggests CFG 5 in the sampler"), used
    assert _ranges(conditioning) == [(0.0, 0.3), (0.3, 1.0)], conditioning[:2000]

    explicit, used, conditioning = _portrait_and_conditioning(server, photos["obama"], sd15_checkpoint, 0.3)
    assert used.startswith("identity from start 0.30 (set on the node)"), used
    assert np.array_equal(explicit, image), "start from the file must sample exactly like an explicit 0.3"

    early, used, conditioning = _portrait_and_conditioning(server, photos["obama"], sd15_checkpoint, 0.0)
    assert used.startswith("identity from start 0.00 (set on the node)"), used
    assert _ranges(conditioning) == [], conditioning[:2000]  # identity over the whole schedule: no range
    assert not np.array_equal(early, image)


def test_single_subject_template_follows_the_face(server, photos, sd15_checkpoint):
    first = portrait(server, photos["obama"], sd15_checkpoint)
    assert first.shape == (64, 64, 3) and first.std() > 0
    assert np.array_equal(portrait(server, photos["obama_again"], sd15_checkpoint), first), \
        "same face, same seed: same image"
    # At the file's start 0.3 (the template takes it) the face only steers the last steps, which move a
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


ECAC_PROMPT = "a photo of a man, portrait, smiling, natural light"


def ecac_portrait(server, photo, checkpoint, strength: float | None, score: bool = False) -> tuple[list, object]:
    """The FastComposer single-subject template (batch of 2) with ECAC Attention Patch on the
    imported UNet, its words from Apply STEA's FastComposer conditioning, and Attention Map
    Preview; strength None: the template's plain sampler. score: Identity Score ranks
    [reference photo, the 2 outputs] against the photo's identity (zero-download encoder).
    Returns (the 2 images, the run's result)."""
    graph = with_inputs(load_api_workflow("portraitbooth_fastcomposer_single_subject"), {
        "1": {"ckpt_name": checkpoint},
        "5": {"image": photo},
        "7": {"text": ECAC_PROMPT},
        "9": {"width": 64, "height": 64, "batch_size": 2},
        "10": {"seed": 3, "steps": 3},
    })
    if strength is not None:
        graph.update({
            "20": {"class_type": "PortraitBoothECACPatch",
                   "inputs": {"model": ["3", 0], "clip": ["1", 1], "text": ECAC_PROMPT,
                              "identity_words": "man, woman", "strength": strength, "start_percent": 0.0,
                              "end_percent": 1.0, "beta": 0.8, "gamma": 0.1,
                              "layers": "16x16 layers (recommended)", "capture_maps": True,
                              "stea_conditioning": ["7", 0]}},
            "21": {"class_type": "PortraitBoothAttentionPreview",
                   "inputs": {"model": ["20", 0], "image": ["11", 0], "opacity": 0.6}},
            "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "fc_ecac_maps"}},
        })
        graph["10"]["inputs"]["model"] = ["20", 0]
    if score:
        graph.update({
            "30": {"class_type": "PortraitBoothLoadFaceEncoder",
                   "inputs": {"pack": "none (zero-download RetinaFace)", "detector": "auto", "recognizer": "auto",
                              "provider": "auto", "det_size": 640, "mask_ears": False, "mask_hair": False,
                              "mask_neck": False}},
            "31": {"class_type": "PortraitBoothAnalyzeFaces",
                   "inputs": {"face_encoder": ["30", 0], "images": ["5", 0], "select": "largest", "face_index": 0,
                              "on_no_face": "error", "det_threshold": 0.6}},
            # The photo first (the outputs are scaled to its size): the positive control.
            "32": {"class_type": "ImageBatch", "inputs": {"image1": ["5", 0], "image2": ["11", 0]}},
            "33": {"class_type": "PortraitBoothIdentityScore",
                   "inputs": {"face_encoder": ["30", 0], "reference": ["31", 0], "images": ["32", 0],
                              "sort": True, "det_threshold": 0.6}},
            "34": {"class_type": "PreviewAny", "inputs": {"source": ["33", 3]}},
        })
    result = server.client.run(graph, timeout=600)
    images = [np.asarray(Image.open(io.BytesIO(server.client.fetch(f))).convert("RGB"), dtype=np.int16)
              for f in result.images("12")]
    return images, result


def test_ecac_and_identity_score_run_with_imported_fastcomposer_weights(server, photos, sd15_checkpoint):
    controlled, result = ecac_portrait(server, photos["obama"], sd15_checkpoint, strength=1.0, score=True)
    plain, _ = ecac_portrait(server, photos["obama"], sd15_checkpoint, strength=None)
    off, _ = ecac_portrait(server, photos["obama"], sd15_checkpoint, strength=0.0)
    assert len(controlled) == 2 and controlled[0].shape == (64, 64, 3)
    # strength 0 is the unpatched model bit for bit; at 1 the expression control moves the image.
    assert all(np.array_equal(a, b) for a, b in zip(off, plain)), "ECAC strength 0 must not change the image"
    assert any(not np.array_equal(a, b) for a, b in zip(controlled, plain)), \
        "ECAC at strength 1 on FastComposer's conditioning changed nothing"
    # The maps come from Apply STEA's entry: the class word and the expression word, per image.
    maps = result.images("22")
    assert len(maps) == 2 * 2, f"expected 2 images x (identity, smiling) overlays, got {len(maps)}"

    (report,) = result.texts("34")
    lines = report.splitlines()
    assert lines[0].startswith("Identity Score (dlib") and "best first" in lines[0], report
    scored = {line.split(":")[0] for line in lines[1:-1]}
    assert scored == {"image 0", "image 1", "image 2"}, report  # the photo and both outputs
    assert lines[1].startswith("image 0: score 1.000") and lines[1].endswith("-> same person"), report
