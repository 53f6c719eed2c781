"""MultiDiffusion fusion: one denoising path per region, fused by the region shares.

At every step each path (the global prompt for the background, then one per region)
predicts from the same latent with shared UNet weights; the prediction used for the
step is sum_i share_i * pred_i with the background's share 1 - sum of region shares
(regions.layout makes the shares sum to 1 with it). With the same latent and sigma,
eps, x0 and v predictions are affine in one another, so fusing the model outputs is
fusing the denoised estimates, as in Bar-Tal et al. 2023 and the PortraitBooth paper.
CFG with one shared negative commutes with this fusion, so it is applied once after it.
"""
from __future__ import annotations

from typing import Sequence

import torch


def active_paths(background: torch.Tensor, shares: torch.Tensor) -> list[int]:
    """Indices of the paths worth running: 0 = background/global, i+1 = region i.
    A path whose share is zero everywhere cannot change the fused result."""
    paths = [0] if float(background.max()) > 0 else []
    return paths + [i + 1 for i in range(shares.shape[0]) if float(shares[i].max()) > 0]


def fuse(predictions: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i weights_i * predictions_i / sum_i weights_i.

    predictions: (B, C, H, W) each; weights: (H, W) each, latent-sized. Normalising makes
    the result a convex blend even where the weights were made for another latent or
    were rounded; where all weights vanish the first path's prediction is kept.
    """
    if not predictions or len(predictions) != len(weights):
        raise ValueError(f"{len(predictions)} predictions and {len(weights)} weight maps: need one map per path")
    ref = predictions[0]
    total = torch.zeros(ref.shape[-2:], device=ref.device, dtype=torch.float32)
    out = torch.zeros_like(ref, dtype=torch.float32)
    for pred, weight in zip(predictions, weights):
        if pred.shape != ref.shape:
            raise ValueError(f"path predictions differ in shape: {tuple(pred.shape)} vs {tuple(ref.shape)}")
        w = weight.to(device=ref.device, dtype=torch.float32)
        if w.shape != ref.shape[-2:]:
            raise ValueError(f"weight map {tuple(w.shape)} does not match the latent {tuple(ref.shape[-2:])}")
        out += pred.float() * w
        total += w
    empty = total <= 1e-8
    out = torch.where(empty, ref.float(), out / total.clamp_min(1e-8))
    return out.to(ref.dtype)
