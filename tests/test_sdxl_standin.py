"""The SDXL-family stand-in (standins/sdxl.py): ComfyUI's own loaders take it for SDXL, it
samples and decodes, its text encoders hold exactly the written weights, and the PhotoMaker
stand-ins imported for it fit its UNet and tell faces apart.

The checkpoint is 1.8 GB (SDXL's two text encoders are full size); it is built once into the
host's cache and loaded once per session (the sdxl_parts fixture).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import MODELS_DIR
from standins.sdxl import (CHECKPOINT_NAME, PHOTOMAKER_NAMES, PHOTOMAKER_RANK, SDXL_STANDIN_DIFFUSERS_UNET,
                           SDXL_STANDIN_UNET, STANDIN_VERSION, build_sdxl_checkpoint, sdxl_unet_config)

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# transformer blocks: down 2 + 5, middle 5, up 4 x 1 (two cross-attention levels of two
# res blocks); two attentions each, four projections each
ATTENTION_LAYERS = (7 + 5 + 4) * 2 * 4


def _is_attention(name: str) -> bool:
    return any(name.endswith(f".attn{a}.{p}") for a in (1, 2) for p in ATTENTION_PROJECTIONS)


def _attention_weights(diffusion_model: torch.nn.Module) -> set[str]:
    """ComfyUI keys ("diffusion_model.<module>.weight") of every attention projection."""
    return {f"diffusion_model.{name}.weight" for name, module in diffusion_model.named_modules()
            if isinstance(module, torch.nn.Linear) and _is_attention(name)}


def _photos(photos_dir: Path, names: tuple[str, ...]) -> torch.Tensor:
    """A ComfyUI IMAGE batch ([N, H, W, 3], 0..1) of the named test photos, 256 px square."""
    import numpy as np
    from PIL import Image

    return torch.stack([torch.from_numpy(np.asarray(Image.open(photos_dir / n).convert("RGB").resize((256, 256)),
                                                    dtype=np.float32) / 255.0) for n in names])


# ---------------------------------------------------------------- no checkpoint needed


def test_standin_unet_config_is_detected_as_koala_700m_an_sdxl_subclass():
    import comfy.model_detection
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = comfy.model_detection.model_config_from_unet_config(sdxl_unet_config())
    assert isinstance(config, comfy.supported_models.SDXL)
    assert type(config).__name__ == "KOALA_700M"  # the smallest SDXL-family layout ComfyUI knows
    # what detection reads back from the UNet's keys is the config (detection adds the head settings)
    with torch.device("meta"):
        unet = UNetModel(**sdxl_unet_config(), dtype=torch.float32, device="meta",
                         operations=comfy.ops.disable_weight_init)
    shapes = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    detected = comfy.model_detection.detect_unet_config(shapes, "model.diffusion_model.")
    assert {**detected, "num_heads": -1, "num_head_channels": 64} == SDXL_STANDIN_UNET
    assert 90e6 < sum(p.numel() for p in unet.parameters()) < 100e6


def test_diffusers_layout_names_the_same_attention_layers_as_the_comfyui_config():
    """standins.photomaker lists the LoRA from SDXL_STANDIN_DIFFUSERS_UNET; the importer maps
    diffusers names with comfy.utils.unet_to_diffusers(SDXL_STANDIN_UNET): both must name
    every attention projection of the stand-in UNet, with the same shapes."""
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        diffusers_unet = UNet2DConditionModel(**SDXL_STANDIN_DIFFUSERS_UNET)
        comfy_unet = UNetModel(**sdxl_unet_config(), dtype=torch.float32, device="meta",
                               operations=comfy.ops.disable_weight_init)
    diffusers_layers = {f"{name}.weight": tuple(m.weight.shape) for name, m in diffusers_unet.named_modules()
                        if isinstance(m, torch.nn.Linear) and _is_attention(name)}
    comfy_shapes = {k: tuple(v.shape) for k, v in comfy_unet.state_dict().items()}
    comfy_layers = {k for k in comfy_shapes if _is_attention(k.removesuffix(".weight"))}
    to_comfy = comfy.utils.unet_to_diffusers(sdxl_unet_config())
    assert len(diffusers_layers) == len(comfy_layers) == ATTENTION_LAYERS
    assert {to_comfy[k] for k in diffusers_layers} == comfy_layers
    assert all(comfy_shapes[to_comfy[k]] == shape for k, shape in diffusers_layers.items())


def test_cache_stamp_names_recipe_and_seed(tmp_path):
    from safetensors.torch import save_file

    from standins.sd15 import is_current

    path = tmp_path / "stamped.safetensors"
    for stamp, current in ((f"{STANDIN_VERSION}:0", True), (f"{STANDIN_VERSION}:1", False), ("2:0", False)):
        save_file({"x": torch.zeros(1)}, str(path), metadata={"portraitbooth_standin_version": stamp})
        assert is_current(path, f"{STANDIN_VERSION}:0") is current, stamp
    path.write_bytes(b"not a safetensors file")
    assert not is_current(path, f"{STANDIN_VERSION}:0")


# ---------------------------------------------------------------- the checkpoint in ComfyUI


def test_cached_checkpoint_is_reused_not_rewritten(sdxl_checkpoint):
    from headless import comfyui as host
    from portraitbooth_core.weights.family import read_safetensors_header

    session = MODELS_DIR / "checkpoints" / sdxl_checkpoint
    cached = host.host_dir() / "cache" / "standins" / CHECKPOINT_NAME
    before = cached.stat().st_mtime_ns
    assert build_sdxl_checkpoint(cached) == cached and cached.stat().st_mtime_ns == before
    assert session.stat().st_size == cached.stat().st_size
    _, meta = read_safetensors_header(cached)
    assert meta["portraitbooth_standin_version"] == f"{STANDIN_VERSION}:0"
    assert "SDXL" in meta["portraitbooth_standin"]
    assert not list(cached.parent.glob(f"{CHECKPOINT_NAME}.*.part")), "temp file left behind"


def test_comfyui_loads_the_standin_as_sdxl_family(sdxl_parts):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models
    import comfy.taesd.taesd

    model, clip, vae = sdxl_parts
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert isinstance(model.model.model_config, comfy.supported_models.SDXL)
    assert isinstance(model.model.latent_format, comfy.latent_formats.SDXL)
    loaded = {k: v for k, v in model.model.model_config.unet_config.items() if k != "dtype"}
    assert loaded == SDXL_STANDIN_UNET
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)

    tokens = clip.tokenize("a man")
    assert set(tokens) == {"g", "l"}
    (cond, extra), = clip.encode_from_tokens_scheduled(tokens)
    assert cond.shape == (1, 77, 2048) and extra["pooled_output"].shape == (1, 1280)
    assert torch.isfinite(cond).all() and cond.std() > 0.1  # random weights, not zeros
    other, = clip.encode_from_tokens_scheduled(clip.tokenize("a red car"))
    assert not torch.equal(other[0], cond)


def test_text_encoders_hold_exactly_the_written_weights(sdxl_parts, sdxl_checkpoint):
    """Every CLIP-L and bigG weight ComfyUI uses comes from the file (none left at its
    uninitialised value): the file's SDXL keys, converted by ComfyUI's own SDXL reader, equal
    the loaded text encoders' weights."""
    from safetensors import safe_open

    model, clip, _ = sdxl_parts
    path = MODELS_DIR / "checkpoints" / sdxl_checkpoint
    with safe_open(str(path), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys() if k.startswith("conditioner.")}
    written = model.model.model_config.process_clip_state_dict(written)
    loaded = clip.cond_stage_model.state_dict()
    # the only weights an SDXL checkpoint does not store: CLIP-L's projection and logit scales,
    # which SDXL never reads (ComfyUI's loader leaves them out of its "clip missing" warning too)
    unused = {"clip_l.transformer.text_projection.weight", "clip_l.logit_scale", "clip_g.logit_scale"}
    assert set(loaded) - set(written) <= unused
    # and the one an SDXL checkpoint stores that ComfyUI's CLIP has no buffer for
    assert set(written) - set(loaded) == {"clip_l.transformer.text_model.embeddings.position_ids"}
    del written["clip_l.transformer.text_model.embeddings.position_ids"]
    for key, value in written.items():
        assert torch.equal(loaded[key].to(value.dtype), value), key
    assert sum(v.numel() for k, v in loaded.items() if k not in unused) > 815e6  # full-size encoders


