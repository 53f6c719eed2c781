"""SCRFD detector of an insightface pack (det_10g.onnx, scrfd_10g_bnkps.onnx, ...), run by
insightface's own SCRFD class: its letterbox resize, input normalization, anchor decoding
and NMS are what FaceAnalysis does, so the landmarks (and therefore the aligned crops and
embeddings) are the ones IPAdapter FaceID, InstantID and PuLID get from the same photo.

What is ours: RGB in (insightface wants BGR), results as DetectedFace, and one retry at
smaller detection sizes when nothing was found (as IPAdapter FaceID and InstantID do: SCRFD
misses faces that fill most of a square photo at 640, and finds them at a smaller size).
"""
from __future__ import annotations

import os

import numpy as np

from .types import DEFAULT_DET_THRESHOLD, DetectedFace

RETRY_STEP = 64  # IPAdapter FaceID / InstantID step their retries down by 64 px
RETRY_MIN = 256


class SCRFDDetector:
    """insightface's SCRFD on RGB images; needs the 5-point ('kps') variant."""

    default_threshold = DEFAULT_DET_THRESHOLD  # insightface's FaceAnalysis default, which the other packs use
    sizes_itself = True  # letterboxes any photo into det_size: no resized copy needed

    def __init__(self, model_path: str | os.PathLike, provider: str = "auto", det_size: int = 640,
                 model=None, retry_smaller: bool = True):
        from .insight import load_model
        from .runtime import resolve_providers

        self.path = os.fspath(model_path)
        self.name = f"scrfd ({os.path.basename(self.path)}, insightface)"
        self.model = model if model is not None else load_model(self.path, resolve_providers(provider))
        if getattr(self.model, "taskname", None) != "detection":
            raise ValueError(f"{self.path} is not an SCRFD face detector (insightface routes it as "
                             f"{getattr(self.model, 'taskname', 'unknown')!r}).")
        if not self.model.use_kps:
            raise ValueError(f"{self.path}: this SCRFD model has no 5-point landmark outputs; "
                             "alignment needs them. Use a '*_bnkps' / 'det_10g' model.")
        # Fixed-size exports (e.g. *_shape640x640.onnx) can only run at their own size.
        static = getattr(self.model, "static_input_size", None)
        self.det_size = tuple(int(v) for v in static) if static else (int(det_size), int(det_size))
        sizes = [self.det_size]
        if retry_smaller and not static:
            sizes += [(s, s) for s in range(self.det_size[0] - RETRY_STEP, RETRY_MIN - 1, -RETRY_STEP)]
        self.sizes = sizes
        self.model.prepare(0, input_size=self.det_size)  # ctx_id 0 keeps the session's providers
        self.last_size = self.det_size

    def detect(self, image: np.ndarray, threshold: float = DEFAULT_DET_THRESHOLD) -> list[DetectedFace]:
        """Faces in an HxWx3 uint8 RGB image, best score first (insightface's order), in image pixels.

        Boxes are insightface's, unclipped (the gender/age model reads the box as it is)."""
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        self.model.det_thresh = float(threshold)  # read by detect() in insightface 0.7 and 2.x alike
        for size in self.sizes:
            det, kpss = self.model.detect(bgr, input_size=size)
            if len(det):
                self.last_size = size
                return [DetectedFace(det[i, :4].astype(np.float32), float(det[i, 4]), kpss[i].astype(np.float32),
                                     rank=i) for i in range(len(det))]
        self.last_size = self.sizes[-1]
        return []
