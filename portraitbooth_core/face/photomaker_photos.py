"""PhotoMaker's identity inputs: per photo, the CLIP ViT-L/14 tower's hidden states (v1, v2)
and, for v2, insightface's raw ArcFace embedding of the same photo.

PhotoMaker prepares the photo with CLIPImageProcessor's defaults: the whole photo, short
side resized to 224 (bicubic), centre crop, CLIP mean/std. ComfyUI's own CLIP vision
preprocessing (`encode_image(crop=True)`) is that recipe, so it is used as is. v1 reads the
tower's pooled output (its head applies the tower's final LayerNorm to the class token, so
the hidden states are what the identity carries); v2 reads all 257 hidden states plus the
embedding insightface's FaceAnalysis gives for its first face (the highest detection
score) on the photo in BGR order, `embedding` rather than `normed_embedding`. A v2 photo
without a face is dropped from both stacks, so row k of each belongs to the same photo.

ComfyUI-free: `clip_vision` is anything with ComfyUI's `encode_image(pixels, crop=True)`
returning a mapping with "last_hidden_state"; `face_encoder` is this pack's FaceEncoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import IdentityError
from .types import Identity

PHOTOMAKER_V1_KIND = "clip_vision:vit-l-14"
PHOTOMAKER_V2_FAMILY = "clip_vision+arcface"
PHOTOMAKER_V2_PACK = "buffalo_l"  # the insightface pack PhotoMaker v2 was trained with
PHOTOMAKER_V2_KIND = f"{PHOTOMAKER_V2_FAMILY}:vit-l-14+{PHOTOMAKER_V2_PACK}"
PHOTOMAKER_SELECT = "highest score"  # insightface's faces[0], as PhotoMaker's demo takes it
PREPROCESS = "photomaker: whole photo, short side 224 bicubic, centre crop, CLIP mean/std (ComfyUI's crop=True)"


@dataclass
class PhotoMakerPhotos:
    identity: Identity
    notes: list[str] = field(default_factory=list)  # one line per photo, for the node's text
    warnings: list[str] = field(default_factory=list)


def clip_hidden_states(clip_vision: Any, images: torch.Tensor) -> torch.Tensor:
    """[N, T, C] last hidden states (float32, CPU) of a ComfyUI IMAGE batch."""
    with torch.no_grad():  # an identity is data: no autograd graph of the tower in it
        out = clip_vision.encode_image(images, crop=True)
    # ComfyUI's Output is attribute-based and supports [] but not `in`
    hidden = out.get("last_hidden_state") if isinstance(out, dict) else getattr(out, "last_hidden_state", None)
    if hidden is None or hidden.ndim != 3:
        raise IdentityError("the CLIP vision model returned no last_hidden_state; load the CLIP vision file the "
                            "PhotoMaker import wrote (photomaker-v*_clip_vit_l14.safetensors) with Load CLIP Vision")
    return hidden.float().cpu()


def _pack_of(kind: str) -> str:
    """'arcface:buffalo_l/w600k_r50.onnx' -> 'buffalo_l'."""
    rest = kind.split(":", 1)[1] if ":" in kind else kind
    return rest.split("/", 1)[0] or rest


def photomaker_identity(clip_vision: Any, images: torch.Tensor, version: str, face_encoder: Any = None,
                        det_threshold: float | None = None, names: Sequence[str] | None = None) -> PhotoMakerPhotos:
    """The identity a PhotoMaker `version` ("v1" or "v2") head reads, from N photos of one person."""
    n = int(images.shape[0])
    names = list(names) if names is not None else [f"image {i + 1} of {n} (index {i})" for i in range(n)]
    hidden = clip_hidden_states(clip_vision, images)
    if hidden.shape[0] != n:
        raise IdentityError(f"the CLIP vision model gave {hidden.shape[0]} outputs for {n} photos")
    meta = {"sources": names, "warnings": [], "normalized": False, "preprocess": PREPROCESS,
            "photomaker": version}
    if version == "v1":
        # The class token before the tower's final LayerNorm: v1's head normalises it itself.
        cls = hidden[:, 0].contiguous()
        meta["embedding"] = "CLIP ViT-L/14 hidden states of the whole photo (PhotoMaker v1)"
        identity = Identity(embeddings=cls, vector=cls.mean(0), kind=PHOTOMAKER_V1_KIND, metadata=meta,
                            normalized=False, clip_hidden=hidden)
        return PhotoMakerPhotos(identity, [f"{name}: CLIP hidden states {tuple(hidden.shape[1:])}" for name in names])
    if version != "v2":
        raise ValueError(f"PhotoMaker version must be 'v1' or 'v2', got {version!r}")
    if face_encoder is None:
        raise IdentityError("PhotoMaker v2 needs each photo's face embedding: connect Load FaceEncoder "
                            f"(PortraitBooth) with the insightface pack '{PHOTOMAKER_V2_PACK}' to face_encoder.")
    kind = str(face_encoder.kind)
    if kind.split(":", 1)[0] != "arcface":
        raise IdentityError(f"PhotoMaker v2 was trained on insightface ArcFace embeddings ('{PHOTOMAKER_V2_PACK}'), "
                            f"but the face encoder's recognizer is '{kind}'. In Load FaceEncoder choose the "
                            f"insightface pack '{PHOTOMAKER_V2_PACK}'.")
    analysis = face_encoder.analyze(images, select=PHOTOMAKER_SELECT, on_no_face="skip", det_threshold=det_threshold,
                                    names=names, embedding="raw")
    kept = [r.index for r in analysis.results if r.picked is not None]
    warnings = list(analysis.warnings)
    for r in analysis.results:
        if r.picked is None:
            warnings.append(f"{names[r.index]}: no face found - dropped from the PhotoMaker v2 identity (its CLIP "
                            f"part too); {len(kept)} of {n} photos used")
    pack = _pack_of(kind)
    if pack != PHOTOMAKER_V2_PACK:
        warnings.append(f"face embeddings from '{kind}'; PhotoMaker v2 was trained on '{PHOTOMAKER_V2_PACK}' - "
                        f"the identity may transfer less well")
    identity = analysis.identity
    identity.kind = f"{PHOTOMAKER_V2_FAMILY}:vit-l-14+{pack}"
    identity.clip_hidden = hidden[torch.as_tensor(kept, dtype=torch.long)]
    identity.metadata = {**identity.metadata, **meta, "sources": [names[i] for i in kept],
                         "face_kind": kind, "warnings": warnings,
                         "embedding": f"{kind} raw embedding (BGR) + CLIP ViT-L/14 hidden states (PhotoMaker v2)"}
    return PhotoMakerPhotos(identity, analysis.report.splitlines(), warnings)


__all__ = ["PHOTOMAKER_SELECT", "PHOTOMAKER_V1_KIND", "PHOTOMAKER_V2_FAMILY", "PHOTOMAKER_V2_KIND",
           "PHOTOMAKER_V2_PACK", "PhotoMakerPhotos", "clip_hidden_states", "photomaker_identity"]
