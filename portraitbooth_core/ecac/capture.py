"""Cross-attention capture: the probabilities of chosen tokens on chosen layers.

`AttentionCapture` is an `Attn2Dispatcher` hook (see dispatch.py): install it
on the layers to read with `layers.install_on_layers`. It sees the cond rows only
(CFG's uncond half is skipped), averages heads and sums the probabilities of each
group's token positions (a multi-piece word holds the sum of its pieces' attention).

Two uses:
- training (`differentiable=True`): keeps each layer's maps at the layer's own size,
  with their autograd graph, for `loss.localization_loss`; positions may differ per
  sample (each caption has its own token layout).
- inference preview: detached maps averaged over layers and steps into an
  `AttentionStore` that survives ComfyUI's model cloning. Kept on the device as sums per
  layer size; resized to the latent, head-averaged and divided only when read.

At inference, where nothing edits the attention (capture only), the maps come from a
fused attention kernel of their own: softmax(q k^T) applied to a constant "value" whose
columns are the groups' token indicators gives each group's attention mass per head and
pixel in one launch, with no explicit (n x tokens) probabilities; ComfyUI's own output
is left as it was. One extra column of ones gives each row's total (1), which counts the
layers summed, so the store needs no counter of its own.
"""
from __future__ import annotations

import numbers
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .dispatch import LayerCall, PerEvaluation, RowIndex, attention_probs, head_view, like

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


