"""Plain data types of the face pipeline, shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

# Landmark order everywhere (insightface's): left eye, right eye, nose tip, left mouth
# corner, right mouth corner, "left" meaning the side with the smaller x in the image.
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

# The detection confidence every node, command line and function defaults to: insightface's
# FaceAnalysis default, which IPAdapter FaceID, InstantID and PuLID use, so that a photo yields
# the same faces (for analysis, scoring and training crops) here as in those packs.
DEFAULT_DET_THRESHOLD = 0.5


@dataclass
class DetectedFace:
    """One detection in pixel coordinates of the image it was found in."""

    box: np.ndarray  # (4,) float32 x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2) float32, LANDMARK_NAMES order
    rank: int = 0  # position in the detector's own order (best score first; ties as the detector left them)
    gender: int | None = None  # from a pack's gender/age model: 0 female, 1 male (insightface's code)
    age: int | None = None  # years, from the same model

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
        return replace(self, box=self.box * factor, landmarks=self.landmarks * factor)


# How the face of a photo with several faces was chosen: the conventions of the packs
# identity models are trained with. "largest" is InstantID's and PuLID's, "highest score"
# IPAdapter FaceID's (insightface's first face), "left to right" picks by position.
FACE_ORDERS = ("largest", "highest score", "left to right")
# Whether identity vectors are L2-normalised (IPAdapter FaceID's `normed_embedding`, this
# pack's default) or the recognizer's raw output (InstantID's and PuLID's `embedding`).
EMBEDDING_FORMS = ("normalised", "raw")


def gender_word(gender: int | None) -> str | None:
    """insightface's gender code as a word: 0 -> 'female', 1 -> 'male'."""
    return None if gender is None else ("male" if int(gender) == 1 else "female")


@dataclass
class Identity:
    """A person's identity: embeddings of one or more reference faces.

    `vector` is what conditioning uses (see identity.COMBINE_MODES for how `embeddings`
    become it); `kind` names the recognizer so that embeddings of different models are
    never mixed; `normalized` and `face_order` record the conventions it was made with, so
    that a model trained on other conventions refuses it (weights.meta.check_embedding).
    """

    embeddings: torch.Tensor  # [N, dim] float32, one row per photo (L2-normalized when `normalized`)
    vector: torch.Tensor  # [dim] float32 (L2-normalized when `normalized`)
    kind: str  # e.g. "arcface:antelopev2/glintr100.onnx" or "dlib:resnet128"
    metadata: dict[str, Any] = field(default_factory=dict)
    aligned: torch.Tensor | None = None  # [N, 112, 112, 3] uint8 crops, when available
    normalized: bool = True  # False: raw recognizer output (EMBEDDING_FORMS "raw") or raw CLIP embeddings
    face_order: str = ""  # one of FACE_ORDERS, "" when unknown (a mix, an old file)
    gender: str | None = None  # "female" / "male" from a pack's gender/age model (majority of the photos)
    age: float | None = None  # mean estimated age in years, same model
    # PhotoMaker: the CLIP vision tower's last_hidden_state per photo [N, T, C], row k paired
    # with embeddings[k] (the photo's face embedding for v2, its pooled CLIP output for v1).
    clip_hidden: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Identities made before `normalized` was a field said so in their metadata.
        if (self.metadata or {}).get("normalized") is False:
            self.normalized = False

    @property
    def embedding_form(self) -> str:
        return EMBEDDING_FORMS[0] if self.normalized else EMBEDDING_FORMS[1]

    @property
    def dim(self) -> int:
        return int(self.vector.shape[-1])

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])
