"""FastComposer's subject embedding: a CLIP ViT-L/14 image embedding of a reference photo.

FastComposer (mit-han-lab/fastcomposer) does not use a face recognizer. At inference it
reads the reference photo as uint8, pads it to a square with black (half the difference
on each side), resizes it to 224x224 (bilinear, antialiased; the uint8 tensor stays uint8,
so values are rounded), divides by 255, applies CLIP's mean/std and takes the vision
model's pooled output through the visual projection (768-d for ViT-L/14), unnormalized.

ComfyUI's own CLIP vision preprocessing resizes the short side and centre-crops (bicubic),
which would cut the subject off a portrait photo; so the pixels are prepared here and
handed to the model at exactly 224 px, where ComfyUI only normalizes.

ComfyUI-free: the encoder is anything with ComfyUI's `encode_image(pixels, crop=...)`
returning a mapping with "image_embeds".
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import IdentityError
from .types import Identity

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FASTCOMPOSER_SIZE = 224
# Projection width -> which OpenAI/LAION CLIP vision tower gives it. The kind goes into the
# Identity and the weight file, so a FastComposer projector fed a face-recognizer
# embedding (or the reverse) is refused by portraitbooth_core.weights.meta.check_embedding.
CLIP_VISION_KINDS = {768: "clip_vision:vit-l-14", 1024: "clip_vision:vit-h-14", 1280: "clip_vision:vit-bigg-14"}
CLIP_VISION_KIND = CLIP_VISION_KINDS[768]
CLIP_VISION_DESCRIPTION = "CLIP ViT-L/14 image embedding (visual projection of the pooled output, 768-d)"
CROP_MODES = ("full photo", "person around face")


def clip_vision_kind(dim: int) -> str:
    return CLIP_VISION_KINDS.get(int(dim), f"clip_vision:{int(dim)}d")


def _as_bchw_uint8_levels(images: torch.Tensor | np.ndarray | Sequence) -> list[torch.Tensor]:
    """ComfyUI IMAGE [B,H,W,C] float 0..1, or uint8 HWC arrays -> list of [3,H,W] float
    tensors holding integer levels 0..255 (what reading the photo as uint8 gives)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
        items = [t] if t.ndim == 3 else list(t)
    else:
        items = [torch.as_tensor(np.asarray(i)) for i in images]
    out = []
    for i, t in enumerate(items):
        if t.ndim != 3 or t.shape[-1] not in (1, 3, 4):
            raise IdentityError(f"reference image {i} has shape {tuple(t.shape)}; expected H x W x 3 (RGB)")
        t = t[..., :3] if t.shape[-1] >= 3 else t.expand(*t.shape[:2], 3)
        if t.dtype == torch.uint8:
            levels = t.float()
        else:
            levels = (t.float().clamp(0, 1) * 255).round()
        out.append(levels.permute(2, 0, 1).contiguous())
    if not out:
        raise IdentityError("no reference image given")
    return out


def pad_to_square(image: torch.Tensor) -> torch.Tensor:
    """[C,H,W] -> padded with zeros by (long - short) // 2 on both sides of the short axis,
    as FastComposer's PadToSquare (an odd difference leaves it one pixel short of square;
    the resize to 224x224 absorbs that)."""
    _, h, w = image.shape
    if h > w:
        p = (h - w) // 2
        return F.pad(image, (p, p, 0, 0))
    if w > h:
        p = (w - h) // 2
        return F.pad(image, (0, 0, p, p))
    return image


def person_crop_box(face_box: Sequence[float], width: int, height: int, scale: float = 3.0) -> tuple[int, int, int, int]:
    """A head-and-shoulders box (x1, y1, x2, y2) around a detected face, clipped to the image.

    FastComposer trained on person crops; its demo feeds whole photos. This box is
    `scale` face widths wide, from half a face height above the face to (scale - 1) face
    heights below it, centred on the face horizontally."""
    x1, y1, x2, y2 = (float(v) for v in face_box[:4])
    fw, fh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    cx = (x1 + x2) / 2
    box = (cx - scale * fw / 2, y1 - 0.5 * fh, cx + scale * fw / 2, y2 + (scale - 1.0) * fh)
    bx1, by1 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    bx2, by2 = min(int(width), int(round(box[2]))), min(int(height), int(round(box[3])))
    if bx2 - bx1 < 2 or by2 - by1 < 2:
        raise IdentityError(f"the face box {tuple(face_box[:4])} lies outside the {width}x{height} image")
    return bx1, by1, bx2, by2


