"""ArcFace recognizer of an insightface pack, run by onnxruntime."""
from __future__ import annotations

import os

import numpy as np

from .align import align_face
from .runtime import make_session
from .types import DetectedFace


def input_normalization(model_path: str | os.PathLike) -> tuple[float, float]:
    """(mean, std) the recognizer expects on 0..255 RGB input.

    Current insightface recognizers (glintr100, w600k_r50) want (x - 127.5) / 127.5;
    older MXNet conversions normalize inside the graph (a Sub and a Mul among the first
    nodes) and want raw pixels. We check like insightface does, when `onnx` is installed.
    """
    try:
        import onnx
    except ImportError:
        return 127.5, 127.5
    graph = onnx.load(os.fspath(model_path), load_external_data=False).graph
    heads = [n.name or n.op_type for n in graph.node[:8]]
    has_sub = any(h.startswith(("Sub", "_minus")) for h in heads)
    has_mul = any(h.startswith(("Mul", "_mul")) for h in heads)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class ArcFaceRecognizer:
    """Embeds aligned 112x112 RGB uint8 crops into ArcFace vectors (raw, not normalized)."""

    same_person_cosine = 0.3  # cosine above which two ArcFace embeddings are usually one person

    def __init__(self, model_path: str | os.PathLike, provider: str = "auto", session=None, pack: str = ""):
        self.path = os.fspath(model_path)
        self.session = session if session is not None else make_session(self.path, provider)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_size = int(inp.shape[2]) if isinstance(inp.shape[2], int) else 112
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.mean, self.std = input_normalization(self.path)
        self.kind = f"arcface:{pack + '/' if pack else ''}{os.path.basename(self.path)}"
        self.name = self.kind

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """crops [N, S, S, 3] uint8 RGB aligned with the ArcFace template -> [N, dim] float32."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        blob = ((crops.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        if self.fixed_batch == 1:
            outs = [self.session.run(None, {self.input_name: blob[i:i + 1]})[0] for i in range(len(blob))]
            return np.concatenate(outs).astype(np.float32)
        return self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})[0].astype(np.float32)

    def embed_faces(self, image: np.ndarray, faces: list[DetectedFace]) -> np.ndarray:
        """Align each face of an HxWx3 uint8 RGB image and embed it: [N, dim] float32."""
        if not faces:
            return np.zeros((0, self.dim), np.float32)
        return self.embed(np.stack([align_face(image, f.landmarks, self.input_size) for f in faces]))