def test_txt2img_with_comfyui_nodes_gives_a_finite_image(sdxl_parts):
    """CLIPTextEncode, EmptyLatentImage, KSampler (euler, 2 steps) and VAEDecode from ComfyUI's
    nodes.py, in-process, 64 x 64."""
    import nodes

    model, clip, vae = sdxl_parts
    positive = nodes.CLIPTextEncode().encode(clip, "a photo of a man")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    samples = nodes.KSampler().sample(model, 0, 2, 5.0, "euler", "normal", positive, negative, latent)[0]
    assert samples["samples"].shape == (1, 4, 8, 8) and torch.isfinite(samples["samples"]).all()
    image = nodes.VAEDecode().decode(vae, samples)[0]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    assert image.std() > 0  # the random UNet and VAE do not collapse to a constant


# ---------------------------------------------------------------- PhotoMaker stand-ins for it


@pytest.mark.slow  # with the PhotoMaker fixture's import: ~8 s, ~25 s before its releases are cached
def test_photomaker_standins_import_for_the_standin_unet(sdxl_photomaker_models):
    from safetensors import safe_open

    from portraitbooth_core.weights.file import load_portraitbooth

    assert set(sdxl_photomaker_models) == {"portraitbooth", "clip_vision"}
    for version, name in PHOTOMAKER_NAMES.items():
        pb = load_portraitbooth(Path(sdxl_photomaker_models["portraitbooth"]) / f"{name}.safetensors")
        assert (pb.info.base, pb.info.projector.kind) == ("sdxl", f"photomaker_{version}")
        assert pb.projector.config.text_dim == 2048
        assert pb.info.face_encoder.kind.startswith("clip_vision") and "vit-l-14" in pb.info.face_encoder.kind
        ranks = {int(v) for k, v in pb.unet_patch.items() if k.endswith(".alpha")}
        assert ranks == {PHOTOMAKER_RANK} and len(pb.unet_patch) == 3 * ATTENTION_LAYERS
        tower = Path(sdxl_photomaker_models["clip_vision"]) / pb.info.defaults["clip_vision"]
        with safe_open(str(tower), "pt") as f:
            assert json.loads(f.metadata()["portraitbooth_import"])["config"]["num_hidden_layers"] == 24