def fastcomposer_pixels(images: torch.Tensor | np.ndarray | Sequence, size: int = FASTCOMPOSER_SIZE,
                        boxes: Sequence[Sequence[int] | None] | None = None) -> torch.Tensor:
    """FastComposer's reference-image preprocessing, without the normalization.

    images: ComfyUI IMAGE [B,H,W,C] float 0..1 (or a list of HWC images, sizes may differ).
    boxes: optional (x1, y1, x2, y2) crop per image (None = whole image).
    Returns [B, size, size, 3] float in 0..1 on multiples of 1/255 (a ComfyUI IMAGE)."""
    items = _as_bchw_uint8_levels(images)
    if boxes is not None and len(boxes) != len(items):
        raise IdentityError(f"{len(boxes)} crop boxes for {len(items)} images")
    out = []
    for i, t in enumerate(items):
        if boxes is not None and boxes[i] is not None:
            x1, y1, x2, y2 = (int(v) for v in boxes[i])
            t = t[:, y1:y2, x1:x2]
        t = pad_to_square(t)
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        out.append((t.round().clamp(0, 255) / 255.0).permute(1, 2, 0))
    return torch.stack(out)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """[B,H,W,3] 0..1 -> [B,3,H,W] with CLIP's mean/std: what the vision tower reads."""
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.movedim(-1, 1) - mean) / std


def encode_clip_images(clip_vision: Any, pixels: torch.Tensor) -> torch.Tensor:
    """[B,224,224,3] prepared pixels -> [B, D] projected image embeddings (float32, CPU).

    crop=False: the pixels already are 224x224, so ComfyUI only rounds to 1/255 (a no-op
    here) and normalizes."""
    size = getattr(clip_vision, "image_size", pixels.shape[1])
    if pixels.shape[1] != size or pixels.shape[2] != size:
        raise IdentityError(f"prepared pixels are {pixels.shape[2]}x{pixels.shape[1]} but the CLIP vision model "
                            f"reads {size}x{size}")
    with torch.no_grad():  # an identity is data: it must not hold the encoder's autograd graph
        out = clip_vision.encode_image(pixels, crop=False)
    embeds = out["image_embeds"]
    if embeds is None or embeds.ndim != 2:
        raise IdentityError("the CLIP vision model returned no projected image embedding (image_embeds); "
                            "use a CLIP ViT-L/14 vision model such as the one the FastComposer import wrote")
    return embeds.float().cpu()


def clip_image_identity(clip_vision: Any, images: torch.Tensor | np.ndarray | Sequence,
                        names: Sequence[str] | None = None,
                        boxes: Sequence[Sequence[int] | None] | None = None,
                        crop_mode: str = "full photo") -> Identity:
    """An Identity holding FastComposer's subject embedding of one or more photos.

    Unlike face-recognizer identities the vectors are NOT L2-normalized: FastComposer's
    projector was trained on the raw projected embedding (norm ~ 20-30 for ViT-L/14), and
    normalizing would shrink its input. Several photos give their mean.
    """
    pixels = fastcomposer_pixels(images, boxes=boxes)
    embeds = encode_clip_images(clip_vision, pixels)
    names = list(names) if names is not None else [f"image {i}" for i in range(embeds.shape[0])]
    kind = clip_vision_kind(embeds.shape[-1])
    meta = {"sources": names, "warnings": [], "normalized": False, "crop": crop_mode,
            "preprocess": "fastcomposer: pad to square (black), resize 224 bilinear antialias, CLIP mean/std",
            "embedding": CLIP_VISION_DESCRIPTION if kind == CLIP_VISION_KIND else f"{kind} image embedding"}
    # aligned stays None: it holds 112 px ArcFace crops elsewhere, not CLIP's input.
    return Identity(embeddings=embeds, vector=embeds.mean(0), kind=kind, metadata=meta, normalized=False)


def is_clip_kind(kind: str) -> bool:
    return kind.split(":", 1)[0] == "clip_vision"


__all__ = ["CLIP_MEAN", "CLIP_STD", "CLIP_VISION_DESCRIPTION", "CLIP_VISION_KIND", "CROP_MODES",
           "FASTCOMPOSER_SIZE", "clip_image_identity", "clip_vision_kind", "encode_clip_images",
           "fastcomposer_pixels", "is_clip_kind", "normalize_pixels", "pad_to_square", "person_crop_box"]
