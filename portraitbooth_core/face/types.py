"""Plain data types of the face pipeline, shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Landmark order everywhere (insightface's): left eye, right eye, nose tip, left mouth
# corner, right mouth corner, "left" meaning the side with the smaller x in the image.
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass
class DetectedFace:
    """One detection in pixel coordinates of the image it was found in."""

    box: np.ndarray  # (4,) float32 x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2) float32, LANDMARK_NAMES order

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center_x(self) -> float:
        return float(self.box[0] + self.box[2]) / 2

    def scaled(self, factor: float) -> "DetectedFace":
        """The same face in an image resized by 1/factor (coordinates times factor)."""
        return DetectedFace(self.box * factor, self.score, self.landmarks * factor)


@dataclass
class Identity:
    """A person's identity: normalized embeddings of one or more reference faces.

    `vector` is what conditioning uses (the re-normalized mean of `embeddings`); `kind`
    names the recognizer so that embeddings of different models are never mixed.
    """

    embeddings: torch.Tensor  # [N, dim] float32, each row L2-normalized
    vector: torch.Tensor  # [dim] float32, L2-normalized
    kind: str  # e.g. "arcface:antelopev2/glintr100.onnx" or "dlib:resnet128"
    metadata: dict[str, Any] = field(default_factory=dict)
    aligned: torch.Tensor | None = None  # [N, 112, 112, 3] uint8 crops, when available

    @property
    def dim(self) -> int:
        return int(self.vector.shape[-1])

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])
