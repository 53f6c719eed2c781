"""The PortraitBooth weight file: round trip, and one clear message per kind of bad file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stea_fixtures import DIM, KIND, lora_patch, write_model
from portraitbooth_core.weights.file import load_portraitbooth, save_portraitbooth
from portraitbooth_core.weights.meta import (
    METADATA_KEY, CorruptWeightFileError, EmbeddingMismatchError, FaceEncoderSpec, MissingKeysError,
    NewerFormatError, NotPortraitBoothFileError, WrongBaseModelError, check_embedding,
)


def rewrite(src, dst, drop=(), add=None, meta_update=None):
    """Copy a PortraitBooth file with tensors dropped/added or metadata fields changed."""
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
        meta = json.loads(f.metadata()[METADATA_KEY])
    tensors.update(add or {})
    meta.update(meta_update or {})
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(meta)})
    return dst


@pytest.fixture
def good(tmp_path):
    return write_model(tmp_path / "good.safetensors", patch=lora_patch())


def test_round_trip_keeps_projector_patch_and_metadata(tmp_path):
    from stea_fixtures import projector

    proj, patch = projector(3), lora_patch(1)
    path = save_portraitbooth(tmp_path / "pb.safetensors", proj, FaceEncoderSpec(KIND, DIM), patch,
                              class_words=["man", "woman"], training={"lr": 1e-5, "steps": 100})
    assert [p.name for p in tmp_path.iterdir()] == ["pb.safetensors"]  # no temp file left behind
    pb = load_portraitbooth(path, expected_embedding_kind=KIND, expected_embedding_dim=DIM)
    for k, v in proj.state_dict().items():
        assert torch.equal(pb.projector.state_dict()[k], v)
    assert pb.unet_patch.keys() == patch.keys()
    assert all(torch.equal(pb.unet_patch[k], v) for k, v in patch.items())
    info = pb.info
    assert (info.base, info.format_version, info.face_encoder) == ("sd15", 1, FaceEncoderSpec(KIND, DIM))
    assert info.class_words == ("man", "woman") and len(info.emotion_words) == 11
    assert info.training == {"lr": 1e-5, "steps": 100}
    assert info.unet_patch == {"format": "lora", "tensors": len(patch)}
    assert info.projector == proj.config and not pb.projector.training


def test_projector_only_file_has_no_patch(tmp_path):
    pb = load_portraitbooth(write_model(tmp_path / "p.safetensors"))
    assert pb.unet_patch == {} and pb.info.unet_patch["format"] == "none"


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                     .numpy().tobytes())
    with pytest.raises(CorruptWeightFileError, match="noise.safetensors is corrupt or not a safetensors file"):
        load_portraitbooth(path)


def test_truncated_download(tmp_path, good):
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptWeightFileError, match=f"truncated: {len(data) - 1000} of {len(data)} bytes"):
        load_portraitbooth(cut)


def test_plain_lora_is_not_a_portraitbooth_file(tmp_path):
    path = tmp_path / "style_lora.safetensors"
    save_file(lora_patch(), str(path))
    with pytest.raises(NotPortraitBoothFileError, match="not a PortraitBooth file: it looks like a plain LoRA"):
        load_portraitbooth(path)


def test_checkpoint_is_not_a_portraitbooth_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, str(path))
    with pytest.raises(NotPortraitBoothFileError, match="full checkpoint"):
        load_portraitbooth(path)


def test_sdxl_by_metadata(tmp_path, good):
    path = rewrite(good, tmp_path / "xl.safetensors", meta_update={"base": "sdxl"})
    with pytest.raises(WrongBaseModelError, match="made for base model 'sdxl'.*Stable Diffusion 1.5 only"):
        load_portraitbooth(path)


def test_sdxl_by_tensor_shapes(tmp_path, good):
    # Metadata claims sd15, but the cross-attention LoRA reads a 2048-wide text context.
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    xl = {f"{key}.lora_down.weight": torch.zeros(4, 2048), f"{key}.lora_up.weight": torch.zeros(640, 4)}
    path = rewrite(good, tmp_path / "xl.safetensors", drop=lora_patch().keys(), add=xl,
                   meta_update={"unet_patch": {"format": "lora", "tensors": 2}})
    with pytest.raises(WrongBaseModelError, match="patches a sdxl UNet"):
        load_portraitbooth(path)


def test_newer_format_says_update_the_pack(tmp_path, good):
    path = rewrite(good, tmp_path / "v2.safetensors", meta_update={"format_version": 2, "renamed": True})
    with pytest.raises(NewerFormatError, match="format 2.*reads only up to format 1.*Update the PortraitBooth"):
        load_portraitbooth(path)


def test_missing_keys_are_listed(tmp_path, good):
    down = "lora_unet_input_blocks_1_1_proj_in.lora_down.weight"
    path = rewrite(good, tmp_path / "holes.safetensors", drop=["stea.fc2.weight", down])
    with pytest.raises(MissingKeysError, match=f"missing tensors: {down}, stea.fc2.weight"):
        load_portraitbooth(path)


def test_missing_patch_tensors_against_declared_count(tmp_path, good):
    alpha = "lora_unet_input_blocks_1_1_proj_in.alpha"
    path = rewrite(good, tmp_path / "less.safetensors", drop=[alpha])
    with pytest.raises(MissingKeysError, match="declares 6 UNet patch tensors but holds 5"):
        load_portraitbooth(path)


def test_embedding_dimension_mismatch(good):
    with pytest.raises(EmbeddingMismatchError,
                       match=r"expects 512-d face embeddings .* gives 128-d embeddings \(dlib:resnet128\)"):
        load_portraitbooth(good, expected_embedding_kind="dlib:resnet128", expected_embedding_dim=128)


def test_recognizer_check():
    from portraitbooth_core.stea.projector import ProjectorConfig
    from portraitbooth_core.weights.meta import PortraitBoothInfo

    meta = PortraitBoothInfo(ProjectorConfig(face_dim=512), FaceEncoderSpec("arcface:antelopev2/glintr100.onnx", 512))
    assert check_embedding(meta, "arcface:antelopev2/glintr100.onnx", 512) is None
    assert "buffalo_l" in check_embedding(meta, "arcface:buffalo_l/w600k_r50.onnx", 512)
    with pytest.raises(EmbeddingMismatchError, match="Choose a 'arcface' face encoder"):
        check_embedding(meta, "facenet:vggface2", 512)


def test_save_refuses_keys_comfyui_would_not_load(tmp_path):
    from stea_fixtures import projector

    with pytest.raises(ValueError, match="ComfyUI LoRA/diff keys"):
        save_portraitbooth(tmp_path / "x.safetensors", projector(), FaceEncoderSpec(KIND, DIM),
                           {"input_blocks.1.1.proj_in.weight": torch.zeros(320, 320, 1, 1)})
    assert not list(tmp_path.iterdir())
