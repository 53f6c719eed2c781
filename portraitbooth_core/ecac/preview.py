"""Render captured word maps over images (pure torch: the preview node adds labels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

# A perceptually ordered dark-blue -> cyan -> yellow -> red ramp; low attention stays dim.
_RAMP = torch.tensor([[0.05, 0.05, 0.35], [0.0, 0.75, 0.9], [1.0, 0.9, 0.1], [0.9, 0.1, 0.05]])


def colorize(values: torch.Tensor) -> torch.Tensor:
    """(..., H, W) in [0, 1] -> (..., H, W, 3) RGB."""
    x = values.clamp(0, 1) * (len(_RAMP) - 1)
    lo = x.floor().long().clamp_max(len(_RAMP) - 2)
    t = (x - lo)[..., None]
    ramp = _RAMP.to(values.device)
    return ramp[lo] * (1 - t) + ramp[lo + 1] * t


def overlay_maps(images: torch.Tensor, maps: torch.Tensor, opacity: float = 0.6) -> torch.Tensor:
    """images (B, H, W, 3) in [0, 1] (ComfyUI IMAGE); maps (R, G, h, w) from AttentionStore.

    Returns (B * G, H, W, 3): for each image, one overlay per word, in group order. Each
    map is min-max normalised on its own so a weak word still shows where it lands.
    Image b takes map row b % R (a batch of 4 with one cond row reuses that row).
    """
    b, h, w, _ = images.shape
    r, g = maps.shape[:2]
    rows = maps[torch.arange(b) % r].float()  # (B, G, h, w)
    up = F.interpolate(rows, size=(h, w), mode="bilinear", align_corners=False)
    flat = up.flatten(2)
    lo, hi = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
    norm = (up - lo) / (hi - lo).clamp_min(1e-12)
    heat = colorize(norm).to(images.device, images.dtype)  # (B, G, H, W, 3)
    base = images[:, None].expand(b, g, h, w, 3)
    alpha = opacity * norm.to(images.device, images.dtype)[..., None].sqrt()  # faint where attention is low
    return rearrange(base * (1 - alpha) + heat * alpha, "b g y x c -> (b g) y x c").clamp(0, 1)
