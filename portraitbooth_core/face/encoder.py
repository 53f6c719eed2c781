"""FaceEncoder: detector + recognizer + mask maker, and the per-batch analysis."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from .align import align_face
from .errors import FaceAnalysisError, IdentityError, NoFaceError
from .identity import COMBINE_MODES, MEAN_OF_NORMALISED, build_identity, parse_weights
from .images import comfy_to_uint8_list, detection_view
from .parsing import fallback_mask
from .preview import draw_faces
from .types import DEFAULT_DET_THRESHOLD, EMBEDDING_FORMS, FACE_ORDERS, DetectedFace, Identity, gender_word

# Which face of a photo with several is used (face order conventions, see types.FACE_ORDERS):
# the largest (InstantID, PuLID), the highest detection score (IPAdapter FaceID: insightface's
# first face), or face_index counting from the left.
SELECT_RULES = ("largest", "highest score", "index")
FACE_ORDER_OF_RULE = dict(zip(SELECT_RULES, FACE_ORDERS))
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


def _area32(face: DetectedFace) -> float:
    box = np.asarray(face.box, dtype=np.float32)
    return float(max(box[2] - box[0], np.float32(0)) * max(box[3] - box[1], np.float32(0)))


class FaceEncoder:
    """What `Load FaceEncoder` produces; `analyze` turns photos into an Identity."""

    def __init__(self, detector, recognizer, parser=None, mask_note: str = "", settings: dict | None = None,
                 attributes=None):
        self.detector, self.recognizer, self.parser = detector, recognizer, parser
        self.attributes = attributes  # a pack's gender/age model, or None
        self.mask_note = mask_note or ("face parsing (BiSeNet)" if parser else "fallback ellipse")
        self.settings = dict(settings or {})

    @property
    def kind(self) -> str:
        return self.recognizer.kind

    def describe(self) -> str:
        return (f"detector: {self.detector.name}; recognizer: {self.recognizer.name}; "
                f"masks: {self.mask_note}" + (f"; {self.attributes.name}" if self.attributes else ""))

    @property
    def default_threshold(self) -> float:
        """The detector's own default confidence (DEFAULT_DET_THRESHOLD unless it says otherwise)."""
        return float(getattr(self.detector, "default_threshold", DEFAULT_DET_THRESHOLD))

    @property
    def truncates_pixels(self) -> bool:
        return self.settings.get("pixels") == "truncate"

    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[DetectedFace]:
        """Faces in an HxWx3 uint8 image, left to right, in its own pixel coordinates, with
        gender and age when the pack has a gender/age model."""
        threshold = self.default_threshold if threshold is None else threshold
        if getattr(self.detector, "sizes_itself", False):
            faces = self.detector.detect(image, threshold)  # the pack's SCRFD sees the photo as insightface does
        else:
            view, factor = detection_view(image)
            faces = [f.scaled(factor) for f in self.detector.detect(view, threshold)]
        if self.attributes is not None:
            faces = [replace(f, gender=g, age=a) for f, (g, a) in zip(faces, self.attributes.estimate(image, faces))]
        return sorted(faces, key=lambda f: f.center_x)

    def align(self, image: np.ndarray, face: DetectedFace) -> np.ndarray:
        """The aligned crop the recognizer embeds (insightface's norm_crop for a pack's ArcFace)."""
        align = getattr(self.recognizer, "align", None)
        return align(image, face.landmarks) if align is not None else align_face(image, face.landmarks, 112)

    def analyze(self, images, select: str = "largest", face_index: int = 0, on_no_face: str = "error",
                det_threshold: float | None = None, names: list[str] | None = None,
                outlier_threshold: float | None = None, combine: str = MEAN_OF_NORMALISED,
                weights: str | Sequence[float] | None = None, embedding: str = "normalised") -> Analysis:
        """Detect, pick one face per image by rule, embed, mask; combine into one Identity.

        combine: one of COMBINE_MODES; weights: one per image (text or list), checked before
        any detection; the weights of images skipped for want of a face are dropped.
        det_threshold None: the detector's default. embedding: one of EMBEDDING_FORMS,
        recorded on the identity with the face order that `select` stands for."""
        if embedding not in EMBEDDING_FORMS:
            raise ValueError(f"embedding must be one of {EMBEDDING_FORMS}, got {embedding!r}")
        det_threshold = self.default_threshold if det_threshold is None else float(det_threshold)
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        if select not in SELECT_RULES:
            raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
        if on_no_face not in NO_FACE_ACTIONS:
            raise ValueError(f"on_no_face must be one of {NO_FACE_ACTIONS}, got {on_no_face!r}")
        arrays = comfy_to_uint8_list(images, truncate=self.truncates_pixels)
        n = len(arrays)
        shares = parse_weights(weights, n)
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
            if face.gender is not None:
                note += f", {gender_word(face.gender)}, age {face.age}"
            size = getattr(self.detector, "last_size", None)
            if size is not None and tuple(size) != tuple(getattr(self.detector, "det_size", size)):
                note += f" (found on a retry at det_size {size[0]})"
            results.append(ImageResult(i, faces, pick, emb, mask, note))
            previews.append(draw_faces(img, faces, pick))
            embeddings.append(emb)
            crops.append(self.align(img, face))
            used.append(names[i])
        if not embeddings:
            raise NoFaceError(f"No face found in any of the {n} image(s); nothing to build an identity from. "
                              f"Use photos with a clearly visible face or lower det_threshold "
                              f"(now {det_threshold:.2f}).", 0)
        threshold = outlier_threshold if outlier_threshold is not None else self.recognizer.same_person_cosine
        kept = None if shares is None else [shares[r.index] for r in results if r.picked is not None]
        if kept is not None and not any(w > 0 for w in kept):
            raise IdentityError(f"weights: every photo with a face has weight 0 (photos without a face were "
                                f"skipped); give at least one of {', '.join(used)} a weight above 0.")
        identity = build_identity(np.stack(embeddings), self.kind, used, threshold,
                                  aligned=torch.from_numpy(np.stack(crops)),
                                  metadata={"encoder": self.settings, "warnings": list(warnings)},
                                  combine=combine, weights=kept, normalized=embedding == EMBEDDING_FORMS[0])
        picked = [r.faces[r.picked] for r in results if r.picked is not None]
        identity.face_order = FACE_ORDER_OF_RULE[select]
        if all(f.gender is not None for f in picked):
            identity.gender = gender_word(Counter(int(f.gender) for f in picked).most_common(1)[0][0])
            identity.age = float(np.mean([f.age for f in picked]))
        lines = [f"FaceEncoder: {self.describe()}"] + [r.note for r in results]
        how = (f"mean of {len(embeddings)} raw (unnormalized)" if not identity.normalized
               else f"mean of {len(embeddings)} normalized" if combine == MEAN_OF_NORMALISED
               else f"normalized mean of {len(embeddings)} raw")
        lines.append(f"identity: {how} {identity.dim}-d embedding(s) ({self.kind}) from {len(embeddings)} of "
                     f"{n} image(s)" + ("" if kept is None else
                                        f", weighted {', '.join(f'{w:g}' for w in kept)}"))
        if identity.gender is not None:
            lines.append(f"gender/age model: {identity.gender}, age {identity.age:.0f}")
        lines += [f"WARNING: {m}" for m in identity.metadata["warnings"]]
        return Analysis(results, identity, previews, "\n".join(lines), identity.metadata["warnings"])

    @staticmethod
    def _pick(faces: list[DetectedFace], select: str, face_index: int, name: str) -> tuple[int, str]:
        many = len(faces) > 1
        if select == "largest":
            # The area as InstantID and PuLID compute it (float32 box sides), ties to the face
            # insightface lists last, as their sorted(...)[-1] does.
            pick = max(range(len(faces)), key=lambda k: (_area32(faces[k]), faces[k].rank))
            return pick, (f"the largest face (rule 'largest'; it is index {pick} counting from the left)"
                          if many else "the only face")
        if select == "highest score":
            # Ties keep the detector's order: the face insightface's FaceAnalysis lists first.
            pick = min(range(len(faces)), key=lambda k: (-faces[k].score, faces[k].rank))
            return pick, (f"the face with the highest detection score (rule 'highest score'; it is index {pick} "
                          "counting from the left)" if many else "the only face")
        if not 0 <= face_index < len(faces):
            raise FaceAnalysisError(
                f"{name} has {len(faces)} face(s) (indices 0..{len(faces) - 1} from the left), but face_index "
                f"is {face_index}. Lower face_index or use select=largest.")
        return face_index, f"face index {face_index} counting from the left (rule 'index')"
