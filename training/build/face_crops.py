"""One photo -> what a training sample keeps of it: the square target crop at the training
resolution with the face's box, landmarks and mask in that crop's pixels, plus the face's
embedding and aligned 112x112 crop (for use as another sample's reference).

Face analysis is the core's FaceEncoder (detector, recognizer, parser or fallback mask);
nothing here detects or embeds on its own. Detection runs per photo (photos differ in
size); recognition is batched: `analyze_face` keeps the aligned face and `embed_pending`
embeds the faces of many photos in one recognizer call where the recognizer takes a
batch of aligned crops (`embed`, e.g. ArcFace ONNX), one photo at a time otherwise (dlib).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from portraitbooth_core.face.align import align_face
from portraitbooth_core.face.images import resize
from portraitbooth_core.face.parsing import fallback_mask
from portraitbooth_core.face.types import DEFAULT_DET_THRESHOLD, DetectedFace

from .person import SkipError


@dataclass
class CropSettings:
    resolution: int = 512
    crop_scale: float = 3.0       # crop side / face side, capped by the image's short side
    det_threshold: float = DEFAULT_DET_THRESHOLD  # as Analyze Faces: the same faces as at inference
    min_face: int = 32            # px in the source photo; smaller faces carry no identity
    several_faces: str = "skip"   # or "largest": keep the largest face of a group photo


@dataclass
class FaceCrop:
    image: np.ndarray       # R x R x 3 uint8 target
    mask: np.ndarray        # R x R uint8 0..255
    box: np.ndarray         # (4,) in target pixels
    landmarks: np.ndarray   # (5, 2) in target pixels
    embedding: np.ndarray | None  # (D,) float32, the recognizer's normalized embedding (None until embedded)
    aligned: np.ndarray     # 112 x 112 x 3 uint8, ArcFace-aligned face
    note: str = ""
    recognizer_input: np.ndarray | None = None  # aligned at the recognizer's size, until embedded
    # the face pack's gender/age estimate when the detection carries one (insightface genderage:
    # gender 1 male / 0 female); picks the class word of a generated caption that names nobody
    gender: str | int | None = None
    age: float | None = None


EMBED_BATCH = 64  # faces per recognizer call: fills a GPU, bounds memory for long videos


def pick_face(encoder, image: np.ndarray, settings: CropSettings) -> DetectedFace:
    faces = encoder.detect(image, settings.det_threshold)
    if not faces:
        raise SkipError(f"no face found (det_threshold {settings.det_threshold})")
    if len(faces) > 1 and settings.several_faces == "skip":
        raise SkipError(f"several faces ({len(faces)}); the identity would be ambiguous")
    face = max(faces, key=lambda f: f.area)
    if min(face.width, face.height) < settings.min_face:
        raise SkipError(f"face too small ({min(face.width, face.height):.0f} px < {settings.min_face} px)")
    return face


def square_window(shape_hw: tuple[int, int], face: DetectedFace, scale: float) -> tuple[int, int, int]:
    """(x0, y0, side): a square around the face, inside the image."""
    h, w = shape_hw
    side = int(min(h, w, max(face.width, face.height) * scale))
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    return x0, y0, side


def _batched(recognizer) -> bool:
    return callable(getattr(recognizer, "embed", None)) and isinstance(getattr(recognizer, "input_size", None), int)


def analyze_face(encoder, image: np.ndarray, settings: CropSettings) -> FaceCrop:
    """One RGB uint8 photo -> its crop, mask and aligned face; the embedding is left for
    `embed_pending` when the recognizer batches. Raises SkipError with the reason when the
    photo cannot be used."""
    face = pick_face(encoder, image, settings)
    parser = getattr(encoder, "parser", None)
    mask = parser.mask(image, face) if parser is not None else fallback_mask(image.shape[:2], face)
    x0, y0, side = square_window(image.shape[:2], face, settings.crop_scale)
    r = settings.resolution
    target = resize(np.ascontiguousarray(image[y0:y0 + side, x0:x0 + side]), (r, r))
    mask_u8 = (np.asarray(mask[y0:y0 + side, x0:x0 + side], np.float32) * 255).round().astype(np.uint8)
    mask_r = resize(np.repeat(mask_u8[:, :, None], 3, axis=2), (r, r))[:, :, 0]
    factor = r / side
    offset = np.array([x0, y0], np.float32)
    box = (face.box.reshape(2, 2) - offset).reshape(4) * factor
    landmarks = (face.landmarks - offset) * factor
    if mask_r.max() == 0:
        raise SkipError("the face mask is empty inside the training crop")
    aligned = align_face(image, face.landmarks, 112)
    recognizer = encoder.recognizer
    crop = FaceCrop(target, mask_r, box.astype(np.float32), landmarks.astype(np.float32), None, aligned,
                    gender=getattr(face, "gender", None), age=getattr(face, "age", None))
    if _batched(recognizer):
        size = recognizer.input_size
        crop.recognizer_input = aligned if size == 112 else align_face(image, face.landmarks, size)
    else:  # this recognizer needs the whole photo (its own landmarks): embed now
        crop.embedding = _normalized(recognizer.embed_faces(image, [face])[0])
    return crop


def embed_pending(encoder, crops: list[FaceCrop], batch: int = EMBED_BATCH) -> None:
    """Fill in the embeddings `analyze_face` left pending, `batch` faces per recognizer call.
    The batches depend only on `crops`, so a person's embeddings do not depend on how a
    build is split over processes or machines."""
    todo = [c for c in crops if c.embedding is None]
    for start in range(0, len(todo), batch):
        group = todo[start:start + batch]
        out = encoder.recognizer.embed(np.stack([c.recognizer_input for c in group]))
        for crop, row in zip(group, out):
            crop.embedding, crop.recognizer_input = _normalized(row), None


def _normalized(embedding) -> np.ndarray:
    embedding = np.asarray(embedding, dtype=np.float32)
    return embedding / max(float(np.linalg.norm(embedding)), 1e-12)


def face_crop(encoder, image: np.ndarray, settings: CropSettings) -> FaceCrop:
    """Analyze one RGB uint8 photo; raises SkipError with the reason when it cannot be used."""
    crop = analyze_face(encoder, image, settings)
    embed_pending(encoder, [crop])
    return crop
