"""Where each subject goes: region masks at the latent's size, and how they share pixels.

A region is placed by a mask (any size: it is resized to the latent), a box (fractions
of the image), or nothing, in which case it takes a slot of an automatic side-by-side
layout with soft edges. Every region's placement becomes a *share* map in [0, 1]:
where regions overlap they split the pixel by their weights, so shares never sum past 1,
and the rest (1 - sum of shares) is the background, which belongs to the global prompt.
Both sampler modes read the same shares: regional attention as the weight of each
subject's identity token, multidiffusion as the weight of each region's prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

EMPTY = 1e-3       # a mask whose largest value is below this selects nothing
SPECK = 0.05       # after resizing: under 5% of any one latent pixel is a stray stroke, not a region
ASPECT_TOL = 0.02  # relative aspect difference that still counts as "the same shape"


class RegionError(ValueError):
    """A region input that cannot be used as given; the message says which and what to do."""


@dataclass(frozen=True)
class Box:
    """A rectangle in fractions of the image: left, top, width, height in [0, 1]."""
    x: float
    y: float
    width: float
    height: float

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise RegionError(f"box width and height must be > 0, got {self.width} x {self.height}")
        if not (0 <= self.x < 1 and 0 <= self.y < 1):
            raise RegionError(f"box corner ({self.x}, {self.y}) lies outside the image; use fractions in [0, 1)")


Placement = torch.Tensor | Box | None


@dataclass
class Layout:
    shares: torch.Tensor      # (regions, H, W): each region's weight per latent pixel
    background: torch.Tensor  # (H, W): 1 - sum of shares, the global prompt's part
    notes: list[str] = field(default_factory=list)  # adjustments the user should hear about


def box_mask(box: Box, height: int, width: int) -> torch.Tensor:
    """(height, width) mask, 1 inside the box; at least one pixel so a small box is never empty."""
    top, left = int(box.y * height), int(box.x * width)
    bottom = max(top + 1, round(min(box.y + box.height, 1.0) * height))
    right = max(left + 1, round(min(box.x + box.width, 1.0) * width))
    mask = torch.zeros(height, width)
    mask[top:bottom, left:right] = 1.0
    return mask


def side_by_side(count: int, height: int, width: int, feather: float = 0.15) -> torch.Tensor:
    """(count, height, width) columns that cross-fade over `feather` of a column's width at
    each inner border (linear ramps summing to 1), so no seam shows where subjects meet."""
    if count < 1:
        raise RegionError("an automatic layout needs at least one region")
    x = (torch.arange(width, dtype=torch.float32) + 0.5) / width * count  # column units
    ramp = max(float(feather), 1e-6)
    cols = []
    for i in range(count):
        left = torch.ones_like(x) if i == 0 else ((x - i) / ramp + 0.5).clamp(0, 1)
        right = torch.ones_like(x) if i == count - 1 else ((i + 1 - x) / ramp + 0.5).clamp(0, 1)
        cols.append((left * right)[None].expand(height, width))
    return torch.stack(cols)


def emptiness(peak: float) -> str:
    """How a mask that selects nothing is described: truly zero, or only faint values."""
    return "empty (all zero)" if peak <= 0 else f"nearly empty (max {peak:.4f})"


def fit_mask(mask: torch.Tensor, height: int, width: int, label: str = "mask") -> tuple[torch.Tensor, str | None]:
    """A MASK ((H, W) or (1, H, W), any size) resized to the latent's (height, width).

    Masks are normally drawn at image size (8x the latent), so resizing is routine and
    silent; a different aspect ratio means the mask gets stretched, which is reported.
    """
    if mask.ndim == 3:
        if mask.shape[0] != 1:
            raise RegionError(f"{label} holds {mask.shape[0]} masks; give one mask per region")
        mask = mask[0]
    if mask.ndim != 2:
        raise RegionError(f"{label} has shape {tuple(mask.shape)}; expected a single (height, width) mask")
    mask = mask.detach().float().cpu().clamp(0, 1)
    if float(mask.max()) < EMPTY:
        raise RegionError(f"{label} is {emptiness(float(mask.max()))}: paint where the subject should appear, or "
                          f"leave it unconnected to use the automatic side-by-side layout.")
    note = None
    h, w = mask.shape
    if abs((w / h) / (width / height) - 1.0) > ASPECT_TOL:
        note = (f"{label} is {w}x{h} but the image is {width * 8}x{height * 8} ({width}x{height} latent): its "
                f"aspect ratio differs, so it was stretched to fit. Draw masks at the output's size.")
    if (h, w) != (height, width):
        # area averaging keeps thin strokes from vanishing when shrinking 8x
        mode = "area" if h >= height and w >= width else "bilinear"
        kwargs = {} if mode == "area" else {"align_corners": False}
        mask = F.interpolate(mask[None, None], size=(height, width), mode=mode, **kwargs)[0, 0].clamp(0, 1)
    if float(mask.max()) < SPECK:
        raise RegionError(f"{label} selects almost nothing once resized to the {width}x{height} latent "
                          f"(1 latent pixel = 8x8 image pixels): make the painted area larger.")
    return mask, note


def layout(placements: Sequence[Placement], weights: Sequence[float], height: int, width: int,
           feather: float = 0.15, labels: Sequence[str] | None = None) -> Layout:
    """Shares for every region at latent size (height, width).

    Regions without a mask or box share an automatic side-by-side layout among
    themselves, in order. Where regions overlap, region i gets w_i*m_i / sum_j w_j*m_j
    (blending by weights); where they do not, min(w_i*m_i, 1).
    """
    if not placements:
        raise RegionError("no regions given: connect at least one PortraitBooth Region")
    if len(weights) != len(placements):
        raise ValueError("one weight per region is needed")
    labels = list(labels or [f"region {i + 1}" for i in range(len(placements))])
    notes: list[str] = []
    auto = [i for i, p in enumerate(placements) if p is None]
    columns = side_by_side(len(auto), height, width, feather) if auto else None
    masks = []
    for i, place in enumerate(placements):
        if place is None:
            masks.append(columns[auto.index(i)])
        elif isinstance(place, Box):
            masks.append(box_mask(place, height, width))
        else:
            mask, note = fit_mask(place, height, width, f"{labels[i]}'s mask")
            masks.append(mask)
            if note:
                notes.append(note)
    for i, w in enumerate(weights):
        if w <= 0:
            raise RegionError(f"{labels[i]} has weight {w}; weights must be > 0")
    weighted = torch.stack(masks) * torch.tensor([float(w) for w in weights]).view(-1, 1, 1)
    total = weighted.sum(0)
    # the automatic columns cross-fade to a sum of exactly 1: only more than that is overlap
    if bool((torch.stack(masks).sum(0) > 1.001).any()):
        notes.append("regions overlap: where they do, they are blended by their weights")
    shares = weighted / total.clamp_min(1.0)
    return Layout(shares, (1.0 - shares.sum(0)).clamp_min(0.0), notes)
