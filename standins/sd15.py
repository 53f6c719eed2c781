"""Random-weight stand-ins in real file formats, for tests and smoke runs.

No Stable Diffusion weights can be downloaded here, so tests build models with the same
keys and shapes ComfyUI expects and let ComfyUI's own loaders detect them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

# One level, 320 channels: ComfyUI detects SD1.5 from model_channels=320,
# context_dim=768 and a conv proj_in, and reads the depth from the state dict.
SD15_TINY_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
    transformer_depth_output=[1, 1], transformer_depth_middle=1,
    num_heads=8, use_spatial_transformer=True, use_linear_in_transformer=False,
    context_dim=768, legacy=False,
)


def randomize(module: torch.nn.Module, seed: int) -> None:
    # ComfyUI's disable_weight_init layers leave memory uninitialised; fill it.
    gen = torch.Generator().manual_seed(seed)
    # Norm layers by type, not by name: the UNet's GroupNorms are called "out.0",
    # "in_layers.0", ...; a zero gain there made every UNet output exactly 0.
    norm_gains = {f"{n}.weight" if n else "weight" for n, m in module.named_modules()
                  if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                if name in norm_gains or ("norm" in name and name.endswith("weight")):
                    p.fill_(1.0)
                else:
                    p.zero_()
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5)


def tiny_unet_state_dict(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """State dict (no prefix) of a small UNet that ComfyUI detects as SD1.5."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**{**SD15_TINY_UNET, **overrides}, dtype=torch.float32,
                     device="cpu", operations=comfy.ops.disable_weight_init)
    randomize(unet, seed)
    return {k: v.contiguous() for k, v in unet.state_dict().items()}


def clip_l_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """CLIP-L text encoder keys as an SD1.5 checkpoint stores them (random weights)."""
    import comfy.ops
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    randomize(clip.transformer, seed)
    sd = {}
    for k, v in clip.transformer.state_dict().items():
        sd[f"transformer.{k}"] = v.contiguous()
    # The checkpoint stores positions as integers; comfy rounds them on load.
    sd["transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return sd


def taesd_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    randomize(taesd, seed)
    return {k: v.contiguous() for k, v in taesd.state_dict().items()}


# Bump when the stand-in's recipe changes: cached files of an older recipe are rebuilt.
STANDIN_VERSION = "2"


def is_current(path: Path, stamp: str) -> bool:
    """Whether `path` is a stand-in file of this recipe stamp (its safetensors metadata)."""
    from portraitbooth_core.weights.family import read_safetensors_header

    if not path.is_file():
        return False
    try:
        _, meta = read_safetensors_header(path)
    except (OSError, ValueError):
        return False
    return meta.get("portraitbooth_standin_version") == stamp


def save_standin(path: Path, sd: dict[str, torch.Tensor], description: str, stamp: str) -> Path:
    """Write a stand-in checkpoint atomically (a per-process temp name, then a rename), so
    two test runs building the same cached file never see half of one."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    save_file(sd, str(tmp), metadata={"portraitbooth_standin": description, "portraitbooth_standin_version": stamp})
    os.replace(tmp, path)
    return path


def build_sd15_checkpoint(path: str | os.PathLike, seed: int = 0,
                          dtype: torch.dtype = torch.float16) -> Path:
    """Write a random SD1.5-format checkpoint (tiny UNet + CLIP-L + TAESD) atomically.

    Reused when a file of the same recipe and seed exists: building takes seconds,
    and every test run should not pay that again.
    """
    path = Path(path)
    stamp = f"{STANDIN_VERSION}:{seed}"
    if is_current(path, stamp):
        return path
    sd: dict[str, torch.Tensor] = {}
    for prefix, part in (("model.diffusion_model.", tiny_unet_state_dict(seed)),
                         ("cond_stage_model.", clip_l_state_dict(seed + 1)),
                         ("first_stage_model.", taesd_state_dict(seed + 2))):
        for k, v in part.items():
            sd[prefix + k] = v.to(dtype) if v.is_floating_point() else v
    return save_standin(path, sd, "random-weight SD1.5 for tests", stamp)


def tiny_model_patcher(seed: int = 0):
    """An in-process SD1.5 ModelPatcher on the CPU, loaded through ComfyUI's own path."""
    import comfy.sd

    model = comfy.sd.load_diffusion_model_state_dict(tiny_unet_state_dict(seed))
    if model is None:
        raise RuntimeError("ComfyUI did not recognise the stand-in UNet as a diffusion model")
    return model


def build_portraitbooth_file(path: str | os.PathLike, face_kind: str = "dlib:resnet128",
                             face_dim: int = 128, seed: int = 0, hidden: int = 256) -> Path:
    """A PortraitBooth weight file with a random projector whose output depends on the face.

    A freshly initialised projector passes the text through unchanged (its last layer
    starts at zero), so the stand-in randomises that layer too.
    """
    from portraitbooth_core.stea.projector import ProjectorConfig, STEAProjector
    from portraitbooth_core.weights.file import save_portraitbooth
    from portraitbooth_core.weights.meta import FaceEncoderSpec

    torch.manual_seed(seed)
    projector = STEAProjector(ProjectorConfig(face_dim=face_dim, hidden_dim=hidden))
    torch.nn.init.normal_(projector.fc2.weight, std=0.05)
    return save_portraitbooth(path, projector, FaceEncoderSpec(face_kind, face_dim),
                              training={"standin": "random weights for smoke runs and tests"})
