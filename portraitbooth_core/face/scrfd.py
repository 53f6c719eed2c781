"""SCRFD detector of an insightface pack (det_10g.onnx, scrfd_10g_bnkps.onnx, ...).

The network sees the photo letterboxed into det_size (aspect kept, padded right/bottom),
normalized as (x - 127.5) / 128 in RGB. Per stride (8, 16, 32) it emits scores, box
distances and 5-point offsets for 2 anchors per cell, all in units of the stride.
"""
from __future__ import annotations

import os

import numpy as np

from .images import resize
from .runtime import make_session, nms
from .types import DetectedFace

STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
MEAN, STD = 127.5, 128.0


def scrfd_layout(num_outputs: int) -> tuple[int, bool]:
    """(number of stride levels, has landmarks) for an SCRFD model with this many outputs."""
    layouts = {6: (3, False), 9: (3, True), 10: (5, False), 15: (5, True)}
    if num_outputs not in layouts:
        raise ValueError(f"an SCRFD detector has 6, 9, 10 or 15 outputs, this one has {num_outputs}")
    return layouts[num_outputs]


def _group_outputs(outs: list[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
    """Per stride, finest first: (scores, box distances, landmark offsets).

    Grouped by what the tensors hold (last dimension 1 / 4 / 10), not by output position,
    and ordered by row count: exports differ in output order and in a leading batch axis.
    """
    groups = {1: [], 4: [], 10: []}
    for o in outs:
        groups.setdefault(o.shape[-1], []).append(o.reshape(-1, o.shape[-1]))
    for key in (1, 4, 10):
        groups[key].sort(key=len, reverse=True)
    return [(s.reshape(-1), d, k) for s, d, k in zip(groups[1], groups[4], groups[10])]


class SCRFDDetector:
    """Runs an SCRFD ONNX model with our own decoding; needs the 5-point ('kps') variant."""

    def __init__(self, model_path: str | os.PathLike, provider: str = "auto",
                 det_size: int = 640, nms_threshold: float = 0.4, session=None):
        self.path = os.fspath(model_path)
        self.name = f"scrfd ({os.path.basename(self.path)})"
        self.session = session if session is not None else make_session(self.path, provider)
        self.input_name = self.session.get_inputs()[0].name
        levels, has_kps = scrfd_layout(len(self.session.get_outputs()))
        if not has_kps:
            raise ValueError(f"{self.path}: this SCRFD model has no 5-point landmark outputs; "
                             "alignment needs them. Use a '*_bnkps' / 'det_10g' model.")
        self.strides = STRIDES if levels == 3 else (8, 16, 32, 64, 128)
        # Fixed-size exports (e.g. 640x640 baked in) override the requested det_size.
        shape = self.session.get_inputs()[0].shape
        fixed = isinstance(shape[2], int) and isinstance(shape[3], int)
        self.det_size = (int(shape[3]), int(shape[2])) if fixed else (int(det_size), int(det_size))
        self.nms_threshold = nms_threshold

    def detect(self, image: np.ndarray, threshold: float = 0.5) -> list[DetectedFace]:
        """Faces in an HxWx3 uint8 RGB image, best score first, in image pixels."""
        h, w = image.shape[:2]
        dw, dh = self.det_size
        scale = min(dw / w, dh / h)
        nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        canvas = np.zeros((dh, dw, 3), dtype=np.uint8)
        canvas[:nh, :nw] = resize(image, (nw, nh))
        blob = ((canvas.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)[None]
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})
        boxes, points, scores = [], [], []
        for stride, (s, d, k) in zip(self.strides, _group_outputs(outs)):
            d, k = d.reshape(-1, 4) * stride, k.reshape(-1, 5, 2) * stride
            fh, fw = -(-dh // stride), -(-dw // stride)
            ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
            centers = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, NUM_ANCHORS, 0)
            if len(centers) != len(s):
                raise RuntimeError(f"{self.path}: stride {stride} gave {len(s)} scores, expected "
                                   f"{len(centers)} for det_size {dw}x{dh}")
            keep = s >= threshold
            c = centers[keep].astype(np.float32)
            boxes.append(np.concatenate([c - d[keep, :2], c + d[keep, 2:]], 1))
            points.append(c[:, None] + k[keep])
            scores.append(s[keep])
        boxes, points, scores = (np.concatenate(x) for x in (boxes, points, scores))
        if not len(scores):
            return []
        boxes, points = boxes / scale, points / scale
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        return [DetectedFace(boxes[i].astype(np.float32), float(scores[i]), points[i].astype(np.float32))
                for i in nms(boxes, scores, self.nms_threshold)]
