"""Mixed precision: which autocast dtype a run uses, and whether it needs loss scaling.

bf16 keeps fp32's exponent range, so it needs no loss scaling, but only GPUs from
Ampere on (compute capability 8.0) run it natively; on a V100 or T4 torch emulates
it slowly. There fp16 autocast with a GradScaler is the fast choice. The CPU trains in
fp32 unless a precision is asked for explicitly.
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """True when `device` is a GPU that computes in bf16 natively (not emulated)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8 and bool(torch.cuda.is_bf16_supported())


def choose_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: 'fp32', 'bf16' or 'fp16'. An explicit choice is kept;
    'auto' is bf16 on GPUs with native bf16, fp16 (with loss scaling) on older GPUs,
    fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


def autocast(precision: str, device: torch.device):
    """The autocast context of a chosen precision (none for fp32)."""
    if precision in DTYPES:
        return torch.autocast(device.type, dtype=DTYPES[precision])
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (whose 5-bit exponent underflows small gradients);
    disabled, its calls pass through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
