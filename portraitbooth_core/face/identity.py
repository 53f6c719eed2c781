"""Identities from several photos, and weighted mixes of two identities."""
from __future__ import annotations

import logging
import math
from typing import Sequence

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


# How several photos become one vector. The first is what the pack always did (and what
# PhotoMaker-style averaging does): every photo counts the same. "normalised mean" averages
# the raw embeddings, so a photo the recognizer is surer about (a larger ArcFace norm:
# sharper, more frontal) counts more.
MEAN_OF_NORMALISED = "mean of normalised embeddings"
NORMALISED_MEAN = "normalised mean"
COMBINE_MODES = (MEAN_OF_NORMALISED, NORMALISED_MEAN)
# What a raw-embedding identity (Identity.normalized False) records instead: no normalising at all.
MEAN_OF_RAW = "mean of raw embeddings"


def parse_weights(weights: str | Sequence[float] | None, count: int, what: str = "weights") -> list[float] | None:
    """Per-photo weights from text ("1, 0.5, 2") or a list; None or "" means equal weights.

    Checked like any caller-given value: one per photo, finite, non-negative, not all zero."""
    if weights is None:
        return None
    if isinstance(weights, str):
        if "\x00" in weights:
            raise IdentityError(f"{what}: contains a NUL byte (\\x00); give numbers such as '1, 0.5, 2'.")
        text = weights.replace(",", " ").replace(";", " ").split()
        if not text:
            return None
        if len(text) > 4096:
            raise IdentityError(f"{what}: {len(text)} values is more than any batch of photos; give one per photo.")
        values = []
        for token in text:
            try:
                values.append(float(token))
            except ValueError:
                shown = token if len(token) <= 40 else token[:37] + "..."
                raise IdentityError(f"{what}: {shown!r} is not a number; give one number per photo, e.g. "
                                    f"'1, 0.5, 2'.") from None
    else:
        try:
            values = [float(v) for v in weights]
        except (TypeError, ValueError):
            raise IdentityError(f"{what}: expected numbers, one per photo; got {type(weights).__name__}") from None
        if not values:
            return None
    if len(values) != count:
        raise IdentityError(f"{what}: {len(values)} weight(s) for {count} photo(s); give exactly one per photo, "
                            f"in batch order (or leave it empty for equal weights).")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v) or v < 0]
    if bad:
        raise IdentityError(f"{what}: weight {values[bad[0]]} of photo {bad[0]} is not a finite number >= 0; "
                            f"weights are shares, 0 leaves a photo out.")
    if not any(v > 0 for v in values):
        raise IdentityError(f"{what}: every weight is 0, so no photo would count; give at least one photo a "
                            f"weight above 0.")
    return values


def combine_embeddings(raw: torch.Tensor, mode: str = MEAN_OF_NORMALISED,
                       weights: Sequence[float] | None = None) -> torch.Tensor:
    """One L2-normalized vector from [N, dim] embeddings as `mode` says, weighted or not."""
    if mode not in COMBINE_MODES:
        raise IdentityError(f"combine: {mode!r} is not one of {', '.join(COMBINE_MODES)}.")
    e = raw.float()
    if mode == MEAN_OF_NORMALISED:
        e = F.normalize(e, dim=-1)
    if weights is None:
        mean = e.mean(0)  # the unweighted path stays exactly what it always computed
    else:
        w = torch.tensor(list(weights), dtype=e.dtype)
        if w.shape[0] != e.shape[0]:
            raise IdentityError(f"weights: {w.shape[0]} weight(s) for {e.shape[0]} embedding(s).")
        mean = (w[:, None] * e).sum(0) / w.sum()
    if not bool(torch.isfinite(mean).all()) or float(mean.norm()) == 0.0:
        raise IdentityError("the combined embedding is zero or not finite (the weighted photos cancel out); "
                            "change the weights or the photos.")
    return F.normalize(mean, dim=-1)


