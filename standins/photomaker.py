"""Random-weight PhotoMaker releases (`photomaker-v1.bin` / `-v2.bin` layouts) for tests.

Same layout as TencentARC/PhotoMaker's files: a torch.save dict {"id_encoder": {...},
"lora_weights": {...}}, or the safetensors variant with flat `id_encoder.` /
`lora_weights.` prefixes. The id_encoder is a CLIP vision tower (transformers'
CLIPVisionModelWithProjection keys) plus PhotoMaker's head, whose keys are listed here from
the upstream architecture (photomaker/model.py, model_v2.py, resampler.py), not from this
pack's modules, so the import's coverage test compares two independent listings. The LoRA
sits on every attention projection (attn1/attn2 to_q, to_k, to_v, to_out.0) of a diffusers
UNet: SDXL's (full layout, small rank) or a small SDXL-like one, in diffusers' attention-
processor form (`unet.<block>.attn1.processor.to_q_lora.down.weight`) or the PEFT form.

`release_shapes(...)` gives the full-size key/shape listing without allocating (meta device).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

from .fastcomposer import random_tensors

VISION = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 image_size=224, patch_size=32, projection_dim=96, hidden_act="quick_gelu"),
    "vit-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
}
# Head sizes: upstream's (SDXL: 768 + 1280 = 2048; resampler 4 x 16 heads x 128) and a small one
# (text width 256 = 96 + 160; resampler 2 layers x 2 heads x 128, PhotoMaker's head width).
HEAD = {
    "full": dict(text_dim=2048, id_dim=512, depth=4, inner=2048, ff_mult=4, token_ratio=4, num_tokens=2),
    "tiny": dict(text_dim=256, id_dim=512, depth=2, inner=256, ff_mult=4, token_ratio=4, num_tokens=2),
}
# diffusers' SDXL UNet (stabilityai/stable-diffusion-xl-base-1.0's config).
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# A small SDXL-like UNet: 2048-wide context, linear proj_in, two levels, one block each.
TINY_XL_UNET = dict(sample_size=8, cross_attention_dim=2048, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=1,
                    attention_head_dim=4, use_linear_projection=True, norm_num_groups=8)
ATTENTION = re.compile(r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")


def head_shapes(version: str, clip_dim: int, projection_dim: int, text_dim: int, id_dim: int, depth: int,
                inner: int, ff_mult: int, token_ratio: int, num_tokens: int) -> dict[str, tuple[int, ...]]:
    """PhotoMaker's head keys (after `id_encoder.`) beside the CLIP tower's, from upstream's modules."""
    d, h = text_dim, text_dim  # FuseModule(embed_dim): both MLPs' hidden width is embed_dim
    shapes = {"visual_projection_2.weight": (text_dim - projection_dim, clip_dim)}
    for mlp, width in (("mlp1", 2 * d), ("mlp2", d)):
        shapes.update({f"fuse_module.{mlp}.layernorm.weight": (width,), f"fuse_module.{mlp}.layernorm.bias": (width,),
                       f"fuse_module.{mlp}.fc1.weight": (h, width), f"fuse_module.{mlp}.fc1.bias": (h,),
                       f"fuse_module.{mlp}.fc2.weight": (d, h), f"fuse_module.{mlp}.fc2.bias": (d,)})
    shapes.update({"fuse_module.layer_norm.weight": (d,), "fuse_module.layer_norm.bias": (d,)})
    if version == "v1":
        return shapes
    q, r = "qformer_perceiver.", "qformer_perceiver.perceiver_resampler."
    wide = id_dim * token_ratio
    shapes.update({q + "token_proj.0.weight": (wide, id_dim), q + "token_proj.0.bias": (wide,),
                   q + "token_proj.2.weight": (d * num_tokens, wide), q + "token_proj.2.bias": (d * num_tokens,),
                   q + "token_norm.weight": (d,), q + "token_norm.bias": (d,),
                   r + "proj_in.weight": (d, clip_dim), r + "proj_in.bias": (d,),
                   r + "proj_out.weight": (d, d), r + "proj_out.bias": (d,),
                   r + "norm_out.weight": (d,), r + "norm_out.bias": (d,)})
    for i in range(depth):
        a, f = f"{r}layers.{i}.0.", f"{r}layers.{i}.1."
        shapes.update({a + "norm1.weight": (d,), a + "norm1.bias": (d,), a + "norm2.weight": (d,),
                       a + "norm2.bias": (d,), a + "to_q.weight": (inner, d), a + "to_kv.weight": (2 * inner, d),
                       a + "to_out.weight": (d, inner), f + "0.weight": (d,), f + "0.bias": (d,),
                       f + "1.weight": (d * ff_mult, d), f + "3.weight": (d, d * ff_mult)})
    return shapes


