"""Regional attention: one UNet pass, each subject's identity token confined to its region.

An `Attn2Dispatcher` hook (see portraitbooth_core/ecac/dispatch.py) on every cross-attention layer.
For each group of identity-token positions, the token's attention probability at a
query pixel is multiplied by the region's share there and every row renormalised.
That is exactly softmax(logits + log(share)): a share of 0 is the -inf logit mask
(the token does not exist outside its region), a soft edge fades it. Every other token
keeps weight 1 everywhere, so the rest of the prompt stays global, and where no
identity token is allowed the row is exactly the global prompt's attention.

The weights are resampled once per layer size; a group's schedule window is a device-side
gate (no host read of sigma) that hides its columns, applied once per model evaluation and
layer size, and the batch's attention mask is cached with them.

The identity tokens usually do not sit in the global prompt: `extend_context` appends
them after it, padded to whole 77-token chunks so that ComfyUI can still batch the
cond with a 77-token uncond (it repeats shorter contexts up to a common multiple);
the padding is hidden everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..ecac.dispatch import Gate, LayerCall, PerEvaluation, RowIndex, batch_mask, in_window

CHUNK = 77  # CLIP's context length: ComfyUI batches contexts whose lengths share multiples of it


@dataclass(frozen=True)
class TokenGroup:
    """Token positions that may only be attended inside `share` ((H, W), latent size)."""
    positions: tuple[int, ...]
    share: torch.Tensor
    sigma_start: float = math.inf   # outside [sigma_end, sigma_start] the tokens are hidden
    sigma_end: float = 0.0

    def active(self, sigma: torch.Tensor | float | None) -> Gate:
        """In its window: a host bool when known without the device, else a device bool."""
        return in_window(sigma, self.sigma_start, self.sigma_end)


def extend_context(context: torch.Tensor, extra: Sequence[torch.Tensor],
                   chunk: int = CHUNK) -> tuple[torch.Tensor, list[list[int]], list[int]]:
    """Append token embeddings after `context` (B, T, C).

    extra: per group a (1 or B, k, C) tensor. Returns (extended context, the positions of
    each group, the padding positions). The padding repeats the context's last token (a
    pad/end embedding), harmless even if some layer saw it, and is hidden by the hook.
    """
    batch, length, channels = context.shape
    pieces, positions, at = [], [], length
    for tokens in extra:
        if tokens.ndim != 3 or tokens.shape[-1] != channels:
            raise ValueError(f"identity tokens {tuple(tokens.shape)} do not fit a {channels}-channel context")
        if tokens.shape[0] not in (1, batch):
            raise ValueError(f"identity tokens for {tokens.shape[0]} prompts, but the context has {batch}")
        pieces.append(tokens.to(context).expand(batch, -1, -1))
        positions.append(list(range(at, at + tokens.shape[1])))
        at += tokens.shape[1]
    pad = (-at) % chunk
    if pad:
        pieces.append(context[:, -1:].expand(batch, pad, channels))
    hidden = list(range(at, at + pad))
    return torch.cat([context, *pieces], dim=1), positions, hidden


class RegionalAttention:
    """Hook: confine each group's tokens to its share map; hide `hidden` positions."""

    def __init__(self, groups: Sequence[TokenGroup], hidden: Sequence[int] = ()):
        self.groups = list(groups)
        self.hidden = list(hidden)
        self._cache: dict[tuple, torch.Tensor] = {}  # fixed for the run: per layer size
        self._evaluation = PerEvaluation()            # what the evaluation's gates make of them

    def wants(self, call: LayerCall) -> bool:
        return True

    def modifies(self, call: LayerCall) -> bool:
        return True

    def _gates(self, sigma) -> tuple:
        return self._evaluation.get(sigma, "gates", lambda: tuple(g.active(sigma) for g in self.groups))

    def _static_weights(self, size: tuple[int, int], tokens: int, device, on: tuple) -> torch.Tensor:
        """(h*w, tokens) multipliers with each group on or off as `on` says (a gated group: on)."""
        key = ("weights", size, tokens, str(device), on)
        if key not in self._cache:  # masks are fixed for a run: resize once per layer size
            weights = torch.ones(size[0] * size[1], tokens, device=device)
            weights[:, [p for p in self.hidden if p < tokens]] = 0.0
            for group, active in zip(self.groups, on):
                keep = [p for p in group.positions if 0 <= p < tokens]
                if not keep:
                    continue
                if not active:
                    weights[:, keep] = 0.0
                    continue
                share = F.interpolate(group.share[None, None].float().to(device), size=size,
                                      mode="area" if group.share.shape[-1] >= size[1] else "bilinear")
                weights[:, keep] = share.reshape(-1, 1).clamp(0, 1)
            self._cache[key] = weights
        return self._cache[key]

    def _hidden_by_gates(self, sigma, gates: tuple, tokens: int, device) -> torch.Tensor | None:
        """(tokens,) device bool: columns whose last writing group is gated off this evaluation
        (what token_weights would have set to 0 with that group off)."""
        def make():
            owner: dict[int, int] = {}
            for i, group in enumerate(self.groups):
                for p in group.positions:
                    if 0 <= p < tokens:
                        owner[p] = i  # later groups write over earlier ones
            hide = None
            for i, gate in enumerate(gates):
                if isinstance(gate, bool):
                    continue
                cols = [p for p, o in owner.items() if o == i]
                if not cols:
                    continue
                key = ("owned", i, tokens, str(device))
                if key not in self._cache:
                    owned = torch.zeros(tokens, dtype=torch.bool)
                    owned[cols] = True
                    self._cache[key] = owned.to(device)
                off = self._cache[key] & ~gate
                hide = off if hide is None else hide | off
            return hide
        return self._evaluation.get(sigma, ("hide", tokens, str(device)), make)

    def _weights(self, call: LayerCall, tokens: int, device, log: bool) -> torch.Tensor:
        gates = self._gates(call.sigma)
        on = tuple(g if isinstance(g, bool) else True for g in gates)
        weights = self._static_weights(call.size, tokens, device, on)
        key = ("log", call.size, tokens, str(device), on)
        if log:
            if key not in self._cache:
                self._cache[key] = weights.log()
            weights = self._cache[key]
        if all(isinstance(g, bool) for g in gates):
            return weights

        def gated():
            hide = self._hidden_by_gates(call.sigma, gates, tokens, device)
            return weights if hide is None else weights.masked_fill(hide, -math.inf if log else 0.0)
        return self._evaluation.get(call.sigma, (key, log, "gated"), gated)

    def token_weights(self, call: LayerCall, tokens: int, device) -> torch.Tensor:
        """(h*w, tokens) multipliers for this layer's probabilities."""
        return self._weights(call, tokens, device, log=False)

    def logit_bias(self, call: LayerCall, tokens: int, device) -> torch.Tensor:
        """log(token_weights): added to the logits it is `process` (0 -> -inf: the token is
        gone). With this the dispatcher keeps the fused attention kernel (fast path)."""
        return self._weights(call, tokens, device, log=True)

    def batch_bias(self, call: LayerCall, tokens: int, rows: RowIndex, dtype: torch.dtype, device) -> torch.Tensor:
        """logit_bias as the batch's attention mask (zero on the uncond rows), made once per
        layer size, and per evaluation only while a group's window is decided on the device."""
        bias = self.logit_bias(call, tokens, device)
        key = ("batch", id(bias), call.size, tokens, rows.rows, rows.batch, dtype, str(device))
        fixed = all(isinstance(g, bool) for g in self._gates(call.sigma))
        if not fixed:
            return self._evaluation.get(call.sigma, key, lambda: batch_mask(bias, rows, dtype))
        if key not in self._cache:
            self._cache[key] = batch_mask(bias, rows, dtype)
        return self._cache[key]

    def process(self, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        weighted = probs * self.token_weights(call, probs.shape[-1], probs.device)
        # global tokens keep weight 1, so a row never sums to 0 (BOS alone holds most of it)
        return weighted / weighted.sum(-1, keepdim=True).clamp_min(1e-12)