def build_identity(embeddings: np.ndarray | torch.Tensor, kind: str, names: list[str] | None = None,
                   threshold: float = 0.3, aligned: torch.Tensor | None = None,
                   metadata: dict | None = None, combine: str = MEAN_OF_NORMALISED,
                   weights: str | Sequence[float] | None = None, normalized: bool = True) -> Identity:
    """One identity from the embeddings of several photos (see COMBINE_MODES; default: the
    re-normalized mean of L2-normalized embeddings, PhotoMaker-style), optionally weighted
    per photo.

    normalized=False keeps the recognizer's raw output (InstantID's and PuLID's convention):
    `embeddings` are the raw rows and `vector` their (weighted) mean, unnormalized; `combine`
    then has nothing to choose and is recorded as "mean of raw embeddings".

    Warns (log + metadata["warnings"]) about each image that resembles fewer than half of
    the others at `threshold` (the recognizer's same-person cosine): it may be someone else.
    metadata["outliers"] names them with the numbers; metadata["combine"] records how the
    vector was made, so an identity file can say it.
    """
    raw = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
    if raw.ndim != 2 or raw.shape[0] == 0:
        raise IdentityError("No face embeddings to build an identity from: every image was skipped "
                            "or had no face. Use photos with a clearly visible face.")
    e = F.normalize(raw.float(), dim=-1)
    names = names or [f"image {i}" for i in range(e.shape[0])]
    shares = parse_weights(weights, e.shape[0])
    if normalized:
        vector = combine_embeddings(raw, combine, shares)
    else:
        if combine not in COMBINE_MODES:
            raise IdentityError(f"combine: {combine!r} is not one of {', '.join(COMBINE_MODES)}.")
        w = torch.ones(raw.shape[0]) if shares is None else torch.tensor(shares, dtype=torch.float32)
        vector = (w[:, None] * raw.float()).sum(0) / w.sum()
        combine = MEAN_OF_RAW
    meta = dict(metadata or {})
    meta.setdefault("sources", list(names))
    warnings = list(meta.get("warnings", []))
    found = []
    for i, sim, matches in outliers(e, threshold):
        msg = (f"{names[i]} looks like a different person than most other reference photos (it matches "
               f"{matches} of {e.shape[0] - 1}; mean similarity {sim:.2f}, same-person threshold "
               f"{threshold:.2f}); remove it if it shows someone else")
        log.warning("[PortraitBooth] %s", msg)
        warnings.append(msg)
        found.append({"photo": names[i], "index": i, "mean_similarity": round(sim, 6), "matches": matches,
                      "of": e.shape[0] - 1, "threshold": float(threshold)})
    meta["warnings"] = warnings
    meta["outliers"] = found
    meta["combine"] = {"mode": combine, "weights": shares}
    return Identity(embeddings=e if normalized else raw.float(), vector=vector, kind=kind, metadata=meta,
                    aligned=aligned, normalized=normalized)


def mix_identities(a: Identity, b: Identity, weight_b: float) -> Identity:
    """Blend: normalize((1 - w) * a + w * b). w=0 gives a, w=1 gives b. Unnormalized
    identities (raw embeddings, CLIP image embeddings) are blended linearly."""
    if a.kind != b.kind:
        raise IdentityError(f"Cannot mix identities from different recognizers: {a.kind!r} and {b.kind!r}. "
                            "Analyze both faces with the same FaceEncoder.")
    if a.normalized != b.normalized:
        raise IdentityError(f"Cannot mix a {a.embedding_form} identity with a {b.embedding_form} one: their "
                            "vectors differ in scale. Analyze both with the same 'embedding' setting.")
    if not 0.0 <= weight_b <= 1.0:
        raise IdentityError(f"weight must be between 0 and 1, got {weight_b}")
    if a.clip_hidden is not None or b.clip_hidden is not None:
        raise IdentityError("PhotoMaker identities are stacks of photos, not one vector, so they cannot be blended "
                            "by weight. To mix two people, as PhotoMaker does, give CLIP Vision Identity photos of "
                            "both in one batch (more photos of one person pull the result towards them).")
    vector = (1.0 - weight_b) * a.vector + weight_b * b.vector
    if a.normalized:
        vector = F.normalize(vector, dim=-1)
    # else: raw embeddings (raw ArcFace, CLIP image embeddings from face.clip_image) keep
    # their scale; the models fed with them were trained on unnormalized vectors.
    meta = {"sources": [*a.metadata.get("sources", []), *b.metadata.get("sources", [])],
            "mix": {"weight_b": float(weight_b), "a": a.metadata.get("sources", []),
                    "b": b.metadata.get("sources", [])},
            "warnings": [*a.metadata.get("warnings", []), *b.metadata.get("warnings", [])],
            "outliers": [*a.metadata.get("outliers", []), *b.metadata.get("outliers", [])],
            # same kind, so the same recognizer: A's encoder settings describe the blend too
            **({"encoder": a.metadata["encoder"]} if "encoder" in a.metadata else {}),
            **({"normalized": False} if not a.normalized else {})}
    aligned = None
    if a.aligned is not None and b.aligned is not None:
        aligned = torch.cat([a.aligned, b.aligned])
    return Identity(embeddings=torch.cat([a.embeddings, b.embeddings]), vector=vector, kind=a.kind,
                    metadata=meta, aligned=aligned, normalized=a.normalized,
                    face_order=a.face_order if a.face_order == b.face_order else "")


def cosine(a: Identity | torch.Tensor, b: Identity | torch.Tensor) -> float:
    va = a.vector if isinstance(a, Identity) else a
    vb = b.vector if isinstance(b, Identity) else b
    return float(F.normalize(va.float(), dim=-1) @ F.normalize(vb.float(), dim=-1))
