"""onnxruntime sessions with a selectable execution provider.

Users of other identity packs often never learn that onnxruntime runs on the CPU (the
CPU-only wheel is installed, or CUDA libraries do not match): on a machine whose torch sees a
CUDA GPU we say so once, loudly, with the command that fixes it; on a machine without one the
CPU is the only choice and nothing is warned.
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
    """Whether torch sees a CUDA GPU (torch is imported already wherever this runs); a ROCm
    build's GPU does not count: onnxruntime-gpu would not run on it."""
    try:
        import torch

        return bool(torch.cuda.is_available()) and not getattr(torch.version, "hip", None)
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not stop face analysis
        return False


def torch_cuda_version() -> str | None:
    """The CUDA version torch was built for ('12.4'), None for a CPU or ROCm build."""
    try:
        import torch

        return torch.version.cuda
    except Exception:  # noqa: BLE001 - only used to word a hint
        return None


# onnxruntime-gpu on PyPI is built for CUDA 12 since 1.19; CUDA 11.8 builds come from this feed.
CUDA11_INDEX = "https://aiinfra.pkgs.visualstudio.com/PublicPackages/_packaging/onnxruntime-cuda-11/pypi/simple/"


def gpu_install_command(cuda: str | None = None) -> str:
    """The command that replaces the CPU-only onnxruntime wheel by the CUDA one matching
    `cuda` (default: the CUDA torch was built for)."""
    cuda = cuda if cuda is not None else torch_cuda_version()
    extra = f" --extra-index-url {CUDA11_INDEX}" if cuda and cuda.split(".")[0] == "11" else ""
    return (f"{sys.executable} -m pip uninstall -y onnxruntime && "
            f"{sys.executable} -m pip install onnxruntime-gpu{extra}")


def cpu_fallback_notice(provider: str = "auto") -> str:
    """What to tell the user when face analysis on `provider` runs on the CPU although torch
    sees a CUDA GPU (onnxruntime without its CUDA provider): the fix, with the install
    command. '' when the provider is 'cpu' by choice, onnxruntime has CUDA, or there is no GPU."""
    if provider == "cpu" or not _gpu_present():
        return ""
    ort = require("onnxruntime", "Face analysis")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ""
    cuda = torch_cuda_version()
    built = f" (torch built for CUDA {cuda})" if cuda else ""
    return (f"[PortraitBooth] onnxruntime {ort.__version__} has no CUDA provider; face detection and "
            f"recognition run on the CPU. This machine has a CUDA GPU{built}, so face analysis is much slower "
            f"than it need be. Fix it with:\n    {gpu_install_command(cuda)}\nthen restart ComfyUI.")


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
            f"{available}. Install the GPU build matching your CUDA ({gpu_install_command()}), or choose "
            "provider 'auto' or 'cpu'.")
    if has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if not _cpu_notice_given:
        _cpu_notice_given = True
        notice = cpu_fallback_notice(provider)
        if notice:
            # The common silent failure: a GPU machine with the CPU-only wheel. Said once per process.
            log.warning(notice)  # ComfyUI's console shows warnings; unconfigured logging prints them too
        else:  # no GPU: the CPU is the only choice, nothing to fix
            log.info("[PortraitBooth] no CUDA GPU; face analysis runs on onnxruntime's CPU provider.")
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
