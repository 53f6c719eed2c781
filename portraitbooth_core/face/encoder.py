"""FaceEncoder: detector + recognizer + mask maker, and the per-batch analysis."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .align import align_face
from .errors import FaceAnalysisError, NoFaceError
from .identity import build_identity
from .images import comfy_to_uint8_list, detection_view
from .parsing import fallback_mask
from .preview import draw_faces
from .types import DetectedFace, Identity

SELECT_RULES = ("largest", "index")
NO_FACE_ACTIONS = ("error", "skip")
TINY_FACE_PX = 48  # below this box side recognizers were barely trained: warn


@dataclass
class ImageResult:
    index: int
    faces: list[DetectedFace]  # every face found, ordered left to right
    picked: int | None  # position in `faces` of the face used, None when skipped
    embedding: np.ndarray | None
    mask: np.ndarray  # HxW float32
    note: str


@dataclass
class Analysis:
    results: list[ImageResult]
    identity: Identity | None
    previews: list[np.ndarray]
    report: str
    warnings: list[str] = field(default_factory=list)

    def masks(self) -> torch.Tensor:
        """ComfyUI MASK [B,H,W] (images of one batch share a size)."""
        return torch.from_numpy(np.stack([r.mask for r in self.results]))


class FaceEncoder:
    """What `Load FaceEncoder` produces; `analyze` turns photos into an Identity."""

    def __init__(self, detector, recognizer, parser=None, mask_note: str = "", settings: dict | None = None):
        self.detector, self.recognizer, self.parser = detector, recognizer, parser
        self.mask_note = mask_note or ("face parsing (BiSeNet)" if parser else "fallback ellipse")
        self.settings = dict(settings or {})

    @property
    def kind(self) -> str:
        return self.recognizer.kind

    def describe(self) -> str:
        return (f"detector: {self.detector.name}; recognizer: {self.recognizer.name}; "
                f"masks: {self.mask_note}")

    def detect(self, image: np.ndarray, threshold: float) -> list[DetectedFace]:
        """Faces in an HxWx3 uint8 image, left to right, in its own pixel coordinates."""
        view, factor = detection_view(image)
        faces = [f.scaled(factor) for f in self.detector.detect(view, threshold)]
        return sorted(faces, key=lambda f: f.center_x)

    def analyze(self, images, select: str = "largest", face_index: int = 0, on_no_face: str = "error",
                det_threshold: float = 0.6, names: list[str] | None = None,
                outlier_threshold: float | None = None) -> Analysis:
        """Detect, pick one face per image by rule, embed, mask; average into one Identity."""
        if select not in SELECT_RULES:
            raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
        if on_no_face not in NO_FACE_ACTIONS:
            raise ValueError(f"on_no_face must be one of {NO_FACE_ACTIONS}, got {on_no_face!r}")
        arrays = comfy_to_uint8_list(images)
        n = len(arrays)
        names = names or [f"image {i + 1} of {n} (index {i})" for i in range(n)]
        results, previews, embeddings, crops, used = [], [], [], [], []
        warnings: list[str] = []
        for i, img in enumerate(arrays):
            faces = self.detect(img, det_threshold)
            h, w = img.shape[:2]
            if not faces:
                msg = (f"No face found in {names[i]}, {w}x{h} px. Try a larger or more frontal photo, "
                       f"lower det_threshold (now {det_threshold:.2f}), or set on_no_face=skip to leave "
                       "this image out.")
                if on_no_face == "error":
                    raise NoFaceError(msg, i)
                results.append(ImageResult(i, [], None, None, np.zeros((h, w), np.float32),
                                           f"{names[i]}: no face found - skipped (on_no_face=skip)"))
                previews.append(img.copy())
                continue
            pick, rule = self._pick(faces, select, face_index, names[i])
            face = faces[pick]
            emb = self.recognizer.embed_faces(img, [face])[0]
            mask = self.parser.mask(img, face) if self.parser else fallback_mask((h, w), face)
            note = (f"{names[i]}: {len(faces)} face{'s' if len(faces) > 1 else ''} found; picked {rule}, "
                    f"box {face.width:.0f}x{face.height:.0f} px at ({face.box[0]:.0f},{face.box[1]:.0f}), "
                    f"score {face.score:.2f}")
            if min(face.width, face.height) < TINY_FACE_PX:
                tiny = (f"{names[i]}: the face is only {min(face.width, face.height):.0f} px; the identity "
                        "from so few pixels is unreliable - use a photo where the face is larger")
                warnings.append(tiny)
                note += " [tiny face]"
            results.append(ImageResult(i, faces, pick, emb, mask, note))
            previews.append(draw_faces(img, faces, pick))
            embeddings.append(emb)
            crops.append(align_face(img, face.landmarks, 112))
            used.append(names[i])
        if not embeddings:
            raise NoFaceError(f"No face found in any of the {n} image(s); nothing to build an identity from. "
                              f"Use photos with a clearly visible face or lower det_threshold "
                              f"(now {det_threshold:.2f}).", 0)
        threshold = outlier_threshold if outlier_threshold is not None else self.recognizer.same_person_cosine
        identity = build_identity(np.stack(embeddings), self.kind, used, threshold,
                                  aligned=torch.from_numpy(np.stack(crops)),
                                  metadata={"encoder": self.settings, "warnings": list(warnings)})
        lines = [f"FaceEncoder: {self.describe()}"] + [r.note for r in results]
        lines.append(f"identity: mean of {len(embeddings)} normalized {identity.dim}-d embedding(s) "
                     f"({self.kind}) from {len(embeddings)} of {n} image(s)")
        lines += [f"WARNING: {m}" for m in identity.metadata["warnings"]]
        return Analysis(results, identity, previews, "\n".join(lines), identity.metadata["warnings"])

    @staticmethod
    def _pick(faces: list[DetectedFace], select: str, face_index: int, name: str) -> tuple[int, str]:
        many = len(faces) > 1
        if select == "largest":
            pick = max(range(len(faces)), key=lambda k: faces[k].area)
            return pick, (f"the largest face (rule 'largest'; it is index {pick} counting from the left)"
                          if many else "the only face")
        if not 0 <= face_index < len(faces):
            raise FaceAnalysisError(
                f"{name} has {len(faces)} face(s) (indices 0..{len(faces) - 1} from the left), but face_index "
                f"is {face_index}. Lower face_index or use select=largest.")
        return face_index, f"face index {face_index} counting from the left (rule 'index')"
