"""A random-weight SDXL-family checkpoint, and PhotoMaker stand-ins that fit it, for tests.

ComfyUI detects a checkpoint's family from its UNet: the smallest UNet it calls SDXL-family
is KOALA-700M's layout (model_channels 320, transformer depths [0, 2, 5] over three levels
of one res block, 2048-wide context, linear proj_in, 2816-wide ADM input). The stand-in
keeps exactly what detection reads and makes the rest small: every level 320 channels
(channel_mult [1, 1, 1]), one transformer per upsampling res block, and a middle block
(SDXL has one, and code that walks the UNet may expect it) of 5 transformers, the depth
diffusers' layout of the same UNet gives it. 94.6M UNet parameters against SDXL's 2.6B.
ComfyUI builds SDXL's two text encoders (CLIP-L and OpenCLIP bigG) from fixed configs, so
those are full size (818M parameters): almost all of the 1.8 GB file. The VAE is a TAESD.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .sd15 import is_current, randomize, save_standin, taesd_state_dict

# ComfyUI's config of the stand-in's UNet, as load_checkpoint_guess_config ends up with it
# (detect_unet_config + KOALA_700M's unet_extra_config): what import_photomaker's
# unet_config needs, and what UNetModel(**config) builds.
SDXL_STANDIN_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 5], transformer_depth_output=[0, 0, 1, 1, 1, 1],
    channel_mult=[1, 1, 1], transformer_depth_middle=5, use_linear_in_transformer=True, context_dim=2048,
    use_temporal_resblock=False, use_temporal_attention=False, num_heads=-1, num_head_channels=64,
)
# The same UNet in diffusers' terms (for standins.photomaker's LoRA listing). diffusers gives
# the middle block the last level's depth, so the stand-in's middle has 5 transformers too;
# the two cross-attention up blocks have one per res block (up block 2 has no attention).
SDXL_STANDIN_DIFFUSERS_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=2048, block_out_channels=(320, 320, 320),
    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 5), reverse_transformer_layers_per_block=(1, 1, 0),
    attention_head_dim=5, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# Bump when the recipe changes: cached files of an older recipe are rebuilt. The "sdxl-"
# prefix keeps an SD1.5 stand-in of the same seed from passing for this one.
STANDIN_VERSION = "sdxl-1"
CHECKPOINT_NAME = "portraitbooth_test_sdxl.safetensors"
PHOTOMAKER_RANK = 4
PHOTOMAKER_NAMES = {"v1": "photomaker-v1-standin", "v2": "photomaker-v2-standin"}
# Versioned like standins.templates' FastComposer release: a new layout gets a new file.
PHOTOMAKER_RELEASES = {"v1": "photomaker_v1_sdxl_standin_1.bin", "v2": "photomaker_v2_sdxl_standin_1.bin"}
PHOTOMAKER_MODEL_KINDS = ("portraitbooth", "clip_vision")
PHOTOMAKER_ID_GAIN = 4.0  # see with_identity_gain


def sdxl_unet_config() -> dict:
    """A fresh copy of SDXL_STANDIN_UNET (callers may change theirs)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in SDXL_STANDIN_UNET.items()}


def sdxl_diffusers_unet_config() -> dict:
    """A fresh copy of SDXL_STANDIN_DIFFUSERS_UNET, for standins.photomaker's `unet=`."""
    return dict(SDXL_STANDIN_DIFFUSERS_UNET)


def standin_unet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict (no prefix) of the stand-in UNet, random weights."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**sdxl_unet_config(), dtype=torch.float32, device="cpu",
                     operations=comfy.ops.disable_weight_init)
    randomize(unet, seed)
    return {k: v.contiguous() for k, v in unet.state_dict().items()}


def _random_from_shapes(shapes: dict[str, torch.Size], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # sd15.randomize's rules, one tensor at a time: an fp32 module of both text encoders
    # (818M parameters) would hold 3.3 GB at once.
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) <= 1:
            value = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            if name.endswith("logit_scale"):
                value = math.log(100.0)  # CLIP's trained value; ComfyUI never reads it
            out[name] = torch.full(shape, value, dtype=dtype)
        else:
            fan_in = max(int(torch.Size(shape[1:]).numel()), 1)
            out[name] = (torch.randn(shape, generator=gen) / fan_in ** 0.5).to(dtype)
    return out


def sdxl_clip_state_dict(seed: int = 1, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """CLIP-L and OpenCLIP bigG, random weights, in an SDXL checkpoint's keys
    (`conditioner.embedders.0.transformer.text_model.*`, `conditioner.embedders.1.model.*`).

    The keys come from ComfyUI's own model (built on the meta device) and its own conversion
    for saving, so they are the layout ComfyUI writes and reads for SDXL."""
    import comfy.model_detection
    import comfy.sdxl_clip

    with torch.device("meta"):
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float32)
    shapes = {k: v.shape for k, v in clip.state_dict().items()}
    del clip
    sd = _random_from_shapes(shapes, seed, dtype)
    model_config = comfy.model_detection.model_config_from_unet_config(sdxl_unet_config())
    return {k: v.contiguous() for k, v in model_config.process_clip_state_dict_for_saving(sd).items()}


