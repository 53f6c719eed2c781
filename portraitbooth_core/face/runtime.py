"""onnxruntime sessions with a selectable execution provider.

Users of other identity packs often never learn that onnxruntime runs on the CPU (the
CPU-only wheel is installed, or CUDA libraries do not match): we say so once, loudly, and
on a machine with a GPU we print the command that fixes it.
"""
from __future__ import annotations

import logging
import os
import sys

from ..optional import require

log = logging.getLogger("portraitbooth.face")
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
_cpu_notice_given = False


def _gpu_present() -> bool:
    """Whether torch sees a CUDA GPU (torch is imported already wherever this runs)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not stop face analysis
        return False


def gpu_install_command() -> str:
    """The command that replaces the CPU-only onnxruntime wheel by the CUDA one."""
    return (f"{sys.executable} -m pip uninstall -y onnxruntime && "
            f"{sys.executable} -m pip install onnxruntime-gpu")


def resolve_providers(provider: str = "auto") -> list[str]:
    """onnxruntime provider list for 'auto' | 'cpu' | 'cuda' (errors name the fix)."""
    global _cpu_notice_given
    ort = require("onnxruntime", "Face analysis")
    if provider not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {PROVIDER_CHOICES}, got {provider!r}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda" and not has_cuda:
        raise RuntimeError(
            f"provider='cuda' was asked for, but this onnxruntime ({ort.__version__}) offers only "
            f"{available}. Install the GPU build ('pip uninstall onnxruntime && pip install "
            "onnxruntime-gpu') matching your CUDA, or choose provider 'auto' or 'cpu'.")
    if has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if not _cpu_notice_given:
        _cpu_notice_given = True
        msg = (f"[PortraitBooth] onnxruntime {ort.__version__} has no CUDA provider; face "
               "detection and recognition run on the CPU. Install 'onnxruntime-gpu' to use the GPU.")
        if _gpu_present():
            # The common silent failure: a GPU machine with the CPU-only wheel.
            msg += (" This machine has a CUDA GPU, so face analysis is much slower than it need be. "
                    f"Fix it with:\n    {gpu_install_command()}\nthen restart ComfyUI.")
        log.warning(msg)  # ComfyUI's console shows warnings; unconfigured logging prints them too
    return ["CPUExecutionProvider"]


def session_options():
    """SessionOptions respecting a process-wide thread cap, quiet below errors."""
    ort = require("onnxruntime", "Face analysis")
    opts = ort.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        # Respect a thread cap set for the whole process (shared CPUs in CI and servers).
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def make_session(model: str | os.PathLike | bytes, provider: str = "auto"):
    """An InferenceSession for a model path or serialized bytes on the chosen provider."""
    ort = require("onnxruntime", "Face analysis")
    src = bytes(model) if isinstance(model, (bytes, bytearray)) else os.fspath(model)
    return ort.InferenceSession(src, sess_options=session_options(), providers=resolve_providers(provider))