def group_columns(groups: Sequence[Sequence[int]], tokens: int, width: int | None = None,
                  dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(tokens, width) float: column g is 1 on group g's positions (those < tokens), column
    len(groups) is all ones (a probability row's total, 1: it counts what is summed), the
    rest 0. width defaults to len(groups) + 1."""
    cols = torch.zeros(tokens, width or len(groups) + 1, dtype=dtype)
    for g, positions in enumerate(groups):
        keep = [p for p in positions if 0 <= p < tokens]
        cols[keep, g] = 1.0
    cols[:, len(groups)] = 1.0
    return cols.to(device)


class AttentionStore:
    """Running mean of detached maps over layers and steps of the latest run.

    Kept on the device without a host read per call: per layer size a sum of
    (rows, heads, h*w, columns) group masses whose column `groups` counts the layers
    (see `group_columns`). A new run (sigma rose) clears the sums with a device-side
    select, once per model evaluation; `mean()` and `steps` read the device.

    Shared on purpose: ModelPatcher.clone deep-copies model_options, and the preview node
    must read what the sampler's copy recorded, so deepcopy returns the same store.
    """

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.clear()

    def __deepcopy__(self, memo) -> "AttentionStore":
        return self

    def clear(self) -> None:
        self._sums: dict[tuple, torch.Tensor] = {}  # (h, w, heads, columns) -> summed masses
        self._flat: dict[tuple, torch.Tensor] = {}  # the same sums as (rows*heads*h*w, columns), for addmm_
        self._shape: tuple | None = None              # (rows, groups, latent size) of the sums
        self._evaluation = PerEvaluation()
        self._last_sigma: torch.Tensor | float | None = None
        self._steps: torch.Tensor | int = 0

    @property
    def steps(self) -> int:
        """Distinct sigmas recorded in the latest run (reads the device)."""
        return int(self._steps.reshape(-1)[0]) if torch.is_tensor(self._steps) else self._steps

    def _begin(self, sigma) -> None:
        # A new model evaluation. Sigmas fall during a run; a rise means a new run began:
        # forget the old one. A repeated sigma is not a new step.
        if not self._evaluation.begin(sigma):
            return
        last, self._last_sigma = self._last_sigma, sigma
        if sigma is None or last is None:
            rose, changed = False, sigma is not last
        elif torch.is_tensor(sigma) or torch.is_tensor(last):
            ref = sigma if torch.is_tensor(sigma) else last
            s, l = like(sigma, ref), like(last, ref)
            rose, changed = s > l, s != l
        else:
            rose, changed = sigma > last, sigma != last
        if isinstance(rose, bool):
            if rose:
                self.clear()
                self._evaluation.begin(sigma)
                self._last_sigma = sigma
            if changed or self.steps == 0:
                self._steps = self._steps + 1
            if torch.is_tensor(sigma) and not torch.is_tensor(self._steps):
                # the next evaluations count on the device, in place
                self._steps = torch.full(sigma.shape, self._steps, dtype=torch.long, device=sigma.device)
            return
        for total in self._sums.values():
            total.masked_fill_(rose, 0.0)
        if not torch.is_tensor(self._steps) or self._steps.shape != changed.shape:
            self._steps = torch.full(changed.shape, self.steps, dtype=torch.long, device=changed.device)
        self._steps.masked_fill_(rose, 0)
        self._steps.add_(changed)  # after a rise sigma differs: a run always starts at step 1

    def _target(self, key: tuple, shape: tuple) -> torch.Tensor | None:
        """The running sum for `key`, or None when there is none yet."""
        if shape != self._shape:  # another latent size or batch: start over (steps stay)
            self._sums, self._flat, self._shape = {}, {}, shape
        return self._sums.get(key)

    def add_masses(self, masses: torch.Tensor, sigma, size: tuple[int, int], latent: tuple[int, int],
                   groups: int) -> None:
        """masses (rows, heads, h*w, columns): per group and head, the attention mass at each
        pixel of a layer of `size`; column `groups` holds the row totals (1). Taken as it is
        (not copied): the caller hands over a fresh tensor."""
        self._begin(sigma)
        key = (*size, masses.shape[1], masses.shape[-1])
        total = self._target(key, (masses.shape[0], groups, *latent))
        if total is None:
            self._sums[key] = masses
        else:
            total.add_(masses)

    def add_product(self, probs: torch.Tensor, columns: torch.Tensor, sigma, size: tuple[int, int],
                    latent: tuple[int, int], groups: int) -> None:
        """add_masses(probs @ columns) as one in-place matrix product (probs (rows, heads,
        h*w, tokens), columns (tokens, groups + 1) from `group_columns`)."""
        self._begin(sigma)
        rows, heads, n, tokens = probs.shape
        key = (*size, heads, columns.shape[-1])
        flat = probs.reshape(-1, tokens)
        total = self._target(key, (rows, groups, *latent))
        if total is None:
            self._flat[key] = flat @ columns
            self._sums[key] = self._flat[key].view(rows, heads, n, -1)
            return
        if key not in self._flat:  # started by add_masses (contiguous: a view)
            self._flat[key] = total.view(-1, total.shape[-1])
        self._flat[key].addmm_(flat, columns)

    def add(self, maps: torch.Tensor, sigma, size: tuple[int, int]) -> None:
        """maps (rows, groups, h, w) at the layer's size; `size` is the latent's (H, W)."""
        rows, groups, h, w = maps.shape
        masses = maps.detach().float().reshape(rows, groups, h * w).transpose(1, 2)[:, None]
        ones = torch.ones(rows, 1, h * w, 1, dtype=masses.dtype, device=masses.device)
        self.add_masses(torch.cat([masses, ones], -1), sigma, (h, w), size, groups)

    def mean(self) -> torch.Tensor | None:
        """(cond rows, groups, H, W) averaged over everything recorded, or None."""
        if not self._sums:
            return None
        rows, groups, height, width = self._shape
        total, layers = None, 0
        for (h, w, _, _), masses in self._sums.items():
            count = round(float(masses[..., groups].mean()))
            if count == 0:
                continue
            maps = masses[..., :groups].mean(1).transpose(1, 2).reshape(rows, groups, h, w)
            maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
            total = maps if total is None else total + maps
            layers += count
        return None if total is None else (total / layers).cpu()


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
        # Positions shared by the batch (flat lists of ints) allow the column-matrix paths.
        self._shared = all(not len(p) or isinstance(p[0], numbers.Integral) for p in self.groups)
        self._columns: dict[tuple, torch.Tensor] = {}

    @property
    def reads_fused(self) -> bool:
        """The dispatcher may skip the explicit softmax and call `read` (see module docstring)."""
        return not self.differentiable and self._shared

    def wants(self, call: LayerCall) -> bool:
        return True

    def modifies(self, call: LayerCall) -> bool:
        return False

    def _cols(self, tokens: int, width: int, device, dtype, rows: int = 0, heads: int = 0) -> torch.Tensor:
        key = (tokens, width, str(device), dtype, rows, heads)
        if key not in self._columns:  # once per prompt length (and batch layout): no per-call tensors
            cols = group_columns(self.groups, tokens, width, dtype, device)
            # dense, not a stride-0 expand: fused kernels want a real (rows, heads, tokens, d) value
            self._columns[key] = cols.expand(rows, heads, tokens, width).contiguous() if rows else cols
        return self._columns[key]

    def read(self, q: torch.Tensor, k: torch.Tensor, rows: RowIndex, call: LayerCall) -> None:
        """Record from q and k (all rows; the cond `rows` are used) with one fused kernel."""
        if self.store is None:
            return
        heads, groups = call.heads, len(self.groups)
        d = q.shape[-1] // heads
        if d < groups + 1:  # the indicator columns do not fit in a head: explicit softmax
            self.process(attention_probs(rows.take(q), rows.take(k), heads), call)
            return
        qh, kh = head_view(q, heads, rows).float(), head_view(k, heads, rows).float()
        value = self._cols(k.shape[1], d, q.device, qh.dtype, qh.shape[0], heads)
        masses = F.scaled_dot_product_attention(qh, kh, value)  # (rows, heads, h*w, d): groups, then totals
        self.store.add_masses(masses, call.sigma, call.size, call.latent_size, groups)

    def process(self, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        if self.differentiable or not self._shared:
            maps = group_maps(probs if self.differentiable else probs.detach(), self.groups, call.size)
            if self.differentiable:
                self.layers.append((call.name, maps))
            if self.store is not None:
                self.store.add(maps, call.sigma, call.latent_size)
        elif self.store is not None:
            cols = self._cols(probs.shape[-1], len(self.groups) + 1, probs.device, probs.dtype)
            self.store.add_product(probs.detach() if probs.requires_grad else probs, cols, call.sigma, call.size,
                                   call.latent_size, len(self.groups))
        return probs

    def pop_layers(self) -> list[tuple[str, torch.Tensor]]:
        """Training: the maps of the forward pass(es) since the last pop, then forget them."""
        layers, self.layers = self.layers, []
        return layers