@pytest.mark.slow  # with the PhotoMaker fixture's import: ~8 s, ~25 s before its releases are cached
def test_photomaker_lora_covers_every_attention_layer_of_the_standin(sdxl_parts, sdxl_photomaker_models):
    """The imported LoRA through ComfyUI's own machinery (model_lora_keys_unet, load_lora,
    add_patches: what LoraLoaderModelOnly runs): every key matched, every attention
    projection of the loaded stand-in patched, nothing else."""
    import comfy.lora
    import comfy.lora_convert

    from portraitbooth_core.weights.file import load_portraitbooth

    model, _, _ = sdxl_parts
    attention = _attention_weights(model.model.diffusion_model)
    assert len(attention) == ATTENTION_LAYERS
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    for name in PHOTOMAKER_NAMES.values():
        patch = load_portraitbooth(Path(sdxl_photomaker_models["portraitbooth"]) / f"{name}.safetensors").unet_patch
        lora = comfy.lora_convert.convert_lora(dict(patch))
        loaded = comfy.lora.load_lora(lora, key_map, log_missing=False)
        modules = {k.rsplit(".", 2)[0] for k in lora}
        assert len(loaded) == len(modules) == ATTENTION_LAYERS  # no LoRA module left unmatched
        assert set(loaded) == attention
        assert set(model.clone().add_patches(loaded, 1.0)) == attention


@pytest.mark.slow  # a full ViT-L/14 on three photos, on the CPU
def test_photomaker_standin_heads_give_different_faces_different_tokens(sdxl_parts, sdxl_photomaker_models,
                                                                        photos_dir):
    """Through ComfyUI's Load CLIP Vision of the imported tower and the stand-in's own text
    encoding, two people (and a non-face photo) give clearly different fused class tokens."""
    import comfy.clip_vision

    from portraitbooth_core.stea.photomaker import fuse_class_tokens
    from portraitbooth_core.weights.file import load_portraitbooth

    _, clip, _ = sdxl_parts
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a man"))[0][0]
    man = cond[0, 5]  # "<start> a photo of a man": the class word's token
    images = _photos(photos_dir, ("obama.jpg", "biden.jpg", "astronaut.png"))
    faces = 20 * torch.nn.functional.normalize(torch.randn(3, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    root = Path(sdxl_photomaker_models["portraitbooth"])
    hidden = None
    for version, name in PHOTOMAKER_NAMES.items():
        pb = load_portraitbooth(root / f"{name}.safetensors")
        if hidden is None:  # the v1 and v2 towers differ; one is enough to show the heads listen
            tower = comfy.clip_vision.load(str(Path(sdxl_photomaker_models["clip_vision"]) /
                                              pb.info.defaults["clip_vision"]))
            with torch.no_grad():
                hidden = tower.encode_image(images, crop=True)["last_hidden_state"].float()
            assert hidden.shape == (3, 257, 1024)
        k = pb.projector.tokens_per_photo
        fused = []
        for i in range(3):
            extra = {"id_embeds": faces[i:i + 1]} if version == "v2" else {}
            with torch.no_grad():
                fused.append(fuse_class_tokens(pb.projector, man.expand(k, -1), last_hidden_state=hidden[i:i + 1],
                                               **extra))
        assert all(torch.isfinite(f).all() for f in fused)
        change = [float((fused[0] - other).norm() / fused[0].norm()) for other in fused[1:]]
        assert min(change) > 0.05, (version, change)