def build_sdxl_checkpoint(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a random SDXL-family checkpoint (KOALA-like UNet + full CLIP-L and bigG + TAESD)
    atomically; ComfyUI's CheckpointLoaderSimple loads it as an SDXL model.

    Reused when a file of the same recipe and seed exists: it is 1.8 GB, and every test
    run should not write that again.
    """
    path = Path(path)
    stamp = f"{STANDIN_VERSION}:{seed}"
    if is_current(path, stamp):
        return path
    sd: dict[str, torch.Tensor] = {}
    for prefix, part in (("model.diffusion_model.", standin_unet_state_dict(seed)),
                         ("first_stage_model.", taesd_state_dict(seed + 2))):
        for k, v in part.items():
            sd[prefix + k] = v.to(dtype) if v.is_floating_point() else v
    sd.update(sdxl_clip_state_dict(seed + 1, dtype))  # already prefixed
    return save_standin(path, sd, "random-weight SDXL-family (KOALA-like UNet) for tests", stamp)


def with_identity_gain(release: dict[str, dict[str, torch.Tensor]],
                       gain: float = PHOTOMAKER_ID_GAIN) -> dict[str, dict[str, torch.Tensor]]:
    """The release with its fuse module's first MLP made to listen to the identity (in place).

    With plain fan-in-scaled weights the fused token is mostly the class token: mlp1's
    LayerNorm sees [class || id] with the stand-in text ~5x larger than the id token, and
    mlp1's output is added to that class token. Two people's photos then changed the fused
    token by about 1% (v1) / 4% (v2). A gain of 4 on the id half of that LayerNorm and on
    mlp1's last layer gives 8% (v1, two people; 24% a face vs a non-face photo) and 40% (v2),
    while the class token still counts, as in a trained head."""
    fuse = release["id_encoder"]
    norm = fuse["fuse_module.mlp1.layernorm.weight"]
    norm[norm.shape[0] // 2:] *= gain  # the input is [class token || id token]
    fuse["fuse_module.mlp1.fc2.weight"] *= gain
    return release


def build_sdxl_photomaker_models(folder: str | os.PathLike, release_cache: str | os.PathLike) -> dict[str, str]:
    """PhotoMaker v1 and v2 stand-ins for the stand-in SDXL, imported with the pack's importer
    into `folder/<kind>/`; returns {kind: folder} for ComfyServer's extra_model_paths.

    The releases (cached in `release_cache`, built once) have a full-size ViT-L/14 tower (the
    only CLIP vision size Load CLIP Vision detects), the full 2048-wide head (see
    with_identity_gain) and a rank-4 LoRA on every attention projection of SDXL_STANDIN_UNET.
    Each has its own random tower: sharing one would save ~3 s of a ~25 s first build, and
    the imported clip_vision files would still be two (their metadata differ). Imported as
    photomaker-v1-standin / photomaker-v2-standin (portraitbooth/<name>.safetensors,
    clip_vision/<name>_clip_vit_l14.safetensors).
    """
    from portraitbooth_core.weights.formats.photomaker import import_photomaker, output_paths

    from .photomaker import release_state_dict, save_release

    folder, release_cache = Path(folder), Path(release_cache)
    releases = {v: release_cache / name for v, name in PHOTOMAKER_RELEASES.items()}
    for version, path in releases.items():
        if not path.is_file():
            sd = release_state_dict(version, vision="vit-l", head="full", unet=sdxl_diffusers_unet_config(),
                                    rank=PHOTOMAKER_RANK, seed=11 if version == "v1" else 13, dtype=torch.float16)
            save_release(with_identity_gain(sd), path)
            del sd
    for version, path in releases.items():
        name = PHOTOMAKER_NAMES[version]
        if all(p.is_file() for p in output_paths(folder, name).values()):
            continue
        import_photomaker(path, folder, name=name, version=version, dtype="fp16", progress=False,
                          unet_config=sdxl_unet_config())
    return {kind: str(folder / kind) for kind in PHOTOMAKER_MODEL_KINDS if (folder / kind).is_dir()}


__all__ = ["CHECKPOINT_NAME", "PHOTOMAKER_ID_GAIN", "PHOTOMAKER_NAMES", "PHOTOMAKER_RANK",
           "SDXL_STANDIN_DIFFUSERS_UNET", "SDXL_STANDIN_UNET", "STANDIN_VERSION", "build_sdxl_checkpoint",
           "build_sdxl_photomaker_models", "sdxl_clip_state_dict", "sdxl_diffusers_unet_config", "sdxl_unet_config",
           "standin_unet_state_dict", "with_identity_gain"]
