"""ECAC at inference: steer cross-attention inside the face toward identity + expression.

Inside the face region each query row's attention is edited so that the identity
token(s) hold at most beta of it and every expression token at least gamma; the other
tokens share what is left in their original proportions (rows still sum to 1). The
edit is blended in by strength * region, so outside the region, outside the schedule
window, on the uncond pass and at strength 0 nothing changes.

The region is a user mask, or else the identity token's own attention at the previous
model evaluation (averaged over the controlled layers, min-max normalised, thresholded):
where the model already draws the person is where the face will be.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .dispatch import LayerCall


@dataclass(frozen=True)
class ControlSettings:
    strength: float = 1.0
    beta: float = 0.8             # identity cap
    gamma: float = 0.1            # expression floor
    sigma_start: float = float("inf")  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    region_threshold: float = 0.5  # of the normalised identity map, when no mask is given


def constrain_rows(probs: torch.Tensor, identity: Sequence[int], expression: Sequence[int],
                   beta: float, gamma: float) -> torch.Tensor:
    """Rows of probs (..., tokens): identity mass capped at beta, each expression token
    raised to gamma, the remaining tokens rescaled to fill the rest. Rows already within
    the limits come back unchanged."""
    tokens = probs.shape[-1]
    expression = sorted({p for p in expression if 0 <= p < tokens})
    identity = sorted({p for p in identity if 0 <= p < tokens} - set(expression))
    fixed = identity + expression
    if not fixed:
        return probs
    out = probs.clone()
    if identity:
        mass = probs[..., identity].sum(-1, keepdim=True)
        out[..., identity] = probs[..., identity] * torch.where(mass > beta, beta / mass.clamp_min(1e-12), 1.0)
    if expression:
        out[..., expression] = probs[..., expression].clamp_min(gamma)
    fixed_mass = out[..., fixed].sum(-1, keepdim=True)
    over = fixed_mass > 1.0  # beta + k*gamma > 1: the targets alone fill the row
    out[..., fixed] = torch.where(over, out[..., fixed] / fixed_mass, out[..., fixed])
    fixed_mass = fixed_mass.clamp_max(1.0)
    free = [t for t in range(tokens) if t not in set(fixed)]
    if free:
        free_mass = probs[..., free].sum(-1, keepdim=True)
        scale = (1.0 - fixed_mass) / free_mass.clamp_min(1e-12)
        touched = (out[..., fixed] != probs[..., fixed]).any(-1, keepdim=True)  # exact no-op elsewhere
        out[..., free] = probs[..., free] * torch.where(touched, scale, 1.0)
    return out


class ExpressionControl:
    """Attn2Dispatcher hook; one instance is shared by all controlled layers."""

    def __init__(self, identity: Sequence[int], expression: Sequence[int], settings: ControlSettings,
                 mask: torch.Tensor | None = None):
        if not all(isinstance(p, numbers.Integral) for p in [*identity, *expression]):
            raise ValueError("control positions are shared by the batch: give flat lists of ints")
        self.identity, self.expression = list(identity), list(expression)
        self.settings = settings
        self.mask = None if mask is None else (mask[None] if mask.ndim == 2 else mask).float()
        self._sigma: float | None = None
        self._acc: torch.Tensor | None = None   # identity maps of the evaluation in progress
        self._count = 0
        self._region: torch.Tensor | None = None  # (rows, H, W) from the previous evaluation

    def _in_window(self, sigma: float | None) -> bool:
        s = self.settings
        return sigma is None or s.sigma_end <= sigma <= s.sigma_start

    def wants(self, call: LayerCall) -> bool:
        if self.settings.strength == 0 or not (self.identity or self.expression):
            return False
        if self.mask is not None:
            return self._in_window(call.sigma)
        self._roll(call.sigma)  # first call of an evaluation: last one's map becomes the region
        # Without a mask, also read the steps before the window: they supply the region.
        return call.sigma is None or call.sigma >= self.settings.sigma_end

    def modifies(self, call: LayerCall) -> bool:
        return self._in_window(call.sigma) and (self.mask is not None or self._region is not None)

    def _roll(self, sigma: float | None) -> None:
        # A new model evaluation: the finished one's identity map becomes the region.
        if sigma == self._sigma:
            return
        if sigma is not None and self._sigma is not None and sigma > self._sigma:
            self._region = None  # sigma rose: a new sampling run
        elif self._acc is not None:
            m = self._acc / self._count
            lo = m.flatten(1).min(1).values[:, None, None]
            hi = m.flatten(1).max(1).values[:, None, None]
            self._region = (((m - lo) / (hi - lo).clamp_min(1e-12)) > self.settings.region_threshold).float()
        self._sigma, self._acc, self._count = sigma, None, 0

    def _record_identity(self, probs: torch.Tensor, call: LayerCall) -> None:
        keep = [p for p in self.identity if p < probs.shape[-1]]
        if not keep:
            return
        m = probs.detach().mean(1)[..., keep].sum(-1).reshape(-1, 1, *call.size)
        m = F.interpolate(m, size=call.latent_size, mode="bilinear", align_corners=False)[:, 0]
        if self._acc is None or self._acc.shape != m.shape:
            self._acc, self._count = torch.zeros_like(m), 0
        self._acc += m
        self._count += 1

    def region(self, call: LayerCall, rows: int, device) -> torch.Tensor | None:
        """(rows, h*w) weights in [0, 1] for this layer, or None when there is none yet."""
        if self.mask is not None:
            items = [r % call.chunk_size for r in call.cond_rows]
            src = self.mask[[i % self.mask.shape[0] for i in items]]
        elif self._region is not None and self._region.shape[0] == rows:
            src = self._region
        else:
            return None
        m = F.interpolate(src[:, None].to(device), size=call.size, mode="bilinear", align_corners=False)
        return m.reshape(rows, -1).clamp(0, 1)

    def process(self, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        if self.mask is None:
            self._record_identity(probs, call)
        if not self.modifies(call):
            return probs
        region = self.region(call, probs.shape[0], probs.device)
        if region is None:
            return probs
        target = constrain_rows(probs, self.identity, self.expression, self.settings.beta, self.settings.gamma)
        weight = (self.settings.strength * region)[:, None, :, None]
        return probs + weight * (target - probs)
