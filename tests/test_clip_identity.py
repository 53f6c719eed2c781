"""The CLIP-image identity branch and projector kinds in the weight file (no ComfyUI server)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from portraitbooth_core.face.clip_image import (
    CLIP_VISION_KIND, clip_image_identity, fastcomposer_pixels, person_crop_box,
)
from portraitbooth_core.face.errors import IdentityError
from portraitbooth_core.face.identity import mix_identities
from portraitbooth_core.stea.postfuse import FastComposerPostfuse, postfuse_config
from portraitbooth_core.stea.projector import ProjectorConfig, STEAProjector, build_projector
from portraitbooth_core.weights.file import load_portraitbooth, save_portraitbooth
from portraitbooth_core.weights.meta import FaceEncoderSpec, NewerFormatError


class FakeClipVision:
    """ComfyUI's ClipVisionModel interface; the embedding is a fixed linear map of the pixels."""

    image_size = 224

    def __init__(self):
        self.seen = []
        self.weight = torch.randn(3 * 8 * 8, 768, generator=torch.Generator().manual_seed(0))

    def encode_image(self, pixels, crop=True):
        self.seen.append((pixels.clone(), crop))
        small = torch.nn.functional.adaptive_avg_pool2d(pixels.movedim(-1, 1), 8).flatten(1)
        return {"image_embeds": small @ self.weight}


def test_identity_is_raw_and_uses_fastcomposer_pixels():
    model = FakeClipVision()
    photos = [torch.rand(300, 200, 3), torch.rand(120, 160, 3)]
    ident = clip_image_identity(model, photos, names=["a", "b"])
    pixels, crop = model.seen[0]
    assert crop is False and pixels.shape == (2, 224, 224, 3)
    assert torch.equal(pixels, fastcomposer_pixels(photos))
    assert (pixels * 255 - (pixels * 255).round()).abs().max() < 1e-4  # uint8 levels, as upstream
    # black bars left/right of the portrait, top/bottom of the landscape photo
    assert pixels[0, :, :10].abs().max() == 0 and pixels[1, :10].abs().max() == 0
    assert ident.kind == CLIP_VISION_KIND and ident.metadata["normalized"] is False
    torch.testing.assert_close(ident.vector, ident.embeddings.mean(0))
    assert abs(float(ident.vector.norm()) - 1.0) > 0.1  # not L2-normalized


def test_mixing_clip_identities_keeps_their_scale():
    model = FakeClipVision()
    a = clip_image_identity(model, torch.rand(1, 64, 64, 3))
    b = clip_image_identity(model, torch.rand(1, 64, 64, 3))
    mixed = mix_identities(a, b, 0.25)
    torch.testing.assert_close(mixed.vector, 0.75 * a.vector + 0.25 * b.vector)
    assert mixed.metadata["normalized"] is False


def test_person_crop_box_and_crop():
    assert person_crop_box((40, 30, 60, 54), 200, 300) == (20, 18, 80, 102)
    assert person_crop_box((0, 0, 50, 50), 60, 60) == (0, 0, 60, 60)  # clipped to the image
    with pytest.raises(IdentityError, match="outside"):
        person_crop_box((500, 500, 520, 520), 100, 100)
    image = torch.rand(1, 100, 100, 3)
    cropped = fastcomposer_pixels(image, boxes=[(10, 20, 60, 70)])
    torch.testing.assert_close(cropped, fastcomposer_pixels(image[:, 20:70, 10:60]))


def test_build_projector_by_kind():
    assert type(build_projector(ProjectorConfig())) is STEAProjector
    assert type(build_projector(postfuse_config())) is FastComposerPostfuse
    with pytest.raises(ValueError, match="build_projector"):
        STEAProjector(postfuse_config())
    n = sum(p.numel() for p in FastComposerPostfuse().parameters())
    assert n == 2_958_336  # ~3M parameters, as the released module


def _rewrite_meta(src, dst, change):
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["portraitbooth"])
    change(meta)
    save_file(tensors, str(dst), metadata={"portraitbooth": json.dumps(meta)})
    return dst


def test_files_without_kind_load_as_portraitbooth_mlp(tmp_path):
    proj = STEAProjector(ProjectorConfig(face_dim=512, hidden_dim=64))
    path = save_portraitbooth(tmp_path / "pb.safetensors", proj, FaceEncoderSpec("arcface:x", 512))
    old = _rewrite_meta(path, tmp_path / "old.safetensors", lambda m: m["projector"].pop("kind"))
    model = load_portraitbooth(old)
    assert model.info.projector.kind == "portraitbooth_mlp" and isinstance(model.projector, STEAProjector)
    future = _rewrite_meta(path, tmp_path / "future.safetensors", lambda m: m["projector"].update(kind="photomaker_fuse"))
    with pytest.raises(NewerFormatError, match="'photomaker_fuse' projector.*Update the PortraitBooth node pack"):
        load_portraitbooth(future)


def test_postfuse_file_round_trip(tmp_path):
    proj = FastComposerPostfuse()
    spec = FaceEncoderSpec(CLIP_VISION_KIND, 768, "image_embeds", "CLIP ViT-L/14 image embedding")
    path = save_portraitbooth(tmp_path / "fc.safetensors", proj, spec, defaults={"start_percent": 0.3},
                              source={"model": "FastComposer"})
    model = load_portraitbooth(path, CLIP_VISION_KIND, 768)
    assert isinstance(model.projector, FastComposerPostfuse)
    assert model.info.face_encoder == spec and model.info.defaults == {"start_percent": 0.3}
    psi, phi = torch.randn(2, 768), torch.randn(2, 768)
    torch.testing.assert_close(model.projector(psi, phi), proj(psi, phi))
