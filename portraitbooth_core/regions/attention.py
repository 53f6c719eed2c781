"""Regional attention: one UNet pass, each subject's identity token confined to its region.

An `Attn2Dispatcher` hook (see portraitbooth_core/ecac/dispatch.py) on every cross-attention layer.
For each group of identity-token positions, the token's attention probability at a
query pixel is multiplied by the region's share there and every row renormalised.
That is exactly softmax(logits + log(share)): a share of 0 is the -inf logit mask
(the token does not exist outside its region), a soft edge fades it. Every other token
keeps weight 1 everywhere, so the rest of the prompt stays global, and where no
identity token is allowed the row is exactly the global prompt's attention.

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

from ..ecac.dispatch import LayerCall

CHUNK = 77  # CLIP's context length: ComfyUI batches contexts whose lengths share multiples of it


@dataclass(frozen=True)
class TokenGroup:
    """Token positions that may only be attended inside `share` ((H, W), latent size)."""
    positions: tuple[int, ...]
    share: torch.Tensor
    sigma_start: float = math.inf   # outside [sigma_end, sigma_start] the tokens are hidden
    sigma_end: float = 0.0

    def active(self, sigma: float | None) -> bool:
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start


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
        self._cache: dict[tuple, torch.Tensor] = {}

    def wants(self, call: LayerCall) -> bool:
        return True

    def modifies(self, call: LayerCall) -> bool:
        return True

    def token_weights(self, call: LayerCall, tokens: int, device) -> torch.Tensor:
        """(h*w, tokens) multipliers for this layer's probabilities."""
        active = tuple(g.active(call.sigma) for g in self.groups)
        key = (call.size, tokens, str(device), active)
        if key not in self._cache:  # masks are fixed for a run: resize once per layer size
            weights = torch.ones(call.size[0] * call.size[1], tokens, device=device)
            weights[:, [p for p in self.hidden if p < tokens]] = 0.0
            for group, on in zip(self.groups, active):
                keep = [p for p in group.positions if 0 <= p < tokens]
                if not keep:
                    continue
                if not on:
                    weights[:, keep] = 0.0
                    continue
                share = F.interpolate(group.share[None, None].float().to(device), size=call.size,
                                      mode="area" if group.share.shape[-1] >= call.size[1] else "bilinear")
                weights[:, keep] = share.reshape(-1, 1).clamp(0, 1)
            self._cache[key] = weights
        return self._cache[key]

    def logit_bias(self, call: LayerCall, tokens: int, device) -> torch.Tensor:
        """log(token_weights): added to the logits it is `process` (0 -> -inf: the token is
        gone). With this the dispatcher keeps the fused attention kernel (fast path)."""
        key = ("bias", call.size, tokens, str(device), tuple(g.active(call.sigma) for g in self.groups))
        if key not in self._cache:
            self._cache[key] = self.token_weights(call, tokens, device).log()
        return self._cache[key]

    def process(self, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        weighted = probs * self.token_weights(call, probs.shape[-1], probs.device)
        # global tokens keep weight 1, so a row never sums to 0 (BOS alone holds most of it)
        return weighted / weighted.sum(-1, keepdim=True).clamp_min(1e-12)
