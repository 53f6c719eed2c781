"""Identity score of generated images, the way FastComposer and PortraitBooth measure it.

Per subject: cosine of recognizer embeddings between the reference identity and a face
detected in the generated image, clipped at 0 (max(cos, 0)); 0 when no face is found.

- One subject: the face used is the *largest* detected face. FastComposer takes "the
  first face" MTCNN returns, and facenet-pytorch's MTCNN returns the largest by default
  (select_largest=True); our detectors list faces left to right, so "first" in list
  order would mean "leftmost", which is arbitrary. Largest also matches what Analyze
  Faces picks by default.
- Several subjects: every detected face is embedded; faces are assigned to subjects
  greedily, highest (subject, face) similarity first, each face and each subject used
  at most once. Subjects left without a face score 0. The image's score is the mean
  over its subjects.

Works with any encoder exposing FaceEncoder's `detect(image, threshold)` and a
`recognizer.embed_faces(image, faces)` / `.kind` (ArcFace packs, dlib, stand-ins).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..face.errors import IdentityError
from ..face.images import to_uint8_rgb
from ..face.types import DEFAULT_DET_THRESHOLD, DetectedFace, Identity

Reference = Identity | np.ndarray | torch.Tensor


@dataclass
class SubjectScore:
    subject: int  # index in the references list
    score: float  # max(cosine, 0), 0 without a matched face
    cosine: float | None  # raw cosine, None when no face was matched
    face: int | None  # index (left to right) of the matched face


@dataclass
class ImageScore:
    index: int
    faces: int  # how many faces were detected
    subjects: list[SubjectScore] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)

    @property
    def score(self) -> float:
        """Mean over subjects (one subject: that subject's score)."""
        return float(np.mean([s.score for s in self.subjects])) if self.subjects else 0.0

    @property
    def face_found(self) -> bool:
        return any(s.face is not None for s in self.subjects)

    def to_dict(self) -> dict:
        return {"index": self.index, "score": self.score, "faces": self.faces, "face_found": self.face_found,
                "subjects": [asdict(s) for s in self.subjects], "boxes": self.boxes}


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def reference_matrix(references: Sequence[Reference], kind: str | None = None) -> np.ndarray:
    """[S, dim] unit vectors. Identities made by another recognizer than `kind` are refused:
    cosines across embedding spaces are meaningless, and would look like valid scores."""
    rows = []
    for i, ref in enumerate(references):
        if isinstance(ref, Identity):
            # PhotoMaker v2's identity pairs CLIP states with this recognizer's raw embeddings:
            # its face part scores like any identity the recognizer made.
            ref_kind = ref.metadata.get("face_kind", ref.kind) if ref.clip_hidden is not None else ref.kind
            if kind is not None and ref_kind != kind:
                raise IdentityError(
                    f"reference {i + 1} was analyzed with {ref_kind!r}, but the scoring encoder is {kind!r}. "
                    "Analyze the reference with the same FaceEncoder that scores the images.")
            ref = ref.vector
        if isinstance(ref, torch.Tensor):
            ref = ref.detach().cpu().float().numpy()
        rows.append(np.asarray(ref, np.float64).reshape(-1))
    if not rows:
        raise IdentityError("No reference identity to score against.")
    dims = {r.shape[0] for r in rows}
    if len(dims) != 1:
        raise IdentityError(f"Reference embeddings have different sizes {sorted(dims)}; use one recognizer.")
    return _unit(np.stack(rows))


def greedy_match(similarity: np.ndarray) -> list[int | None]:
    """similarity [subjects, faces] -> face index per subject (None if none left).

    Highest pair first, then the highest among the unused rows/columns, and so on: what
    FastComposer does for multi-subject images. Ties resolve to the lower index.
    """
    sim = np.array(similarity, np.float64, copy=True)
    n_subjects = sim.shape[0]
    match: list[int | None] = [None] * n_subjects
    if sim.size == 0:
        return match
    for _ in range(min(sim.shape)):
        s, f = np.unravel_index(int(np.argmax(sim)), sim.shape)
        match[s] = int(f)
        sim[s, :] = -np.inf
        sim[:, f] = -np.inf
    return match


def match_subjects(similarity: np.ndarray) -> list[SubjectScore]:
    """similarity [subjects, faces] of one image -> each subject's score, greedily matched."""
    out = []
    for s, f in enumerate(greedy_match(similarity)):
        if f is None:
            out.append(SubjectScore(s, 0.0, None, None))
        else:
            cos = float(similarity[s, f])
            out.append(SubjectScore(s, max(cos, 0.0), cos, f))
    return out


def largest_face(faces: Sequence[DetectedFace]) -> int:
    return max(range(len(faces)), key=lambda k: faces[k].area)


class IdentityScorer:
    """Scores images against one or more reference identities with a FaceEncoder."""

    def __init__(self, encoder, references: Sequence[Reference], det_threshold: float = DEFAULT_DET_THRESHOLD):
        self.encoder = encoder
        self.kind = encoder.recognizer.kind
        self.refs = reference_matrix(references, self.kind)
        self.det_threshold = det_threshold

    def score_image(self, image, index: int = 0) -> ImageScore:
        """One image (HxWx3 uint8, float 0..1 array or tensor) -> its ImageScore."""
        img = to_uint8_rgb(image)
        faces = self.encoder.detect(img, self.det_threshold)
        boxes = [[round(float(v), 1) for v in f.box] for f in faces]
        if not faces:
            return ImageScore(index, 0, [SubjectScore(s, 0.0, None, None) for s in range(len(self.refs))], boxes)
        if len(self.refs) == 1:
            # Embed only the face that counts (dlib costs ~90 ms a face).
            k = largest_face(faces)
            emb = _unit(self.encoder.recognizer.embed_faces(img, [faces[k]]))
            cos = float(self.refs[0] @ emb[0])
            return ImageScore(index, len(faces), [SubjectScore(0, max(cos, 0.0), cos, k)], boxes)
        emb = _unit(self.encoder.recognizer.embed_faces(img, faces))
        return ImageScore(index, len(faces), match_subjects(self.refs @ emb.T), boxes)

    def score_images(self, images, progress=None) -> list[ImageScore]:
        """A batch [B,H,W,C] or a list of images; `progress(i, n)` is called after each."""
        batched = isinstance(images, (list, tuple)) or images.ndim == 4
        items = list(images) if batched else [images]
        out = []
        for i, img in enumerate(items):
            out.append(self.score_image(img, i))
            if progress is not None:
                progress(i + 1, len(items))
        return out


def ranking(scores: Sequence[ImageScore]) -> list[int]:
    """Image indices best first; stable, so equal scores keep their batch order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i].score)


def format_report(scores: Sequence[ImageScore], names: Sequence[str] | None = None) -> str:
    """One line per image: score, faces found, which face matched which subject."""
    lines = []
    for s in scores:
        name = names[s.index] if names else f"image {s.index}"
        if not s.faces:
            lines.append(f"{name}: score 0.000 - no face found")
            continue
        parts = []
        for sub in s.subjects:
            if sub.face is None:
                parts.append(f"subject {sub.subject + 1}: no face left (0)")
            else:
                parts.append(f"subject {sub.subject + 1}: face {sub.face} cos {sub.cosine:.3f}")
        lines.append(f"{name}: score {s.score:.3f} - {s.faces} face{'s' if s.faces > 1 else ''} found; "
                     + "; ".join(parts))
    return "\n".join(lines)
