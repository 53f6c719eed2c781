"""Identities from several photos, and weighted mixes of two identities."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from .errors import IdentityError
from .types import Identity

log = logging.getLogger("portraitbooth.face")


def outliers(embeddings: torch.Tensor, threshold: float) -> list[tuple[int, float, int]]:
    """(index, mean similarity to the others, how many others it matches) for each image
    that matches (cosine >= threshold) fewer than half of the other images.

    Pairwise, not against the mean of the others: a mean of several faces resembles
    everybody a little, which hid a stranger among three photos in our tests.
    """
    e = F.normalize(embeddings.float(), dim=-1)
    n = e.shape[0]
    if n < 2:
        return []
    sims = e @ e.T
    found = []
    for i in range(n):
        others = torch.cat([sims[i, :i], sims[i, i + 1:]])
        matches = int((others >= threshold).sum())
        if matches * 2 < n - 1:
            found.append((i, float(others.mean()), matches))
    return found


def build_identity(embeddings: np.ndarray | torch.Tensor, kind: str, names: list[str] | None = None,
                   threshold: float = 0.3, aligned: torch.Tensor | None = None,
                   metadata: dict | None = None) -> Identity:
    """Mean of L2-normalized embeddings (PhotoMaker-style averaging), re-normalized.

    Warns (log + metadata["warnings"]) about each image that resembles fewer than half of
    the others at `threshold` (the recognizer's same-person cosine): it may be someone else.
    """
    e = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
    if e.ndim != 2 or e.shape[0] == 0:
        raise IdentityError("No face embeddings to build an identity from: every image was skipped "
                            "or had no face. Use photos with a clearly visible face.")
    e = F.normalize(e.float(), dim=-1)
    names = names or [f"image {i}" for i in range(e.shape[0])]
    meta = dict(metadata or {})
    meta.setdefault("sources", list(names))
    warnings = list(meta.get("warnings", []))
    for i, sim, matches in outliers(e, threshold):
        msg = (f"{names[i]} looks like a different person than most other reference photos (it matches "
               f"{matches} of {e.shape[0] - 1}; mean similarity {sim:.2f}, same-person threshold "
               f"{threshold:.2f}); remove it if it shows someone else")
        log.warning("[PortraitBooth] %s", msg)
        warnings.append(msg)
    meta["warnings"] = warnings
    return Identity(embeddings=e, vector=F.normalize(e.mean(0), dim=-1), kind=kind, metadata=meta,
                    aligned=aligned)


def mix_identities(a: Identity, b: Identity, weight_b: float) -> Identity:
    """Blend: normalize((1 - w) * a + w * b). w=0 gives a, w=1 gives b. Unnormalized
    identities (metadata "normalized": False, CLIP image embeddings) are blended linearly."""
    if a.kind != b.kind:
        raise IdentityError(f"Cannot mix identities from different recognizers: {a.kind!r} and {b.kind!r}. "
                            "Analyze both faces with the same FaceEncoder.")
    if not 0.0 <= weight_b <= 1.0:
        raise IdentityError(f"weight must be between 0 and 1, got {weight_b}")
    vector = (1.0 - weight_b) * a.vector + weight_b * b.vector
    if a.metadata.get("normalized", True) is not False:
        vector = F.normalize(vector, dim=-1)
    # else: raw CLIP image embeddings (face.clip_image) keep their scale; the projector was
    # trained on unnormalized vectors.
    meta = {"sources": [*a.metadata.get("sources", []), *b.metadata.get("sources", [])],
            "mix": {"weight_b": float(weight_b), "a": a.metadata.get("sources", []),
                    "b": b.metadata.get("sources", [])},
            "warnings": [*a.metadata.get("warnings", []), *b.metadata.get("warnings", [])],
            **({"normalized": False} if a.metadata.get("normalized", True) is False else {})}
    aligned = None
    if a.aligned is not None and b.aligned is not None:
        aligned = torch.cat([a.aligned, b.aligned])
    return Identity(embeddings=torch.cat([a.embeddings, b.embeddings]), vector=vector, kind=a.kind,
                    metadata=meta, aligned=aligned)


def cosine(a: Identity | torch.Tensor, b: Identity | torch.Tensor) -> float:
    va = a.vector if isinstance(a, Identity) else a
    vb = b.vector if isinstance(b, Identity) else b
    return float(F.normalize(va.float(), dim=-1) @ F.normalize(vb.float(), dim=-1))
