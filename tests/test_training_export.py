"""Export: the weight file reproduces the trained model when ComfyUI applies it, carries
the metadata the nodes check, and loads in Load PortraitBooth Model on a real server."""
from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
import torch

from conftest import MODELS_DIR, TEST_CHECKPOINT
from training_fixtures import *  # noqa: F401,F403
from training_fixtures import train_config


def trained(dataset_dir, tmp_path, mode: str, **overrides):
    from training.run.trainer import Trainer

    t = Trainer(train_config(dataset_dir, tmp_path, **{"mode": mode, "steps": 2, **overrides}))
    return t, t.run()


def unet_output(base, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        return base.apply_model(x, torch.tensor([1.5, 0.3]), c_crossattn=cond)


@pytest.mark.parametrize("mode,rtol", [("lora", 1e-5), ("full", 2e-3)])  # full: diffs stored in fp16
def test_comfyui_applying_the_export_reproduces_the_trained_unet(sd15_checkpoint, dataset_dir, tmp_path, mode, rtol):
    import comfy.model_management
    import comfy.sd

    from portraitbooth_core.weights.file import load_portraitbooth

    t, path = trained(dataset_dir, tmp_path, mode)
    try:
        expected = unet_output(t.models.base)
        pb = load_portraitbooth(path)
        fresh, *_ = comfy.sd.load_checkpoint_guess_config(str(MODELS_DIR / "checkpoints" / TEST_CHECKPOINT),
                                                          output_vae=False, output_clip=False,
                                                          model_options={"dtype": torch.float32})
        untouched = unet_output(fresh.model)
        patched, _ = comfy.sd.load_lora_for_models(fresh, None, pb.unet_patch, 1.0, 0.0)
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        got = unet_output(patched.model)
        patched.unpatch_model()
    finally:
        t.close()
    assert (expected - untouched).abs().max() > 1e-3  # training changed the UNet...
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))  # ...and so does the file
    assert pb.info.unet_patch["format"] == ("lora" if mode == "lora" else "diff")


def test_export_metadata_and_frozen_mode(sd15_checkpoint, dataset_dir, tmp_path):
    from portraitbooth_core.vocabulary import EMOTIONS
    from portraitbooth_core.weights.file import load_portraitbooth

    t, path = trained(dataset_dir, tmp_path, "frozen", steps=1)
    try:
        projector = {k: v.detach().cpu() for k, v in t.projector.state_dict().items()}
    finally:
        t.close()
    pb = load_portraitbooth(path, expected_embedding_kind="arcface:standin/w600k_r50.onnx",
                            expected_embedding_dim=512)
    info = pb.info
    assert pb.unet_patch == {} and info.unet_patch["format"] == "none"
    assert info.face_encoder.kind == "arcface:standin/w600k_r50.onnx" and info.face_encoder.feature == "final"
    assert info.class_words == ("man", "woman") and info.emotion_words == tuple(EMOTIONS)
    assert info.training["mode"] == "frozen" and info.training["steps"] == 1 and info.training["samples"] == 5
    assert info.training["loss_weights"] == {"noise": 1.0, "loc": 1.0, "id": 1.0}
    for name, value in pb.projector.state_dict().items():
        torch.testing.assert_close(value, projector[name])


@pytest.fixture
def exported_in_models_folder(sd15_checkpoint, dataset_dir, tmp_path):
    """A full-UNet export placed where the server's Load PortraitBooth Model looks."""
    t, path = trained(dataset_dir, tmp_path, "full")
    t.close()
    folder = MODELS_DIR / "portraitbooth"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"test_training_{uuid.uuid4().hex[:8]}.safetensors"
    target.write_bytes(path.read_bytes())
    yield target.name
    target.unlink(missing_ok=True)


def graph(name: str, strength: float) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {"class_type": "PortraitBoothLoadModel",
              "inputs": {"model": ["1", 0], "portraitbooth_name": name, "strength": strength}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a man", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"pbtrain_{strength}"}},
    }


def test_exported_file_loads_in_the_server_and_changes_the_image(comfy, exported_in_models_folder):
    from PIL import Image

    info = comfy.object_info("PortraitBoothLoadModel")["PortraitBoothLoadModel"]
    names = info["input"]["required"]["portraitbooth_name"]
    options = names[0] if isinstance(names[0], list) else names[1]["options"]
    assert exported_in_models_folder in options

    def image(strength: float) -> np.ndarray:
        result = comfy.run(graph(exported_in_models_folder, strength))
        return np.asarray(Image.open(io.BytesIO(comfy.fetch(result.images("8")[0]))).convert("RGB"), np.int16)

    plain, patched = image(0.0), image(1.0)
    assert np.abs(patched - plain).mean() > 1.0, "the trained UNet patch did not change the image"
