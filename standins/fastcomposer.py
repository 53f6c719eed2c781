"""A random-weight FastComposer release (`pytorch_model.bin` layout) for tests and smoke runs.

Same keys as mit-han-lab/fastcomposer's file: unet.* (diffusers layout), text_encoder.*,
image_encoder.vision_model.* + visual_projection.weight, vae.*, postfuse_module.*. The UNet,
text encoder and VAE are small (the pack takes text encoder and VAE from an SD1.5
checkpoint anyway). The image encoder is either small (`vision="tiny"`, fast; only our own
tests can load it, from the config the import stores) or a full ViT-L/14 (`vision="vit-l"`,
~0.6 GB in fp16), the only size ComfyUI's Load CLIP Vision recognizes.

Tensors are filled from their shapes (built on the meta device), not by the libraries'
initializers: a full ViT-L initialized by transformers takes tens of seconds on a CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

# Two UNet levels, 320 channels, 768-wide context: what ComfyUI detects as SD1.5.
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(320, 640), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32)
# The UNet of standins.sd15's test checkpoint (SD15_TINY_UNET: one level) in diffusers form:
# its import fits that checkpoint's UNet exactly, so it can warm-start training (init_unet).
ONE_LEVEL_UNET = dict(TINY_UNET, block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",),
                      up_block_types=("CrossAttnUpBlock2D",))
VISION = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 image_size=224, patch_size=32, projection_dim=768, hidden_act="quick_gelu"),
    "vit-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
}
TINY_TEXT = dict(hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=12,
                 vocab_size=1000, max_position_embeddings=77, bos_token_id=998, eos_token_id=999)
TINY_VAE = dict(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=4, norm_num_groups=32)
POSTFUSE_SHAPES = {"mlp1.layernorm.weight": (1536,), "mlp1.layernorm.bias": (1536,), "mlp1.fc1.weight": (768, 1536),
                   "mlp1.fc1.bias": (768,), "mlp1.fc2.weight": (768, 768), "mlp1.fc2.bias": (768,),
                   "mlp2.layernorm.weight": (768,), "mlp2.layernorm.bias": (768,), "mlp2.fc1.weight": (768, 768),
                   "mlp2.fc1.bias": (768,), "mlp2.fc2.weight": (768, 768), "mlp2.fc2.bias": (768,),
                   "layer_norm.weight": (768,), "layer_norm.bias": (768,)}


def _fill(shapes: dict[str, tuple[int, ...]], gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Norm gains near 1, small biases, matrices scaled by fan-in: activations stay O(1)
    # through 24 layers, and no key hides behind an all-zero or all-one value.
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            t = base + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = max(int(torch.Size(shape[1:]).numel()), 1)
            t = torch.randn(shape, generator=gen) / fan_in ** 0.5
        out[name] = t.to(dtype)
    return out


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for `shapes`, filled as the release's (the evidence run's CLIP vision)."""
    return _fill(shapes, torch.Generator().manual_seed(seed), dtype)


def release_state_dict(vision: str = "tiny", seed: int = 0, vision_dtype: torch.dtype = torch.float32,
                       unet: dict | None = None) -> dict[str, torch.Tensor]:
    """The released layout with random weights (diffusers and transformers give the keys).
    unet: the diffusers UNet config (default TINY_UNET)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = VISION[vision]
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**(unet or TINY_UNET)),
                 "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**config)),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
                 "vae": AutoencoderKL(**TINY_VAE)}
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for prefix, module in parts.items():
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        if prefix == "text_encoder":  # the release has no text_model. level (transformers 4 adds one)
            shapes = {k.removeprefix("text_model."): s for k, s in shapes.items()}
        dtype = vision_dtype if prefix == "image_encoder" else torch.float32
        sd.update({f"{prefix}.{k}": v for k, v in _fill(shapes, gen, dtype).items()})
    sd.update({f"postfuse_module.{k}": v for k, v in _fill(POSTFUSE_SHAPES, gen, torch.float32).items()})
    # the position_ids buffers older transformers saved (the importer drops them)
    sd["image_encoder.vision_model.embeddings.position_ids"] = \
        torch.arange((config["image_size"] // config["patch_size"]) ** 2 + 1)[None]
    sd["text_encoder.embeddings.position_ids"] = torch.arange(77)[None]
    return sd


def build_fastcomposer_release(path: str | os.PathLike, vision: str = "tiny", seed: int = 0,
                               unet: dict | None = None) -> Path:
    """Write a stand-in pytorch_model.bin (torch.save, as the release) once; reused if present."""
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # A full ViT-L in fp16 halves the file and the memory; the importer writes fp16 anyway.
    sd = release_state_dict(vision, seed, torch.float16 if vision == "vit-l" else torch.float32, unet)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return path
