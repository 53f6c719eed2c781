"""The frozen and trainable parts of a run, loaded with ComfyUI's own loader.

`load_checkpoint_guess_config` gives the same UNetModel/CLIP/VAE classes the nodes use;
the UNet is forced to fp32 weights (ComfyUI would pick fp16 on a GPU, which cannot
train); bf16 comes from autocast instead.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from portraitbooth_core.paths import BadInputError
from portraitbooth_core.weights.family import model_context_dim, require_sd15

from ..config import TrainConfig
from .lora import LoRASet

log = logging.getLogger("portraitbooth.training")


@dataclass
class Models:
    patcher: object            # comfy ModelPatcher (for sampling / nodes)
    base: nn.Module            # comfy BaseModel: apply_model, model_sampling, latent_format
    unet: nn.Module            # base.diffusion_model
    clip: object               # comfy CLIP (frozen)
    vae: object                # comfy VAE (frozen; decode keeps gradients for DIP)
    device: torch.device
    lora: LoRASet | None = None
    warm_start: dict | None = None   # what init_unet loaded (warm_start.load_init_unet), for the run's records
    # The checkpoint file whose VAE and text encoder these are: a dataset's precomputed
    # latents/text encodings are only valid for that file (precompute.encoder_fingerprint).
    encoders_from: str | None = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        sigmas = self.base.model_sampling.sigmas.float()
        return 1.0 / (sigmas * sigmas + 1.0)

    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] 0..1 -> model-space latents (no gradients: targets are data)."""
        vae = self.vae.first_stage_model
        with torch.no_grad():
            raw = vae.encode(self.vae.process_input(images).to(self.vae.vae_dtype))
        return self.base.latent_format.process_in(raw.float())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> [B,3,H,W] 0..1, differentiable (DIP's identity loss)."""
        raw = self.base.latent_format.process_out(latents)
        out = self.vae.first_stage_model.decode(raw.to(self.vae.vae_dtype))
        return self.vae.process_output(out.float())


class CheckpointFileError(BadInputError, FileNotFoundError):
    """The SD1.5 checkpoint a run (or precompute) starts from is not given or is not a file;
    the message names the setting, the path and what to give."""


def check_checkpoint(path: str | os.PathLike, setting: str = "checkpoint") -> Path:
    """The SD1.5 checkpoint file `path`, checked to exist before anything loads (a missing
    file then fails in a second, naming `setting`, not minutes later in ComfyUI's loader)."""
    want = "give the SD1.5 .safetensors checkpoint to start from"
    if not os.fspath(path).strip():
        raise CheckpointFileError(f"{setting}: not set; {want}.")
    path = Path(path)
    if not path.exists():
        raise CheckpointFileError(f"{setting}: {path} does not exist; check the path, or {want}.")
    if not path.is_file():
        raise CheckpointFileError(f"{setting}: {path} is not a file; {want}.")
    return path


def load_models(config: TrainConfig, device: torch.device) -> Models:
    import comfy.sd

    check_checkpoint(config.checkpoint)
    patcher, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(
        config.checkpoint, output_vae=True, output_clip=True, model_options={"dtype": torch.float32})
    if clip is None or vae is None:
        raise ValueError(f"{config.checkpoint} lacks a text encoder or VAE; training needs a full SD1.5 checkpoint")
    base = patcher.model
    require_sd15(model_context_dim(base), str(config.checkpoint), "set `checkpoint` to an SD1.5 file")
    warm = None
    if config.init_unet:  # FastComposer's UNet (or another SD1.5 UNet) over the checkpoint's, before LoRA/grad setup
        from .warm_start import load_init_unet

        warm = load_init_unet(base.diffusion_model, config.init_unet)
    base.to(device)
    vae.first_stage_model.to(device).requires_grad_(False).eval()
    vae.device = device
    base.requires_grad_(False)
    unet = base.diffusion_model
    models = Models(patcher, base, unet, clip, vae, device, warm_start=warm, encoders_from=str(config.checkpoint))
    if config.mode == "full":
        unet.requires_grad_(True)
    elif config.mode == "lora":
        models.lora = LoRASet()
        count = models.lora.attach(unet, config.lora_targets, config.lora_rank, config.lora_alpha)
        log.info("LoRA rank %d on %d UNet layers", config.lora_rank, count)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    return models


def trainable_unet_parameters(models: Models) -> dict[str, nn.Parameter]:
    if models.lora is not None:
        return dict(models.lora.named_parameters())
    return {n: p for n, p in models.unet.named_parameters() if p.requires_grad}


def enable_gradient_checkpointing(unet: nn.Module) -> int:
    """Recompute every ResBlock and SpatialTransformer in the backward pass.

    ComfyUI writes the current block into `transformer_options` as it walks the UNet;
    each checkpointed call gets its own shallow copy so that recomputation sees the
    block it ran in (attention patches are looked up by block) rather than the last one.
    """
    count = 0
    for module in unet.modules():
        if type(module).__name__ in ("ResBlock", "SpatialTransformer"):
            module.forward = _checkpointed(module.forward)
            count += 1
    return count


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
