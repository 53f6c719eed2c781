"""FastComposer import: conversion exactness at a small config in the released layout,
full-size SD1.5 key coverage (shapes only, meta device), and each bad-file message.

The small release is built here with diffusers' UNet2DConditionModel and transformers'
CLIP models (random weights, no download), saved with torch.save like the real
pytorch_model.bin, and imported with the real CLI.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import diffusers  # noqa: F401  (requirements-test.txt: the references these tests compare with)
import transformers  # noqa: F401

from portraitbooth_core.face.clip_image import (  # noqa: E402
    CLIP_VISION_KIND, clip_image_identity, fastcomposer_pixels, normalize_pixels, pad_to_square,
)
from portraitbooth_core.stea.projector import splice_identity  # noqa: E402
from portraitbooth_core.weights.file import load_portraitbooth  # noqa: E402
from portraitbooth_core.weights.meta import EmbeddingMismatchError, check_embedding  # noqa: E402
from portraitbooth_core.weights.formats import fastcomposer as fc  # noqa: E402
from training.__main__ import main as cli  # noqa: E402
from standins.fastcomposer import POSTFUSE_SHAPES, TINY_TEXT, TINY_UNET, TINY_VAE, VISION  # noqa: E402

# The small release's configs are the stand-in's (standins/fastcomposer.py): the file the
# server tests import is built from the same ones.
TINY_VISION, VIT_L14 = VISION["tiny"], VISION["vit-l"]
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # rest: diffusers' defaults = SD1.5
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")


def _models(unet_cfg=TINY_UNET, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT, vae_cfg=TINY_VAE):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    return (UNet2DConditionModel(**unet_cfg), CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_cfg)),
            CLIPTextModel(CLIPTextConfig(**text_cfg)), AutoencoderKL(**vae_cfg))


def release_dict(unet, vision, text, vae, postfuse: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released layout: unet.*, text_encoder.* (no text_model.), image_encoder.*, vae.*,
    postfuse_module.*, plus the position_ids buffers older transformers saved."""
    # clone: the tests later round the reference models' weights in place
    sd = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    # transformers 4 names the text tower text_model.*, 5 does not; the release has neither
    sd.update({f"text_encoder.{k.removeprefix('text_model.')}": v.detach().clone() for k, v in text.state_dict().items()})
    sd.update({f"image_encoder.{k}": v.detach().clone() for k, v in vision.state_dict().items()})
    sd.update({f"vae.{k}": v.detach().clone() for k, v in vae.state_dict().items()})
    sd.update({f"postfuse_module.{k}": v.detach().clone() for k, v in postfuse.items()})
    positions = vision.config.image_size // vision.config.patch_size
    sd.setdefault("image_encoder.vision_model.embeddings.position_ids", torch.arange(positions ** 2 + 1)[None])
    sd.setdefault("text_encoder.embeddings.position_ids", torch.arange(77)[None])
    return sd


def _randomize(module: torch.nn.Module, seed: int) -> None:
    # Non-trivial norms and biases everywhere so a swapped key cannot hide behind 0/1 values.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p[0].numel(), 1) ** 0.5)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    torch.manual_seed(0)
    unet, vision, text, vae = _models()
    for i, m in enumerate((unet, vision, text, vae)):
        _randomize(m, i)
    gen = torch.Generator().manual_seed(7)
    postfuse = {k: (1.0 if k.endswith("norm.weight") else 0.0) + torch.randn(s, generator=gen) / (s[-1] ** 0.5 if len(s) > 1 else 10)
                for k, s in POSTFUSE_SHAPES.items()}
    sd = release_dict(unet, vision, text, vae, postfuse)
    path = tmp_path_factory.mktemp("release") / "pytorch_model.bin"
    torch.save(sd, path)
    return {"path": path, "sd": sd, "unet": unet.eval(), "vision": vision.eval(), "postfuse": postfuse}


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    assert cli(["import-fastcomposer", str(release["path"]), "--models", str(models)]) == 0
    return models


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _rounded(module: torch.nn.Module, dtype=torch.float16) -> torch.nn.Module:
    # The reference with the same fp16-rounded weights the default import writes, so the
    # comparison measures the key mapping and the maths, not fp16 rounding.
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).float())
    return module


