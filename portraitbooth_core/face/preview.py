"""Preview drawing: detection boxes and landmarks, in numpy (no cv2 needed)."""
from __future__ import annotations

import numpy as np

from .types import DetectedFace

PICKED = (40, 220, 40)  # green: the face used for the identity
OTHER = (230, 60, 40)  # red: faces found but not used
LANDMARK_COLORS = ((255, 60, 60), (255, 255, 0), (255, 0, 255), (0, 255, 0), (60, 120, 255))


def _rect(img: np.ndarray, box, color, t: int) -> None:
    h, w = img.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = np.clip([x1, x2], 0, w - 1)
    y1, y2 = np.clip([y1, y2], 0, h - 1)
    img[y1:y1 + t, x1:x2 + 1] = color
    img[max(y2 - t + 1, 0):y2 + 1, x1:x2 + 1] = color
    img[y1:y2 + 1, x1:x1 + t] = color
    img[y1:y2 + 1, max(x2 - t + 1, 0):x2 + 1] = color


def _dot(img: np.ndarray, x: float, y: float, r: int, color) -> None:
    h, w = img.shape[:2]
    cx, cy = int(round(x)), int(round(y))
    y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
    if y1 <= y0 or x1 <= x0:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1]
    img[y0:y1, x0:x1][(ys - cy) ** 2 + (xs - cx) ** 2 <= r * r] = color


def draw_faces(image: np.ndarray, faces: list[DetectedFace], picked: int | None) -> np.ndarray:
    """Copy of an HxWx3 uint8 image with every face boxed (picked one green) and its 5 points."""
    out = image.copy()
    scale = max(image.shape[:2]) / 512.0
    for i, face in enumerate(faces):
        t = max(1, int(round(2 * scale)))
        _rect(out, face.box, PICKED if i == picked else OTHER, t)
        r = max(1, int(round(max(face.width, 8.0) / 40)))
        for (x, y), color in zip(face.landmarks, LANDMARK_COLORS):
            _dot(out, x, y, r, color)
    return out
