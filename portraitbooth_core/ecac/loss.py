"""ECAC's localization loss (design.md §1), on captured cross-attention maps.

L_loc = 1/N sum_l [ lambda * (mean(A_i (1-M)) + mean(relu(beta - A_i) M))
                  + mu     * (mean(A_j (1-M)) + mean(relu(gamma - A_j) M)) ]

A_i: identity token's map, A_j: expression token's map, M: face mask, N layers. The
first half of each term pushes a token's attention out of the background; the truncated
second half pulls it up inside the face only to beta (gamma), so one face region can
answer to both tokens instead of the identity token taking all of it.

Means run over batch and pixels at each layer's own resolution (the mask is resized
to it), so a 16x16 and an 8x8 layer weigh the same. Samples without an expression word
(or without a face, for training's text-only 10%) are left out through the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ECACSettings:
    beta: float = 0.8      # identity truncation
    gamma: float = 0.1     # expression truncation
    lam: float = 0.001     # lambda: identity term weight
    mu: float = 0.01       # expression term weight


@dataclass
class LocLoss:
    total: torch.Tensor
    per_layer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> identity/expression/total


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(b, H, W) soft or binary mask -> (b, h, w) by area averaging (keeps the face's share)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    return F.interpolate(mask[:, None].float(), size=size, mode="area")[:, 0]


def _weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Mean over the samples that count; zero (still in the graph) when none does.
    return (per_sample * weight).sum() / weight.sum().clamp_min(1e-12)


def token_terms(attn: torch.Tensor, mask: torch.Tensor, floor: float, weight: torch.Tensor) -> torch.Tensor:
    """mean(A (1-M)) + mean(relu(floor - A) M) for one token at one layer; attn, mask (b, h, w)."""
    outside = (attn * (1 - mask)).flatten(1).mean(1)
    inside = (F.relu(floor - attn) * mask).flatten(1).mean(1)
    return _weighted_mean(outside + inside, weight)


def localization_loss(identity_maps: Sequence[torch.Tensor], expression_maps: Sequence[torch.Tensor],
                      mask: torch.Tensor, settings: ECACSettings = ECACSettings(),
                      layer_names: Sequence[str] | None = None, face_present: torch.Tensor | None = None,
                      expression_present: torch.Tensor | None = None) -> LocLoss:
    """L_loc over N layers. identity_maps/expression_maps: per layer (b, h, w);
    mask: (b, H, W) in [0, 1]; face_present / expression_present: (b,) 0/1 weights
    (a sample without an expression word adds no expression term)."""
    if len(identity_maps) != len(expression_maps) or not identity_maps:
        raise ValueError("need the same, non-zero number of identity and expression layer maps")
    b = mask.shape[0]
    face = torch.ones(b, device=mask.device) if face_present is None else face_present.float().to(mask.device)
    expr = face * (torch.ones(b, device=mask.device) if expression_present is None
                   else expression_present.float().to(mask.device))
    names = list(layer_names) if layer_names is not None else [str(i) for i in range(len(identity_maps))]
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    total = 0
    for name, a_i, a_j in zip(names, identity_maps, expression_maps):
        m = resize_mask(mask, tuple(a_i.shape[-2:]))
        ident = settings.lam * token_terms(a_i, m, settings.beta, face)
        express = settings.mu * token_terms(a_j, m, settings.gamma, expr)
        per_layer[name] = {"identity": ident, "expression": express, "total": ident + express}
        total = total + ident + express
    return LocLoss(total / len(identity_maps), per_layer)


def loss_from_capture(layers: Sequence[tuple[str, torch.Tensor]], mask: torch.Tensor,
                      settings: ECACSettings = ECACSettings(), identity_group: int = 0,
                      expression_group: int = 1, **weights) -> LocLoss:
    """L_loc from `AttentionCapture.pop_layers()` (maps (b, groups, h, w) per layer)."""
    return localization_loss([m[:, identity_group] for _, m in layers], [m[:, expression_group] for _, m in layers],
                             mask, settings, [n for n, _ in layers], **weights)