def test_import_writes_three_files_and_report(imported, capsys):
    outputs = fc.output_paths(imported)
    for path in outputs.values():
        assert path.is_file(), path
    assert not [p for p in imported.rglob(".*") if p.is_file()], "temp files left behind"
    unet, meta = _read(outputs["unet"])
    assert {v.dtype for v in unet.values()} == {torch.float16}  # fp16 by default
    assert json.loads(meta["portraitbooth_import"])["base"] == "sd15"
    clip, _ = _read(outputs["clip_vision"])
    assert {v.dtype for v in clip.values()} == {torch.float16}
    assert "visual_projection.weight" in clip and not any(k.endswith("position_ids") for k in clip)


def test_cli_never_overwrites_without_flag(release, imported, capsys):
    outputs = fc.output_paths(imported)
    before = {k: p.stat().st_mtime_ns for k, p in outputs.items()}
    assert cli(["import-fastcomposer", str(release["path"]), "--models", str(imported)]) == 2
    err = capsys.readouterr().err
    assert "already imported" in err and "--overwrite" in err and str(outputs["unet"]) in err
    assert before == {k: p.stat().st_mtime_ns for k, p in outputs.items()}
    assert cli(["import-fastcomposer", str(release["path"]), "--models", str(imported), "--overwrite"]) == 0
    out = capsys.readouterr().out
    for node in ("Load Diffusion Model", "Load CLIP Vision", "Load PortraitBooth Model", "Apply STEA Conditioning",
                 "start_percent at -1 (from the file: 0.3"):
        assert node in out
    assert all(outputs[k].stat().st_mtime_ns >= before[k] for k in outputs)


