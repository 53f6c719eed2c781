"""ECAC at inference: steer cross-attention inside the face toward identity + expression.

Inside the face region each query row's attention is edited so that the identity
token(s) hold at most beta of it and every expression token at least gamma; the other
tokens share what is left in their original proportions (rows still sum to 1). The
edit is blended in by strength * region, so outside the region, outside the schedule
window, on the uncond pass and at strength 0 nothing changes.

The region is a user mask, or else the identity token's own attention at the previous
model evaluation (averaged over the controlled layers, min-max normalised, thresholded):
where the model already draws the person is where the face will be.

Nothing here reads the device on the host: the schedule window and "is there a region
yet" are device-side gates, computed once per model evaluation and folded into the blend
weight (0 outside: the probabilities come back unchanged); token columns, resampled
regions and the previous evaluation's identity map stay on the device.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .dispatch import Gate, LayerCall, PerEvaluation, gate_and, gate_or, in_window, like


@dataclass(frozen=True)
class ControlSettings:
    strength: float = 1.0
    beta: float = 0.8             # identity cap
    gamma: float = 0.1            # expression floor
    sigma_start: float = float("inf")  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    region_threshold: float = 0.5  # of the normalised identity map, when no mask is given


@dataclass(frozen=True)
class TokenColumns:
    """A prompt's columns as classes, made once per prompt length, device and limits:
    the identity tokens form one class, each expression token one of its own, the rest
    are free. An edit is then a per-class scale of the row: two small matrix products and
    elementwise ops, the same kernels for any prompt (no Python lists, nothing per call)."""
    classes: torch.Tensor  # (tokens, 1 + expressions + 1): identity, each expression, free
    spread: torch.Tensor   # its transpose: per-class scales back to the columns (exact: one 1 a column)
    free: torch.Tensor     # (classes,) bool: True for the last, the free class
    floor: torch.Tensor    # (tokens,): gamma on the expression columns, 0 elsewhere
    low: torch.Tensor      # (classes,): the same per class
    high: torch.Tensor     # (classes,): beta for identity, +inf for the rest

    @classmethod
    def make(cls, identity: Sequence[int], expression: Sequence[int], tokens: int, device,
             dtype: torch.dtype = torch.float32, beta: float = 0.8, gamma: float = 0.1) -> "TokenColumns | None":
        expr = sorted({p for p in expression if 0 <= p < tokens})
        ident = sorted({p for p in identity if 0 <= p < tokens} - set(expr))
        if not (ident or expr):
            return None
        classes = torch.zeros(tokens, 2 + len(expr), dtype=dtype)
        classes[ident, 0] = 1.0
        for i, p in enumerate(expr):
            classes[p, 1 + i] = 1.0
        classes[classes.sum(1) == 0, -1] = 1.0
        floor = torch.zeros(tokens, dtype=dtype)
        floor[expr] = gamma
        low = floor @ classes
        high = torch.full((classes.shape[1],), math.inf, dtype=dtype)
        high[0] = beta
        with torch.inference_mode(False):  # shared with training, where autograd may see them
            return cls(classes.to(device), classes.t().contiguous().to(device),
                       (torch.arange(classes.shape[1]) == classes.shape[1] - 1).to(device),
                       floor.to(device), low.to(device), high.to(device))


def constrain_rows(probs: torch.Tensor, identity: Sequence[int], expression: Sequence[int],
                   beta: float, gamma: float) -> torch.Tensor:
    """Rows of probs (..., tokens): identity mass capped at beta, each expression token
    raised to gamma, the remaining tokens rescaled to fill the rest. Rows already within
    the limits come back unchanged."""
    cols = TokenColumns.make(identity, expression, probs.shape[-1], probs.device, probs.dtype, beta, gamma)
    return probs if cols is None else constrain(probs, cols)


_TINY = 1e-12


def constrain(probs: torch.Tensor, cols: TokenColumns) -> torch.Tensor:
    """constrain_rows with the columns made once. The expression floor is applied to the
    columns themselves (a token whose probability underflowed still gets gamma); the
    identity class and the free tokens are scaled by factors from the class masses, and
    every fixed class is divided by the wanted mass when the targets alone overfill the
    row. The free tokens' mass comes from their own sum, never as 1 - fixed (that loses
    every digit when the fixed tokens hold almost all of it). A row within the limits
    gets factors of exactly 1 (what the targets add is exactly 0): it comes back as it was."""
    shape = probs.shape
    p = probs.reshape(-1, shape[-1])
    mass = (p @ cols.classes).clamp_min(_TINY)  # (rows, classes): identity, each expression, free
    capped = mass.clamp_max(cols.high)
    # what the targets add to the fixed mass (exactly 0 for a row within the limits)
    added = (capped.clamp_min(cols.low) - mass).sum(-1, keepdim=True)
    free_mass = mass[:, -1:]
    left = free_mass - added  # for the free tokens: 1 - wanted, without the cancellation
    fixed = capped / (mass * (1.0 - left).clamp_min(1.0))  # overfilled: every fixed class divided by wanted
    scale = torch.where(cols.free, left.clamp_min(0.0) / free_mass, fixed)
    return (p.clamp_min(cols.floor) * (scale @ cols.spread)).reshape(shape)


def _not(g: Gate) -> Gate:
    return (not g) if isinstance(g, bool) else ~g


def _where(g: Gate, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a if g else b) if isinstance(g, bool) else torch.where(g, a, b)


class ExpressionControl:
    """Attn2Dispatcher hook; one instance is shared by all controlled layers."""

    def __init__(self, identity: Sequence[int], expression: Sequence[int], settings: ControlSettings,
                 mask: torch.Tensor | None = None):
        if not all(isinstance(p, numbers.Integral) for p in [*identity, *expression]):
            raise ValueError("control positions are shared by the batch: give flat lists of ints")
        self.identity, self.expression = list(identity), list(expression)
        self.settings = settings
        self.mask = None if mask is None else (mask[None] if mask.ndim == 2 else mask).float()
        self._evaluation = PerEvaluation()       # gates and weights of the evaluation in progress
        self._columns: dict[tuple, TokenColumns | None] = {}
        self._mask_regions: dict[tuple, torch.Tensor] = {}  # mask resampled per layer size
        # Without a mask: the identity map of the evaluation in progress, per layer size
        # (rows, heads, h*w, [identity mass, row sum = 1: counts the layers]), and the
        # region it left, both on the device with a device flag for "there is one".
        self._last_sigma: torch.Tensor | float | None = None
        self._acc: dict[tuple[int, int], torch.Tensor] = {}
        self._acc_key: tuple | None = None      # (rows, latent size) the maps were recorded at
        self._identity_cols: dict[tuple, torch.Tensor | None] = {}
        self._region: torch.Tensor | None = None  # (rows, H, W) from the previous evaluation
        self._valid: Gate = False

    def wants(self, call: LayerCall) -> bool:
        if self.settings.strength == 0 or not (self.identity or self.expression):
            return False
        if self._evaluation.begin(call.sigma) and self.mask is None:
            self._roll(call.sigma)  # first call of an evaluation: last one's map becomes the region
        if self.mask is not None:
            return self._window(call) is not False
        # Without a mask, also read the steps before the window: they supply the region.
        return self._recording(call) is not False

    def _window(self, call: LayerCall) -> Gate:
        s = self.settings
        return self._evaluation.get(call.sigma, "window", lambda: in_window(call.sigma, s.sigma_start, s.sigma_end))

    def _recording(self, call: LayerCall) -> Gate:
        end = self.settings.sigma_end
        return self._evaluation.get(call.sigma, "recording", lambda: in_window(call.sigma, math.inf, end))

    def modifies(self, call: LayerCall) -> Gate:
        if self.mask is not None:
            return self._window(call)
        if self._region is None:
            return False
        return self._evaluation.get(call.sigma, "modifies", lambda: gate_and(self._window(call), self._valid))

    def _roll(self, sigma) -> None:
        # A new model evaluation: the finished one's identity map becomes the region, the
        # region is forgotten when sigma rose (a new sampling run), and a repeated sigma
        # keeps accumulating. All compared on the device when sigma is a tensor.
        last, self._last_sigma = self._last_sigma, sigma
        if sigma is None or last is None:
            same, rose = sigma is None and last is None, False
        elif torch.is_tensor(sigma) or torch.is_tensor(last):
            ref = sigma if torch.is_tensor(sigma) else last
            s, l = like(sigma, ref), like(last, ref)
            same, rose = s == l, s > l
        else:
            same, rose = sigma == last, sigma > last
        if same is True:
            return
        if not self._acc:
            self._valid = gate_and(self._valid, _not(rose))
            return
        candidate, has = self._candidate()
        take = gate_and(gate_and(_not(same), _not(rose)), has)
        if self._region is None or self._region.shape != candidate.shape:
            self._region, self._valid = candidate, take
        else:
            self._region = _where(take, candidate, self._region)
            self._valid = gate_or([gate_and(self._valid, same), gate_and(gate_and(_not(same), _not(rose)),
                                                                         gate_or([has, self._valid]))])
        if same is False:
            self._acc = {}
        else:
            fresh = ~same
            for acc in self._acc.values():
                acc.masked_fill_(fresh, 0.0)

    def _candidate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(region from the accumulated identity maps, device flag: anything recorded)."""
        rows, latent = self._acc_key
        total, count = None, None
        for size, acc in self._acc.items():
            m = acc[..., 0].mean(1).reshape(rows, 1, *size)
            m = F.interpolate(m, size=latent, mode="bilinear", align_corners=False)[:, 0]
            total = m if total is None else total + m
            layers = acc[0, 0, 0, 1]  # every probability row sums to 1: the layers recorded
            count = layers if count is None else count + layers
        count = count.round()
        m = total / count.clamp_min(1.0)
        lo = m.flatten(1).min(1).values[:, None, None]
        hi = m.flatten(1).max(1).values[:, None, None]
        region = (((m - lo) / (hi - lo).clamp_min(1e-12)) > self.settings.region_threshold).float()
        return region, count > 0

    def _record_identity(self, probs: torch.Tensor, call: LayerCall) -> None:
        gate = self._recording(call)
        if gate is False:
            return
        tokens, device = probs.shape[-1], probs.device
        key = (tokens, device, probs.dtype)
        if key not in self._identity_cols:
            keep = [p for p in self.identity if p < tokens]
            cols = torch.zeros(tokens, 2, dtype=probs.dtype)
            cols[keep, 0] = 1.0
            cols[:, 1] = 1.0
            self._identity_cols[key] = cols.to(device) if keep else None
        cols = self._identity_cols[key]
        if cols is None:
            return
        if (probs.shape[0], call.latent_size) != self._acc_key:
            self._acc, self._acc_key = {}, (probs.shape[0], call.latent_size)
        m = (probs.detach() if probs.requires_grad else probs) @ cols  # (rows, heads, h*w, 2)
        acc = self._acc.get(call.size)
        if acc is None:
            self._acc[call.size] = m if gate is True else m * gate
        elif gate is True:
            acc.add_(m)
        else:
            acc.addcmul_(m, self._evaluation.get(call.sigma, "recording_f", lambda: gate.to(m.dtype)))

    def region(self, call: LayerCall, rows: int, device) -> torch.Tensor | None:
        """(rows, h*w) weights in [0, 1] for this layer, or None when there is none yet."""
        if self.mask is not None:
            items = tuple(r % call.chunk_size for r in call.cond_rows)
            key = (call.size, items, str(device))
            if key not in self._mask_regions:  # the mask is fixed: resample once per layer size
                src = self.mask[[i % self.mask.shape[0] for i in items]]
                m = F.interpolate(src[:, None].to(device), size=call.size, mode="bilinear", align_corners=False)
                self._mask_regions[key] = m.reshape(rows, -1).clamp(0, 1)
            return self._mask_regions[key]
        if self._region is None or self._region.shape[0] != rows:
            return None
        return self._evaluation.get(call.sigma, ("region", call.size, rows, str(device)), lambda: F.interpolate(
            self._region[:, None].to(device), size=call.size, mode="bilinear", align_corners=False
        ).reshape(rows, -1).clamp(0, 1))

    def _weight(self, call: LayerCall, rows: int, device) -> torch.Tensor | None:
        """strength * region, (rows, 1, h*w, 1), times the evaluation's gate (0 where it is
        off: the blend then returns the probabilities exactly); None when nothing edits."""
        gate = self.modifies(call)
        if gate is False:
            return None

        def ungated():
            region = self.region(call, rows, device)
            return None if region is None else (self.settings.strength * region)[:, None, :, None]

        key = ("weight", call.size, tuple(call.cond_rows), call.chunk_size, str(device))
        if self.mask is not None:  # fixed for the run: made once per layer size
            if key not in self._mask_regions:
                self._mask_regions[key] = ungated()
            weight = self._mask_regions[key]
        else:
            weight = self._evaluation.get(call.sigma, key, ungated)
        if weight is None or gate is True:
            return weight
        return self._evaluation.get(call.sigma, (key, "gated"), lambda: weight * gate.to(weight.dtype))

    def _token_columns(self, tokens: int, device, dtype) -> TokenColumns | None:
        key = (tokens, str(device), dtype)
        if key not in self._columns:
            s = self.settings
            self._columns[key] = TokenColumns.make(self.identity, self.expression, tokens, device, dtype,
                                                   s.beta, s.gamma)
        return self._columns[key]

    def process(self, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        if self.mask is None:
            self._record_identity(probs, call)
        weight = self._weight(call, probs.shape[0], probs.device)
        if weight is None:
            return probs
        cols = self._token_columns(probs.shape[-1], probs.device, probs.dtype)
        if cols is None:
            return probs
        # weight 0 (outside the region or the window) gives probs back exactly
        return torch.lerp(probs, constrain(probs, cols), weight)
