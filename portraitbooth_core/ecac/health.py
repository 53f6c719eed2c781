"""Attention health during training: is each token L_loc trains still alive in the face?

Read from the maps L_loc already captured (`AttentionCapture.pop_layers()`: (b, groups,
h, w) per layer), so it costs no UNet pass. Per layer group -- the UNet block a layer
sits in, `input`, `middle` or `output` (ComfyUI's names, the first part of a layer name
such as `input.7.0`) -- and per token (identity, expression):

  face  the token's mean attention probability inside the face (mask-weighted): what
        L_loc's floors beta and gamma ask for there
  conc  the share of the token's attention mass that falls inside the face over the
        face's share of the image (1: no preference; the evidence's "identity concentration")
  area  the face's share of the image at that group's layers

A dead token: its attention in the face near 0 (README's evidence seed 1 ended at 1e-10).
The softmax passes a pull on a token's probability A to its logit as A (1 - A), so the
paper's floor relu(beta - A) can no longer bring it back, and nothing in the losses says
so. `CollapseMonitor` raises an alarm when a token's `face` stays below a threshold in
every group for `patience` consecutive observed steps.

`attention_sums` reduces on the device to one small tensor of weighted sums that the
caller reads with its other numbers (no host read here) and may add up over micro-batches
and ranks before `summarize` turns it into the logged numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from .loss import resize_mask

TOKENS = ("identity", "expression")
BLOCKS = ("input", "middle", "output")  # the order groups are listed in
# Per token and group: weighted sums of face, mass share in the face, face area share; the weight.
FIELDS = 4
PREFIX = "attn"  # logged keys: attn/<token>/<group>/face, attn/<token>/<group>/conc, attn/area/<group>


def layer_group(name: str) -> str:
    """The group of a captured layer: its block ("input.7.0" -> "input")."""
    return name.split(".", 1)[0]


def layer_groups(names: Iterable[str]) -> list[str]:
    """The groups of these layers, each once, in UNet order (input, middle, output, then others)."""
    found = {layer_group(n) for n in names}
    return [b for b in BLOCKS if b in found] + sorted(found - set(BLOCKS))


def attention_sums(layers: Sequence[tuple[str, torch.Tensor]], mask: torch.Tensor, face_present: torch.Tensor,
                   expression_present: torch.Tensor, groups: Sequence[str], identity_group: int = 0,
                   expression_group: int = 1) -> torch.Tensor:
    """(len(TOKENS), len(groups), FIELDS) float32 on the maps' device, detached: per token
    and group the sums over samples and layers of w * face, w * mass share in the face,
    w * face area, and w, where w is the sample's weight as L_loc gives it (identity:
    face_present; expression: face_present * expression_present; 0 for an empty mask).

    layers: `AttentionCapture.pop_layers()` (maps (b, groups, h, w)); mask (b, H, W) in [0, 1];
    groups: `layer_groups` of the run's layers (every layer's group must be in it)."""
    if not layers:
        raise ValueError("attention_sums needs at least one captured layer")
    device = layers[0][1].device
    mask = mask.to(device)
    face = face_present.float().to(device)
    weights = torch.stack([face, face * expression_present.float().to(device)], 1)  # (b, tokens)
    per_group: list[list[torch.Tensor]] = [[] for _ in groups]
    with torch.no_grad():
        for name, maps in layers:
            maps = maps.detach().float()
            m = resize_mask(mask, tuple(maps.shape[-2:])).flatten(1)           # (b, n)
            # views, not a list index (which would copy an index tensor to the device per layer)
            a = torch.stack([maps[:, identity_group], maps[:, expression_group]], 1).flatten(2)  # (b, tokens, n)
            inside = (a * m[:, None]).sum(-1)                                  # (b, tokens)
            m_sum = m.sum(1, keepdim=True)
            w = weights * (m_sum > 0)                                          # no face in the mask: not measured
            fields = torch.stack([inside / m_sum.clamp_min(1e-12), inside / a.sum(-1).clamp_min(1e-30),
                                  m.mean(1, keepdim=True).expand_as(inside), torch.ones_like(inside)], -1)
            per_group[groups.index(layer_group(name))].append((fields * w[..., None]).sum(0))  # (tokens, FIELDS)
        zeros = weights.new_zeros(len(TOKENS), FIELDS)
        return torch.stack([torch.stack(g).sum(0) if g else zeros for g in per_group], 1)


def summarize(sums: torch.Tensor | Sequence, groups: Sequence[str]) -> dict[str, float]:
    """Summed `attention_sums` (any device, or nested lists) -> the logged numbers:
    attn/<token>/<group>/face, attn/<token>/<group>/conc and attn/area/<group>, for the
    tokens and groups that had a weight (a step without identity samples logs none)."""
    values = torch.as_tensor(sums, dtype=torch.float64).reshape(len(TOKENS), len(groups), FIELDS).tolist()
    out: dict[str, float] = {}
    for t, token in enumerate(TOKENS):
        for g, group in enumerate(groups):
            face, share, area, weight = values[t][g]
            if weight <= 0:
                continue
            out[f"{PREFIX}/{token}/{group}/face"] = face / weight
            out[f"{PREFIX}/{token}/{group}/conc"] = (share / weight) / max(area / weight, 1e-12)
            if token == TOKENS[0]:
                out[f"{PREFIX}/area/{group}"] = area / weight
    return out


def read_health(values: Mapping[str, object]) -> dict[str, dict[str, dict[str, float]]]:
    """Logged values (a metrics record) -> {token: {group: {"face": .., "conc": ..}}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in values.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == PREFIX and parts[1] in TOKENS and isinstance(value, (int, float)):
            out.setdefault(parts[1], {}).setdefault(parts[2], {})[parts[3]] = float(value)
    return out


@dataclass(frozen=True)
class CollapseAlarm:
    """A token whose attention in the face stayed below the threshold in every group."""
    step: int
    token: str
    groups: dict[str, dict[str, float]]  # group -> {"face": .., "conc": ..} at this step
    streak: int                           # observed steps in a row below the threshold
    threshold: float

    def describe(self) -> str:
        """The numbers, in one sentence."""
        where = ", ".join(f"{g} {v['face']:.3g} ({v.get('conc', float('nan')):.2f}x the face's area share)"
                          for g, v in self.groups.items())
        return (f"step {self.step}: the {self.token} token is dead: its mean attention inside the face is below "
                f"{self.threshold:g} in every layer group for {self.streak} logged steps in a row -- {where}")


class CollapseMonitor:
    """Counts, per token, the observed steps in a row where the token's attention in the face
    (`face`) is below `threshold` in every measured group; at `patience` it returns one
    CollapseAlarm, and again only after the token has recovered (one step at or above the
    threshold in some group) and died again. Steps that did not measure a token (no
    identity sample, no expression word, or a non-finite reading) neither count nor break
    its streak. threshold 0: never alarms."""

    def __init__(self, threshold: float, patience: int):
        if threshold < 0 or patience < 1:
            raise ValueError(f"CollapseMonitor needs threshold >= 0 and patience >= 1, got {threshold}, {patience}")
        self.threshold, self.patience = threshold, patience
        self.streak = {t: 0 for t in TOKENS}
        self.fired = {t: False for t in TOKENS}

    def observe(self, step: int, values: Mapping[str, object]) -> list[CollapseAlarm]:
        alarms = []
        for token, groups in read_health(values).items():
            # A non-finite reading (a diverged step, which the NaN guard skips) says nothing either way.
            faces = [v["face"] for v in groups.values() if "face" in v and math.isfinite(v["face"])]
            if not faces:
                continue
            if self.threshold <= 0 or max(faces) >= self.threshold:
                self.streak[token], self.fired[token] = 0, False
                continue
            self.streak[token] += 1
            if self.streak[token] >= self.patience and not self.fired[token]:
                self.fired[token] = True
                alarms.append(CollapseAlarm(step, token, groups, self.streak[token], self.threshold))
        return alarms