def test_unet_loaded_by_comfyui_equals_diffusers(release, imported):
    """Tolerance: max |diff| <= 1e-4 (abs) + 1e-4 (rel), both sides fp32 maths on the same
    fp16-rounded weights; any swapped or missing key gives differences of order 1."""
    import comfy.sd
    import comfy.supported_models

    patcher = comfy.sd.load_diffusion_model(str(fc.output_paths(imported)["unet"]))
    assert isinstance(patcher.model.model_config, comfy.supported_models.SD15)
    comfy_unet = patcher.model.diffusion_model.float().eval()
    reference = _rounded(release["unet"])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 77, 768, generator=gen)
    with torch.no_grad():
        want = reference(x, t, encoder_hidden_states=ctx).sample
        got = comfy_unet(x, timesteps=t, context=ctx)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_failure_midway_leaves_nothing(release, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the UNet was written

    monkeypatch.setattr(fc, "convert_clip_vision", broken)
    with pytest.raises(KeyboardInterrupt):
        fc.import_fastcomposer(release["path"], tmp_path, progress=False)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_fp32_import_keeps_exact_values(release, tmp_path):
    report = fc.import_fastcomposer(release["path"], tmp_path, dtype="fp32", progress=False)
    unet, _ = _read(report.unet)
    mapping = fc.unet_key_map({k[5:]: tuple(v.shape) for k, v in release["sd"].items() if k.startswith("unet.")})[1]
    assert len(unet) == len(mapping)
    for d, c in mapping.items():
        assert torch.equal(unet[c], release["sd"]["unet." + d]), (d, c)


def test_clip_vision_embedding_equals_transformers(release, imported, tmp_path):
    """Our preprocessing + ComfyUI's CLIP vision model on the imported file = transformers'
    CLIPVisionModelWithProjection.image_embeds on the same pixels. Tolerance 1e-4 abs/rel
    (fp32 maths on both sides, same fp16-rounded weights)."""
    import comfy.clip_vision

    path = fc.output_paths(imported)["clip_vision"]
    sd, meta = _read(path)
    config = json.loads(meta["portraitbooth_import"])["config"]
    (tmp_path / "vision.json").write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(tmp_path / "vision.json"))
    missing, unexpected = model.load_sd(sd)
    assert not missing and not unexpected
    model.model.float()
    gen = torch.Generator().manual_seed(5)
    photo = torch.rand(1, 300, 200, 3, generator=gen)  # portrait: padded left and right
    identity = clip_image_identity(model, photo, names=["photo"])
    reference = _rounded(release["vision"])
    with torch.no_grad():
        want = reference(pixel_values=normalize_pixels(fastcomposer_pixels(photo))).image_embeds
    assert identity.kind == CLIP_VISION_KIND and identity.dim == 768
    assert identity.metadata["normalized"] is False
    torch.testing.assert_close(identity.vector[None], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(identity.embeddings, want, atol=1e-4, rtol=1e-4)


def test_preprocessing_matches_fastcomposer_transforms():
    """FastComposer's test object transform: uint8 photo -> PadToSquare(0) -> Resize((224,224),
    bilinear, antialias) on uint8 -> /255. Same within one uint8 level (torchvision's uint8
    kernel and our float path may round a level apart)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    gen = torch.Generator().manual_seed(1)
    for h, w in ((300, 201), (180, 400), (224, 224), (97, 97)):
        photo = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        chw = photo.permute(2, 0, 1)
        diff = abs(h - w) // 2
        padded = F.pad(chw, (diff, diff, 0, 0) if h > w else (0, 0, diff, diff))  # FastComposer's PadToSquare
        assert torch.equal(pad_to_square(chw.float()), padded.float())
        upstream = TF.resize(padded, [224, 224], interpolation=InterpolationMode.BILINEAR, antialias=True).float() / 255
        ours = fastcomposer_pixels(photo.float()[None] / 255)[0].permute(2, 0, 1)
        assert ours.shape == (3, 224, 224)
        assert (ours - upstream).abs().max() <= 1 / 255 + 1e-6
        assert (ours - upstream).abs().mean() < 0.2 / 255


def _reference_postfuse(w: dict[str, torch.Tensor], text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Written from the architecture: LN -> fc1 1536->768 -> GELU -> fc2, + text token;
    LN -> fc1 -> GELU -> fc2 + residual; final LN."""
    def mlp(x, p):
        x = F.layer_norm(x, x.shape[-1:], w[f"{p}.layernorm.weight"], w[f"{p}.layernorm.bias"], 1e-5)
        x = F.linear(x, w[f"{p}.fc1.weight"], w[f"{p}.fc1.bias"])
        return F.linear(F.gelu(x), w[f"{p}.fc2.weight"], w[f"{p}.fc2.bias"])

    x = mlp(torch.cat([text, image], -1), "mlp1") + text
    x = mlp(x, "mlp2") + x
    return F.layer_norm(x, x.shape[-1:], w["layer_norm.weight"], w["layer_norm.bias"], 1e-5)


def test_postfuse_file_and_splice_equal_reference(release, imported):
    """Tolerance 1e-5 abs/rel (fp32 both sides; the projector is stored in fp32)."""
    path = fc.output_paths(imported)["portraitbooth"]
    model = load_portraitbooth(path, expected_embedding_kind=CLIP_VISION_KIND, expected_embedding_dim=768)
    info = model.info
    assert info.projector.kind == "fastcomposer_postfuse"
    assert (info.projector.text_dim, info.projector.face_dim, info.projector.hidden_dim) == (768, 768, 768)
    assert info.face_encoder.kind == CLIP_VISION_KIND and info.face_encoder.dim == 768
    # the test's tower is small; a real ViT-L/14 says so (test_full_size_...)
    assert info.face_encoder.description.startswith("CLIP image embedding (2 layers, width 128, 768-d")
    assert info.defaults["start_percent"] == pytest.approx(0.3)
    assert "mit-han-lab/fastcomposer" in info.source["repository"]
    gen = torch.Generator().manual_seed(9)
    cond = torch.randn(2, 77, 768, generator=gen)
    faces = 20 * torch.randn(2, 768, generator=gen)  # two subjects, raw CLIP-embedding scale
    positions = [3, 9]
    out = splice_identity(cond, positions, faces, model.projector)
    want = _reference_postfuse(release["postfuse"], cond[:, positions], faces[None].expand(2, -1, -1))
    torch.testing.assert_close(out[:, positions], want, atol=1e-5, rtol=1e-5)
    keep = [i for i in range(77) if i not in positions]
    assert torch.equal(out[:, keep], cond[:, keep])
    half = splice_identity(cond, positions, faces, model.projector, strength=0.5)
    torch.testing.assert_close(half[:, positions], cond[:, positions] + 0.5 * (want - cond[:, positions]),
                               atol=1e-5, rtol=1e-5)


def test_mismatched_embedding_kinds_are_clear_errors(imported):
    path = fc.output_paths(imported)["portraitbooth"]
    with pytest.raises(EmbeddingMismatchError, match=r"expects 768-d .*clip_vision:vit-l-14.*gives 512-d"):
        load_portraitbooth(path, expected_embedding_kind="arcface:antelopev2/glintr100.onnx", expected_embedding_dim=512)
    info = load_portraitbooth(path).info
    with pytest.raises(EmbeddingMismatchError, match="CLIP vision encoder .*not a face recognizer"):
        check_embedding(info, "arcface:some-768-d-recognizer", 768)
    from portraitbooth_core.stea.projector import ProjectorConfig
    from portraitbooth_core.weights.meta import FaceEncoderSpec, PortraitBoothInfo

    mlp = PortraitBoothInfo(ProjectorConfig(face_dim=768), FaceEncoderSpec("arcface:x", 768))
    with pytest.raises(EmbeddingMismatchError, match="face recognizer .*not the CLIP vision encoder"):
        check_embedding(mlp, CLIP_VISION_KIND, 768)


# ---------------------------------------------------------------- full size, shapes only


def _meta_release() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        unet, vision, text, vae = _models(SD15_UNET, VIT_L14, CLIP_L_TEXT, {})
        postfuse = {k: torch.empty(s) for k, s in POSTFUSE_SHAPES.items()}
        return release_dict(unet, vision, text, vae, postfuse)


def test_full_size_sd15_keys_all_mapped_none_left():
    import comfy.model_detection
    import comfy.supported_models

    sd = _meta_release()
    plan = fc.validate_release(sd, "full-size layout")
    unet_keys = {k[5:] for k in sd if k.startswith("unet.")}
    assert len(unet_keys) == 686
    assert set(plan.unet_map) == unet_keys  # every diffusers key mapped
    target = fc.comfy_unet_shapes(plan.unet_config)
    assert set(plan.unet_map.values()) == set(target)  # every ComfyUI key filled, none twice
    assert len(set(plan.unet_map.values())) == len(plan.unet_map)
    converted = fc.convert_unet(sd, plan.unet_map, torch.float16)
    config = comfy.model_detection.model_config_from_unet(converted, "")
    assert isinstance(config, comfy.supported_models.SD15)
    vision_keys = {k[len("image_encoder."):] for k in sd if k.startswith("image_encoder.")}
    assert set(plan.clip_keys) == vision_keys - {"vision_model.embeddings.position_ids"}
    assert set(plan.clip_keys) == set(fc.comfy_clip_vision_shapes(plan.clip_config))
    assert fc.is_vit_l14(plan.clip_config) and not plan.warnings
    # ComfyUI's CLIP vision loader picks its ViT-L/14 config for these keys; ours agrees.
    import comfy.clip_vision
    vitl = json.loads((Path(comfy.clip_vision.__file__).parent / "clip_vision_config_vitl.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size",
                "image_size", "projection_dim", "hidden_act"):
        assert plan.clip_config[key] == vitl[key], key
    assert "vision_model.encoder.layers.22.layer_norm1.weight" in plan.clip_keys
    assert plan.text_layers == 12 and plan.postfuse_config.face_dim == 768
    spec = fc.face_encoder_spec(plan.clip_config)
    assert (spec.kind, spec.dim) == (CLIP_VISION_KIND, 768)
    assert spec.description.startswith("CLIP ViT-L/14 image embedding")


# ---------------------------------------------------------------- bad files


def _save(tmp_path: Path, sd: dict, name="pytorch_model.bin") -> Path:
    path = tmp_path / name
    torch.save(sd, path)
    return path


def _import(path, tmp_path):
    return fc.import_fastcomposer(path, tmp_path / "models", progress=False)


def test_other_files_are_named(tmp_path):
    cases = {
        "Stable Diffusion checkpoint": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)},
        "bare UNet": {"conv_in.weight": torch.zeros(320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)},
        "CLIP vision model": {"vision_model.embeddings.class_embedding": torch.zeros(1024)},
        "LoRA": {"lora_unet_x.lora_up.weight": torch.zeros(4, 4), "lora_unet_x.lora_down.weight": torch.zeros(4, 4)},
    }
    for what, sd in cases.items():
        path = _save(tmp_path, sd, f"{what.replace(' ', '_')}.bin")
        with pytest.raises(fc.NotFastComposerError, match=f"not a FastComposer checkpoint: it looks like .*{what}"):
            _import(path, tmp_path)
    with pytest.raises(fc.NotFastComposerError, match="not a state dict"):
        _import(_save(tmp_path, [torch.zeros(1)], "list.bin"), tmp_path)
    assert not (tmp_path / "models").exists()  # nothing written for a refused file


