"""Through a real ComfyUI server: ECAC Attention Patch + Attention Map Preview in a workflow."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

PROMPT = "a photo of a smiling woman, crying"


def ecac_graph(checkpoint: str, strength: float = 1.0, batch: int = 1) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "5": {"class_type": "PortraitBoothECACPatch",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "text": PROMPT,
                         "identity_words": "man, woman, person, boy, girl", "strength": strength,
                         "start_percent": 0.0, "end_percent": 1.0, "beta": 0.8, "gamma": 0.1,
                         "layers": "16x16 layers (recommended)", "capture_maps": True}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["5", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                         "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PortraitBoothAttentionPreview",
              "inputs": {"model": ["5", 0], "image": ["7", 0], "opacity": 0.6}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ecac_preview"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "ecac_image"}},
    }


def _pixels(comfy, record) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(comfy.fetch(record))).convert("RGB"))


def test_patch_and_preview_run_in_a_workflow(comfy, sd15_checkpoint):
    info = comfy.get_json("/object_info")
    missing = [n for n in ("PortraitBoothECACPatch", "PortraitBoothAttentionPreview") if n not in info]
    assert not missing, f"{missing} not registered: nodes/__init__.py must list *ecac.NODES"
    assert info["PortraitBoothECACPatch"]["category"] == "PortraitBooth/ecac"

    result = comfy.run(ecac_graph(sd15_checkpoint, batch=2))
    previews, images = result.images("9"), result.images("10")
    assert len(images) == 2 and len(previews) == 2 * 3  # per image: woman, smiling, crying
    pictures = [_pixels(comfy, r) for r in images]
    overlays = [_pixels(comfy, r) for r in previews]
    assert all(o.shape == (64, 64, 3) for o in overlays)
    # each overlay is its image with a heat map blended in, and the words' maps differ
    assert not np.array_equal(overlays[0], pictures[0]) and not np.array_equal(overlays[3], pictures[1])
    assert not np.array_equal(overlays[0][20:], overlays[1][20:])

    # strength 0 leaves the sampled image exactly as the unpatched model makes it
    zero = comfy.run(ecac_graph(sd15_checkpoint, strength=0.0))
    plain_graph = ecac_graph(sd15_checkpoint)
    plain_graph["6"]["inputs"]["model"] = ["1", 0]
    del plain_graph["8"], plain_graph["9"]
    plain = comfy.run(plain_graph)
    assert np.array_equal(_pixels(comfy, zero.images("10")[0]), _pixels(comfy, plain.images("10")[0]))
