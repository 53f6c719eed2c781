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

The floor term's form (ECACSettings.floor_form; training's `loc_floor` setting):
  "paper": relu(beta - A) M, as above (the default, unchanged).
  "log":   beta * relu(log beta - log A) M. Not the paper's. Its slope in A is -beta / A:
           -1 at the floor (as the paper's), steeper below it. Through the softmax
           (dA/dz = A (1 - A)) the paper's pull on a token's logit is A (1 - A), which
           vanishes when the token is dead (A ~ 1e-10: the collapse of README's evidence
           seed 1); the log form's is beta (1 - A), which does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

FLOORS = ("paper", "log")  # the floor term's forms (module docstring)
# Added to A under the log: a probability that underflowed to 0 gives a finite (large) term.
# float32 holds it (the maps are float32); the term is computed in float32 whatever the input.
LOG_EPS = 1e-30


@dataclass(frozen=True)
class ECACSettings:
    beta: float = 0.8      # identity truncation
    gamma: float = 0.1     # expression truncation
    lam: float = 0.001     # lambda: identity term weight
    mu: float = 0.01       # expression term weight
    floor_form: str = "paper"  # the floor term: "paper" (relu(beta - A)) or "log" (module docstring)


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


def below_floor(attn: torch.Tensor, floor: float, form: str = "paper") -> torch.Tensor:
    """The floor term's per-pixel penalty: relu(floor - A) ("paper") or
    floor * relu(log floor - log A) ("log"; in float32, 0 everywhere when floor is 0)."""
    if form == "paper":
        return F.relu(floor - attn)
    if form == "log":
        if floor <= 0:
            return torch.zeros_like(attn, dtype=torch.float32)
        return floor * F.relu(math.log(floor) - torch.log(attn.float() + LOG_EPS))
    raise ValueError(f"the floor term's form must be one of {', '.join(FLOORS)}, got {form!r}")


def token_terms(attn: torch.Tensor, mask: torch.Tensor, floor: float, weight: torch.Tensor,
                form: str = "paper") -> torch.Tensor:
    """mean(A (1-M)) + mean(below_floor(A) M) for one token at one layer; attn, mask (b, h, w).
    form "paper": mean(relu(floor - A) M), the paper's term."""
    outside = (attn * (1 - mask)).flatten(1).mean(1)
    inside = (below_floor(attn, floor, form) * mask).flatten(1).mean(1)
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
        ident = settings.lam * token_terms(a_i, m, settings.beta, face, settings.floor_form)
        express = settings.mu * token_terms(a_j, m, settings.gamma, expr, settings.floor_form)
        per_layer[name] = {"identity": ident, "expression": express, "total": ident + express}
        total = total + ident + express
    return LocLoss(total / len(identity_maps), per_layer)


def loss_from_capture(layers: Sequence[tuple[str, torch.Tensor]], mask: torch.Tensor,
                      settings: ECACSettings = ECACSettings(), identity_group: int = 0,
                      expression_group: int = 1, **weights) -> LocLoss:
    """L_loc from `AttentionCapture.pop_layers()` (maps (b, groups, h, w) per layer)."""
    return localization_loss([m[:, identity_group] for _, m in layers], [m[:, expression_group] for _, m in layers],
                             mask, settings, [n for n, _ in layers], **weights)
