"""onnxruntime sessions with a selectable execution provider.

Users of other identity packs often never learn that onnxruntime runs on the CPU (the
CPU-only wheel is installed, or CUDA libraries do not match): we say so once, loudly.
"""
from __future__ import annotations

import logging
import os

from ..optional import require

log = logging.getLogger("portraitbooth.face")
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
_cpu_notice_given = False


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
        log.warning(msg)  # ComfyUI's console shows warnings; unconfigured logging prints them too
    return ["CPUExecutionProvider"]


def make_session(model: str | os.PathLike | bytes, provider: str = "auto"):
    """An InferenceSession for a model path or serialized bytes on the chosen provider."""
    ort = require("onnxruntime", "Face analysis")
    opts = ort.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        # Respect a thread cap set for the whole process (shared CPUs in CI and servers).
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = bytes(model) if isinstance(model, (bytes, bytearray)) else os.fspath(model)
    return ort.InferenceSession(src, sess_options=opts, providers=resolve_providers(provider))


def nms(boxes, scores, iou_threshold: float):
    """Indices kept by greedy non-maximum suppression, highest score first (numpy)."""
    import numpy as np

    order = np.argsort(-scores)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = iw * ih
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return keep