def test_missing_keys_are_listed(release, tmp_path):
    sd = dict(release["sd"])
    for k in ("unet.up_blocks.1.attentions.0.proj_out.weight", "unet.mid_block.resnets.1.conv2.bias"):
        del sd[k]
    with pytest.raises(fc.MissingTensorsError, match=r"2 missing \(e\.g\. mid_block\.resnets\.1\.conv2\.bias, "
                                                     r"up_blocks\.1\.attentions\.0\.proj_out\.weight\)"):
        _import(_save(tmp_path, sd), tmp_path)
    sd = {k: v for k, v in release["sd"].items() if not k.startswith("vae.")}
    with pytest.raises(fc.MissingTensorsError, match=r"lacks whole parts .*vae\.\*"):
        _import(_save(tmp_path, sd), tmp_path)
    sd = {k: v for k, v in release["sd"].items() if k != "postfuse_module.mlp2.fc1.bias"}
    with pytest.raises(fc.MissingTensorsError, match=r"missing \['postfuse_module\.mlp2\.fc1\.bias'\]"):
        _import(_save(tmp_path, sd), tmp_path)
    sd = {k: v for k, v in release["sd"].items() if k != "image_encoder.vision_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(fc.MissingTensorsError, match=r"image encoder .*1 missing .*layers\.1\.mlp\.fc2\.bias"):
        _import(_save(tmp_path, sd), tmp_path)


def _sd2_like_unet() -> dict[str, torch.Tensor]:
    """The small release's UNet as SD2 builds it: 1024-d text context, linear projections."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(TINY_UNET, cross_attention_dim=1024, use_linear_projection=True))
    return {f"unet.{k}": torch.zeros(v.shape) for k, v in unet.state_dict().items()}


ATTN = "unet.down_blocks.0.attentions.0"
WRONG_SHAPES = {
    # case: (tensors replaced in the small release, what the message says of them, the tensors named
    # with (found) and (expected) shapes)
    "a UNet tensor": ({f"{ATTN}.transformer_blocks.0.ff.net.2.weight": (320, 100)}, "UNet tensors with the wrong shape",
                      [(f"{ATTN}.transformer_blocks.0.ff.net.2.weight", (320, 100), "(320, 1280) (SD1.5's layout)")]),
    "an SD2-like UNet": ("sd2", "the UNet is not SD1.5's (FastComposer's release is SD1.5)",
                         [(f"{ATTN}.transformer_blocks.0.attn2.to_k.weight", (320, 1024), (320, 768)),
                          (f"{ATTN}.proj_in.weight", (320, 320), (320, 320, 1, 1))]),
    "a postfuse tensor": ({"postfuse_module.mlp2.fc2.weight": (768, 512)}, "postfuse tensors with the wrong shape",
                          [("postfuse_module.mlp2.fc2.weight", (768, 512), (768, 768))]),
    "an image encoder tensor": ({"image_encoder.vision_model.encoder.layers.0.mlp.fc2.weight": (128, 100)},
                                "image encoder tensors with the wrong shape",
                                [("image_encoder.vision_model.encoder.layers.0.mlp.fc2.weight", (128, 100),
                                  (128, 256))]),
    "a position table of no ViT": ({"image_encoder.vision_model.embeddings.position_embedding.weight": (51, 128)},
                                   "the image encoder's position table is not a ViT's",
                                   [("image_encoder.vision_model.embeddings.position_embedding.weight", (51, 128),
                                     "(1 + a square number of patches, 128), e.g. (257, 1024) for CLIP ViT-L/14 "
                                     "at 224 px")]),
    "a text encoder of another width": ({"text_encoder.final_layer_norm.weight": (512,)},
                                        "text widths disagree with the UNet's 768-d text context",
                                        [("text_encoder.final_layer_norm.weight", (512,), (768,))]),
    "a projection the postfuse module cannot read": (
        {"image_encoder.visual_projection.weight": (512, 128)},
        "the postfuse module reads 768-d image embeddings (postfuse_module.mlp1.layernorm.weight (1536,) = 768 text "
        "+ 768 image) but the image encoder projects to 512",
        [("image_encoder.visual_projection.weight", (512, 128), (768, 128))]),
}


@pytest.mark.parametrize("case", list(WRONG_SHAPES))
def test_wrong_shapes_name_the_file_each_tensor_found_and_expected_and_the_fix(case, release, tmp_path):
    changes, what, tensors = WRONG_SHAPES[case]
    sd = dict(release["sd"])
    if changes == "sd2":
        sd = {k: v for k, v in sd.items() if not k.startswith("unet.")} | _sd2_like_unet()
    else:
        sd.update({k: torch.zeros(shape) for k, shape in changes.items()})
    path = _save(tmp_path, sd)
    with pytest.raises(fc.WrongShapeError) as refused:
        _import(path, tmp_path)
    shown = "; ".join(f"{key} has shape {found}, expected {expected}" for key, found, expected in tensors)
    assert str(refused.value) == (f"{path}: {what}: {shown}. The file is not FastComposer's released SD1.5 model, "
                                  f"or it was changed; download pytorch_model.bin again from "
                                  f"https://huggingface.co/mit-han-lab/fastcomposer (pytorch_model.bin) and import "
                                  f"that.")
    assert not (tmp_path / "models").exists()  # nothing written for a refused file


def test_the_truncated_file_hint_states_the_release_size():
    """The size a truncated file is compared with is the released model's: SD1.5's UNet,
    CLIP-L text and ViT-L/14 image encoders, SD1.5's VAE and the postfuse MLP, counted here
    from their full-size layouts (meta device)."""
    from diffusers import AutoencoderKL

    sd = _meta_release()
    with torch.device("meta"):  # SD1.5's VAE (the one _meta_release uses is diffusers' one-level default)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    sd = {k: v for k, v in sd.items() if not k.startswith("vae.")} | {f"vae.{k}": v for k, v in vae.state_dict().items()}
    params = sum(v.numel() for k, v in sd.items() if not k.endswith("position_ids"))  # buffers, not weights
    assert 1.37e9 < params < 1.375e9, params
    note = fc.RELEASE_WORDS.size_note
    assert f"about {params / 1e9:.2f} billion parameters, {2 * params / 1e9:.2f} GB in fp16, twice that in fp32" \
        in note, (params, note)


def test_truncated_file_says_download_again(release, tmp_path):
    data = release["path"].read_bytes()
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(fc.TruncatedFileError, match=rf"{re.escape(str(path))}.*truncated or corrupt \(torch: .*download it again"):
        _import(path, tmp_path)
    path.write_bytes(b"")
    with pytest.raises(fc.TruncatedFileError, match="is empty"):
        _import(path, tmp_path)


class _Payload:
    """Unpickling this calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload is real: plain unpickling runs it
    assert control.exists()
    for name, save in (("zip.bin", lambda obj, p: torch.save(obj, p)),
                       ("raw.bin", lambda obj, p: p.write_bytes(pickle.dumps(obj)))):
        marker = tmp_path / f"pwned-{name}"
        path = tmp_path / name
        save({"unet.conv_in.weight": torch.zeros(1), "evil": _Payload(marker)}, path)
        with pytest.raises(fc.UnsafeFileError, match=r"Refused .*would run code when loaded.*weights_only=False"):
            _import(path, tmp_path)
        assert not marker.exists(), f"{name}: loading ran the pickled code"


def test_safetensors_input_and_dtype_option(release, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "fastcomposer.safetensors"
    save_file({k: v.contiguous() for k, v in release["sd"].items()}, str(path))
    report = fc.import_fastcomposer(path, tmp_path / "models", dtype="bf16", progress=False)
    assert {v.dtype for v in _read(report.unet)[0].values()} == {torch.bfloat16}
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(fc.TruncatedFileError, match=r"cut\.safetensors is truncated: .* Download it again"):
        fc.load_release(tmp_path / "cut.safetensors")


@pytest.mark.slow  # full-size ViT-L/14: ~15 s
def test_full_size_clip_vision_through_comfyui_loader(tmp_path):
    """At ViT-L/14 size the written file goes through ComfyUI's own Load CLIP Vision path
    (comfy.clip_vision.load: layout detection picks its ViT-L/14 config) and gives
    transformers' image_embeds. Tolerance 1e-3 abs/rel: fp32 maths on the same fp16 weights,
    24 layers of summation-order differences."""
    import comfy.clip_vision
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L14))
    vision = vision.to_empty(device="cpu")
    emb = vision.vision_model.embeddings
    emb.position_ids.copy_(torch.arange(emb.position_ids.shape[-1])[None])  # a buffer: to_empty left it unset
    _randomize(vision, 11)
    vision.eval()
    release = {f"image_encoder.{k}": v for k, v in vision.state_dict().items()}
    config, keys = fc.clip_vision_key_check({k[len("image_encoder."):]: tuple(v.shape) for k, v in release.items()})
    assert fc.is_vit_l14(config)
    path = tmp_path / "clip_vision.safetensors"
    save_file(fc.convert_clip_vision(release, keys, torch.float16), str(path))
    del release
    model = comfy.clip_vision.load(str(path))
    assert model is not None and model.image_size == 224
    model.model.float()
    photo = torch.rand(1, 256, 180, 3, generator=torch.Generator().manual_seed(2))
    got = clip_image_identity(model, photo)
    with torch.no_grad():
        want = _rounded(vision)(pixel_values=normalize_pixels(fastcomposer_pixels(photo))).image_embeds
    assert got.kind == CLIP_VISION_KIND
    torch.testing.assert_close(got.vector[None], want, atol=1e-3, rtol=1e-3)
