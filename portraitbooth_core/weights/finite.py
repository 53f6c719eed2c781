"""Non-finite tensors (NaN, +-infinity): refused when weights are written and when loaded.

A run that diverged (or a setting out of range, e.g. ema_decay=Infinity) can leave NaN or
infinity in the weights; a file holding them loads fine and then gives an all-black image
with no error. So writers and loaders name the tensors instead (names only: never values).
"""
from __future__ import annotations

from typing import Mapping

import torch


class NonFiniteWeightsError(ValueError):
    """Weights about to be written hold NaN or infinity; the message names them and the fix."""


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity, sorted."""
    bad = []
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()) \
                and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return sorted(bad)


def describe_names(names: list[str], limit: int = 6) -> str:
    """'a, b, c' or 'a, b, ... and 7 more': a message stays short for a whole UNet."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... and {len(names) - limit} more"


__all__ = ["NonFiniteWeightsError", "describe_names", "non_finite_names"]