def tower_shapes(vision: str = "vit-l", position_ids: bool = True) -> dict[str, tuple[int, ...]]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = VISION[vision]
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if position_ids:  # the buffer older transformers saved; the release may hold it
        shapes["vision_model.embeddings.position_ids"] = (1, (config["image_size"] // config["patch_size"]) ** 2 + 1)
    return shapes


@functools.lru_cache(maxsize=4)
def _attention_layers(unet_items: tuple) -> dict[str, tuple[int, int]]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(unet_items))
    return {name: tuple(m.weight.shape) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and ATTENTION.fullmatch(name)}


def lora_shapes(unet: dict | None = None, rank: int = 64, form: str = "processor") -> dict[str, tuple[int, ...]]:
    """LoRA keys and shapes on every attention projection of a diffusers UNet (default SDXL)."""
    layers = _attention_layers(tuple(sorted((k, v if not isinstance(v, list) else tuple(v))
                                            for k, v in (unet or SDXL_UNET).items())))
    shapes = {}
    for name, (out_dim, in_dim) in layers.items():
        if form == "processor":
            block, proj = (name[:-len(".to_out.0")], "to_out") if name.endswith(".to_out.0") else name.rsplit(".", 1)
            stem = f"unet.{block}.processor.{proj}_lora"
            shapes[f"{stem}.down.weight"], shapes[f"{stem}.up.weight"] = (rank, in_dim), (out_dim, rank)
        elif form == "peft":
            shapes[f"unet.{name}.lora_A.weight"], shapes[f"unet.{name}.lora_B.weight"] = (rank, in_dim), (out_dim, rank)
        else:
            raise ValueError(f"form {form!r}: processor or peft")
    return shapes


def release_shapes(version: str = "v1", vision: str = "vit-l", head: str = "full", unet: dict | None = None,
                   rank: int = 64, lora_form: str = "processor") -> dict[str, dict[str, tuple[int, ...]]]:
    """{"id_encoder": shapes, "lora_weights": shapes}: the full-size listing by default."""
    tower = tower_shapes(vision)
    config = VISION[vision]
    sizes = dict(HEAD[head])
    return {"id_encoder": {**tower, **head_shapes(version, config["hidden_size"], config["projection_dim"], **sizes)},
            "lora_weights": lora_shapes(unet, rank, lora_form)}


def release_state_dict(version: str = "v1", vision: str = "tiny", head: str = "tiny", unet: dict | None = None,
                       rank: int = 2, lora_form: str = "processor", seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    shapes = release_shapes(version, vision, head, unet, rank, lora_form)
    ids = {k: s for k, s in shapes["id_encoder"].items() if not k.endswith("position_ids")}
    id_encoder = random_tensors(ids, seed, dtype)
    grid = (VISION[vision]["image_size"] // VISION[vision]["patch_size"]) ** 2 + 1
    id_encoder["vision_model.embeddings.position_ids"] = torch.arange(grid)[None]
    return {"id_encoder": id_encoder, "lora_weights": random_tensors(shapes["lora_weights"], seed + 1, dtype)}


def save_release(sd: dict[str, dict[str, torch.Tensor]], path: str | os.PathLike) -> Path:
    """torch.save of the nested dict (.bin), or flat prefixes (.safetensors), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({f"{part}.{k}": v.contiguous() for part, d in sd.items() for k, v in d.items()
                   if not k.endswith("position_ids")}, str(tmp))
    else:
        torch.save(sd, tmp)
    os.replace(tmp, path)
    return path


def build_photomaker_release(path: str | os.PathLike, version: str = "v1", seed: int = 0, **options) -> Path:
    """Write a stand-in release once (reused if present); options: release_state_dict's."""
    path = Path(path)
    if path.is_file():
        return path
    return save_release(release_state_dict(version, seed=seed, **options), path)


__all__ = ["HEAD", "SDXL_UNET", "TINY_XL_UNET", "VISION", "build_photomaker_release", "head_shapes", "lora_shapes",
           "release_shapes", "release_state_dict", "save_release", "tower_shapes"]
