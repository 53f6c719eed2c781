"""Cross-attention capture: the probabilities of chosen tokens on chosen layers.

`AttentionCapture` is an `Attn2Dispatcher` hook (see dispatch.py): install it
on the layers to read with `layers.install_on_layers`. It sees the cond rows only
(CFG's uncond half is skipped), averages heads and sums the probabilities of each
group's token positions (a multi-piece word holds the sum of its pieces' attention).

Two uses:
- training (`differentiable=True`): keeps each layer's maps at the layer's own size,
  with their autograd graph, for `loss.localization_loss`; positions may differ per
  sample (each caption has its own token layout).
- inference preview: detached maps resized to the latent's size and averaged over
  layers and steps into an `AttentionStore` that survives ComfyUI's model cloning.
"""
from __future__ import annotations

import numbers
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .dispatch import LayerCall

Positions = Sequence[int] | Sequence[Sequence[int]]  # shared, or one list per sample


def group_maps(probs: torch.Tensor, groups: Sequence[Positions], size: tuple[int, int]) -> torch.Tensor:
    """probs (rows, heads, h*w, tokens) -> (rows, groups, h, w): head-mean attention mass
    on each group's positions. Positions past the context length are ignored."""
    rows, _, n, tokens = probs.shape
    mean = probs.mean(dim=1)  # (rows, n, tokens)
    out = []
    for positions in groups:
        shared = not len(positions) or isinstance(positions[0], numbers.Integral)
        per_row = [positions] * rows if shared else positions
        if len(per_row) != rows:
            raise ValueError(f"per-sample positions for {len(per_row)} samples, but the batch has {rows} cond rows")
        cols = []
        for r, pos in enumerate(per_row):
            keep = [p for p in pos if 0 <= p < tokens]
            cols.append(mean[r, :, keep].sum(-1) if keep else mean.new_zeros(n))
        out.append(torch.stack(cols))
    return rearrange(torch.stack(out, dim=1), "r g (y x) -> r g y x", y=size[0], x=size[1])


class AttentionStore:
    """Running mean of resized, detached maps over layers and steps of the latest run.

    Shared on purpose: ModelPatcher.clone deep-copies model_options, and the preview node
    must read what the sampler's copy recorded, so deepcopy returns the same store.
    """

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._last_sigma: float | None = None
        self.steps = 0

    def __deepcopy__(self, memo) -> "AttentionStore":
        return self

    def clear(self) -> None:
        self._sum, self._count, self._last_sigma, self.steps = None, 0, None, 0

    def add(self, maps: torch.Tensor, sigma: float | None, size: tuple[int, int]) -> None:
        # Sigmas fall during a run; a rise means a new run began: forget the old one.
        if sigma is not None and self._last_sigma is not None and sigma > self._last_sigma:
            self.clear()
        if sigma != self._last_sigma or self.steps == 0:
            self.steps += 1
        self._last_sigma = sigma
        # Kept on the maps' device: a .cpu() per layer would stall a GPU every call.
        maps = F.interpolate(maps.detach().float(), size=size, mode="bilinear", align_corners=False)
        if self._sum is None or self._sum.shape != maps.shape:
            self._sum, self._count = torch.zeros_like(maps), 0
        self._sum += maps
        self._count += 1

    def mean(self) -> torch.Tensor | None:
        """(cond rows, groups, H, W) averaged over everything recorded, or None."""
        return None if self._sum is None else (self._sum / self._count).cpu()


class AttentionCapture:
    """Hook recording group maps; see the module docstring for the two modes."""

    def __init__(self, groups: Mapping[str, Positions], store: AttentionStore | None = None,
                 differentiable: bool = False):
        if not groups:
            raise ValueError("AttentionCapture needs at least one token group")
        self.names = list(groups)
        self.groups = [groups[n] for n in self.names]
        self.store = store
        self.differentiable = differentiable
        self.layers: list[tuple[str, torch.Tensor]] = []  # training mode: (layer name, maps)

    def wants(self, call: LayerCall) -> bool:
        return True

    def modifies(self, call: LayerCall) -> bool:
        return False

    def process(self, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        maps = group_maps(probs if self.differentiable else probs.detach(), self.groups, call.size)
        if self.differentiable:
            self.layers.append((call.name, maps))
        if self.store is not None:
            self.store.add(maps, call.sigma, call.latent_size)
        return probs

    def pop_layers(self) -> list[tuple[str, torch.Tensor]]:
        """Training: the maps of the forward pass(es) since the last pop, then forget them."""
        layers, self.layers = self.layers, []
        return layers
