"""ArcFace recognizer and gender/age model of an insightface pack, run by insightface.

Alignment is insightface's `norm_crop` (the similarity transform to the ArcFace template
that FaceAnalysis applies), the input normalization is insightface's rule (MXNet-converted
models normalize inside the graph and get raw pixels, the others (x - 127.5) / 127.5), and
the embedding is `get_feat` of the crop: exactly FaceAnalysis's `face.embedding`.
"""
from __future__ import annotations

import os

import numpy as np

from .types import DetectedFace


def _bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1])


class ArcFaceRecognizer:
    """Embeds faces (RGB uint8 images + 5 landmarks) into raw ArcFace vectors, as insightface does."""

    same_person_cosine = 0.3  # cosine above which two ArcFace embeddings are usually one person

    def __init__(self, model_path: str | os.PathLike, provider: str = "auto", model=None, pack: str = ""):
        from .insight import load_model
        from .runtime import resolve_providers

        self.path = os.fspath(model_path)
        self.model = model if model is not None else load_model(self.path, resolve_providers(provider))
        if getattr(self.model, "taskname", None) != "recognition":
            raise ValueError(f"{self.path} is not a face recognizer (insightface routes it as "
                             f"{getattr(self.model, 'taskname', 'unknown')!r}).")
        self.input_size = int(self.model.input_size[0])
        shape = self.model.input_shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.dim = int(self.model.output_shape[-1])
        self.mean, self.std = float(self.model.input_mean), float(self.model.input_std)
        self.kind = f"arcface:{pack + '/' if pack else ''}{os.path.basename(self.path)}"
        self.name = self.kind

    def align(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """insightface's norm_crop of an RGB image: the aligned RGB crop (S x S x 3 uint8)."""
        from .insight import insightface

        face_align = insightface().utils.face_align
        # warpAffine treats channels alike, so aligning RGB gives the BGR crop's channels reversed.
        return face_align.norm_crop(image, landmark=np.asarray(landmarks), image_size=self.input_size)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """crops [N, S, S, 3] uint8 RGB aligned with the ArcFace template -> raw [N, dim] float32."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.fixed_batch == 1 or len(crops) == 1:
            # One crop per run: what FaceAnalysis does, and all a fixed-batch export accepts.
            outs = [self.model.get_feat(_bgr(c)) for c in crops]
            return np.concatenate(outs).astype(np.float32)
        return np.asarray(self.model.get_feat([_bgr(c) for c in crops]), dtype=np.float32)

    def embed_faces(self, image: np.ndarray, faces: list[DetectedFace]) -> np.ndarray:
        """Align each face of an HxWx3 uint8 RGB image and embed it: raw [N, dim] float32."""
        if not faces:
            return np.zeros((0, self.dim), np.float32)
        return self.embed(np.stack([self.align(image, f.landmarks) for f in faces]))


class GenderAgeModel:
    """A pack's genderage.onnx through insightface: gender (0 female, 1 male) and age in years."""

    def __init__(self, model_path: str | os.PathLike, model=None, provider: str = "auto"):
        from .insight import load_model
        from .runtime import resolve_providers

        self.path = os.fspath(model_path)
        self.model = model if model is not None else load_model(self.path, resolve_providers(provider))
        if getattr(self.model, "taskname", None) != "genderage":
            raise ValueError(f"{self.path} is not a gender/age model (insightface routes it as "
                             f"{getattr(self.model, 'taskname', 'unknown')!r}).")
        self.name = f"gender/age ({os.path.basename(self.path)})"

    def estimate(self, image: np.ndarray, faces: list[DetectedFace]) -> list[tuple[int, int]]:
        """(gender, age) of each face of an HxWx3 uint8 RGB image; reads the boxes, as insightface does."""
        from .insight import insightface

        face_record = insightface().app.common.Face
        bgr = _bgr(image)
        out = []
        for face in faces:
            record = face_record(bbox=np.asarray(face.box), kps=np.asarray(face.landmarks), det_score=face.score)
            gender, age = self.model.get(bgr, record)
            out.append((int(gender), int(age)))
        return out


def input_normalization(model_path: str | os.PathLike) -> tuple[float, float]:
    """(mean, std) insightface applies to this recognizer's 0..255 RGB input.

    Asked of insightface itself (its rule: MXNet-converted models normalize inside the graph
    and get raw pixels, others (x - 127.5) / 127.5), so the differentiable torch copy for
    training sees exactly what the onnxruntime recognizer sees."""
    from .insight import cpu, load_model

    model = load_model(model_path, cpu())
    return float(model.input_mean), float(model.input_std)
