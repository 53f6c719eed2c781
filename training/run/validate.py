"""Validation images during training: deterministic DDIM (eta 0) with CFG on the model
being trained, with the identity of a fixed dataset sample spliced onto its caption."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from portraitbooth_core.dip.estimate import eps_from_denoised, noised_latent, sigma_at
from portraitbooth_core.stea.projector import splice_identity

from ..dataset.samples import decode


@torch.no_grad()
def sample_image(models, projector, text_cache, caption: str, positions: list[int], embedding: torch.Tensor,
                 size: int, steps: int = 10, cfg: float = 5.0, seed: int = 0) -> np.ndarray:
    """One RGB uint8 image (size x size)."""
    device = models.device
    acp = models.alphas_cumprod.to(device)
    cond = splice_identity(text_cache(caption).to(device), positions, embedding[None].to(device), projector)
    uncond = text_cache("").to(device)
    context = torch.cat([cond, uncond])
    ratio = getattr(models.vae, "downscale_ratio", 8)
    h = size // ratio
    z = torch.randn(1, 4, h, h, generator=torch.Generator().manual_seed(seed)).to(device)
    ts = torch.linspace(len(acp) - 1, 0, steps).round().long().to(device)
    x = z * (sigma_at(acp, ts[0]) ** 2 + 1).sqrt()       # sigma-space start (ComfyUI's convention)
    for i, t in enumerate(ts):
        sigma = sigma_at(acp, t)
        both = models.base.apply_model(torch.cat([x, x]), sigma.expand(2), c_crossattn=context).float()
        denoised = both[1:] + cfg * (both[:1] - both[1:])
        nxt = ts[i + 1] if i + 1 < len(ts) else None
        if nxt is None:
            x = denoised
            break
        # DDIM step in sigma space: keep the implied noise, move to the next level
        x = noised_latent(denoised, eps_from_denoised(x, denoised, sigma), sigma_at(acp, nxt))
    image = models.decode_latents(x)[0].clamp(0, 1)
    return (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)


def write_validation(folder: str | Path, step: int, trainer) -> Path:
    """Sample the first dataset sample's identity and caption; PNG under <run>/validation/."""
    from PIL import Image

    sample = decode(trainer.reader.read(0))
    meta = sample["meta"]
    module = trainer.module
    image = sample_image(trainer.models, module.projector, module.text, meta["caption"],
                         meta["identity_positions"], sample["embedding"], int(trainer.reader.index["resolution"]),
                         trainer.config.validation_steps, trainer.config.validation_cfg, trainer.config.seed)
    path = Path(folder) / "validation" / f"step-{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    trainer.metrics.image(step, "validation", image)
    return path
