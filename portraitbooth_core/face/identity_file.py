"""Identity files: a person analysed once, reused by any graph or the headless API.

One .safetensors file (never a pickle; reading it runs no code):
  vector                      [dim] float32, the identity conditioning uses
  embeddings                  [N, dim] float32, one row per photo (optional: a file can
                              leave the per-photo embeddings out and keep only `vector`)
  <other tensor fields>       any further tensor field the Identity type gains
  __metadata__["portraitbooth_identity"]  one JSON object:
    format      "portraitbooth-identity/1"
    kind        the recognizer's embedding kind, e.g. "arcface:antelopev2/glintr100.onnx"
    dim, count  vector size; number of photos the identity was made from
    encoder     the FaceEncoder settings (pack, recognizer, detector, ...)
    photos      the photos' names, in order
    outliers    photos that looked like someone else: name, index, similarity, threshold
    combine     how the photos were combined: mode and per-photo weights
                (each of these four is null when the identity has none: a mix has no combine)
    per_photo_embeddings  whether the `embeddings` tensor is in the file
    fields      every other field of the Identity (conventions such as face order or
                raw/normalised embeddings), stored generically so new fields round-trip
    metadata    the rest of the identity's metadata (warnings, mix, ...)

Reading is strict: a file that is not an identity file, that is truncated, that lacks a
key or carries a tensor or field this version does not know is an IdentityFileError
naming the file and what is wrong.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import write_bytes_atomic
from ..bounded_json import load_json_bytes
from ..paths import BadInputError
from ..weights.finite import describe_names, non_finite_names
from ..weights.safetensors_header import read_header_as
from .errors import FaceAnalysisError
from .types import Identity

FORMAT = "portraitbooth-identity/1"
METADATA_KEY = "portraitbooth_identity"
EXTENSION = ".safetensors"
# Metadata keys with a place of their own in the file (file key -> metadata key).
NAMED = {"photos": "sources", "outliers": "outliers", "combine": "combine", "encoder": "encoder"}
# Fields not written: the aligned 112 px face crops are pictures of the person, not the
# identity; an identity file should not carry photos the user did not choose to share.
NOT_STORED = {"aligned"}
TENSOR_FIELDS_REQUIRED = ("vector",)
REQUIRED_KEYS = ("format", "kind", "dim", "count", "encoder", "photos", "outliers", "combine",
                 "per_photo_embeddings", "fields", "metadata")
MAX_HEADER = 16 * 1024 * 1024  # a few names and numbers; anything larger is not ours


class IdentityFileError(FaceAnalysisError):
    """An identity file that cannot be written or read; the message names the file."""


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Identity)}


def _json_value(value: Any, what: str, source: str) -> Any:
    """`value` as plain JSON (an Enum as its value), or an error naming `what`."""
    try:
        return json.loads(json.dumps(value, allow_nan=False, default=_plain))
    except (TypeError, ValueError) as exc:
        raise IdentityFileError(f"{source}: cannot store {what} in an identity file ({exc}); only text, "
                                f"numbers, lists and dicts can be stored.") from None


def _plain(value: Any) -> Any:
    import enum

    import numpy as np

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def identity_file_name(name: str) -> str:
    """`name` with the .safetensors extension (added when missing)."""
    return name if name.endswith(EXTENSION) else name + EXTENSION


def save_identity(path: str | os.PathLike, identity: Identity, per_photo_embeddings: bool = True,
                  overwrite: bool = False) -> tuple[Path, bool]:
    """Write `identity` to `path` atomically (temp file + os.replace): (path, written).

    An existing file is replaced only with `overwrite`, except that a file already holding
    exactly these bytes is left as it is (written False): re-queuing a graph that saved an
    identity is not an error. A symlink in the way is replaced, never followed."""
    from safetensors.torch import save

    path = Path(path)
    source = path.name
    if not isinstance(identity, Identity):
        raise IdentityFileError(f"{source}: expected a face identity (from Analyze Faces), got "
                                f"{type(identity).__name__}.")
    data = save(*_serialise(identity, per_photo_embeddings, source))
    if os.path.lexists(path) and not overwrite:
        if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == len(data) \
                and Path(path).read_bytes() == data:
            return path, False
        raise IdentityFileError(f"{source} already exists in {path.parent} and holds another identity; choose "
                                f"another name or turn on overwrite to replace it.")
    write_bytes_atomic(path, data)  # a fresh temp file (never a planted link), the umask's mode
    return path, True


def _serialise(identity: Identity, per_photo_embeddings: bool, source: str) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of an identity file."""
    vector = identity.vector.detach().to("cpu", torch.float32).reshape(-1).contiguous()
    if not bool(torch.isfinite(vector).all()):
        raise IdentityFileError(f"{source}: the identity's vector is not finite; analyse the photos again.")
    tensors = {"vector": vector}
    if identity.clip_hidden is not None and not per_photo_embeddings:
        raise IdentityFileError(f"{source}: a PhotoMaker identity is its photos' rows (embedding + CLIP hidden "
                                f"states, paired); turn per_photo_embeddings on to save it.")
    fields: dict[str, Any] = {}
    for name, value in ((f, getattr(identity, f)) for f in _fields()):
        if name in ("vector", "kind", "metadata") or name in NOT_STORED:
            continue
        if name == "embeddings":
            if per_photo_embeddings and value is not None:
                tensors["embeddings"] = value.detach().to("cpu", torch.float32).contiguous()
            continue
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
        else:  # conventions (face order, raw/normalised, ...): whatever fields the type has
            fields[name] = _json_value(value, f"the identity's field {name!r}", source)
    meta = dict(identity.metadata or {})
    header = {"format": FORMAT, "kind": str(identity.kind), "dim": int(vector.shape[0]),
              "count": int(identity.embeddings.shape[0]) if identity.embeddings is not None else 1,
              "per_photo_embeddings": "embeddings" in tensors, "fields": fields}
    for key, meta_key in NAMED.items():  # null: the identity has none (e.g. a mix has no combine)
        header[key] = _json_value(meta.pop(meta_key, None), f"metadata {meta_key!r}", source)
    header["metadata"] = _json_value(meta, "the identity's metadata", source)
    if "embeddings" in tensors and tuple(tensors["embeddings"].shape[1:]) != (header["dim"],):
        raise IdentityFileError(f"{source}: per-photo embeddings are {tuple(tensors['embeddings'].shape)} but the "
                                f"vector has {header['dim']} values.")
    return tensors, {METADATA_KEY: json.dumps(header, allow_nan=False)}


def read_identity_header(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(the file's identity JSON, tensor name -> shape), checked, from the header alone."""
    source = os.path.basename(path)
    if not os.path.isfile(path):
        raise IdentityFileError(f"identity file not found: {source}")
    file_header = read_header_as(path, IdentityFileError, "Copy or save it again.", "Save the identity again.")
    shapes, metadata = file_header.shapes, file_header.metadata
    if METADATA_KEY not in metadata:
        what = ("a PortraitBooth model file (put it in models/portraitbooth and use Load PortraitBooth Model)"
                if "portraitbooth" in metadata else "a safetensors file without identity metadata")
        raise IdentityFileError(f"{source} is not an identity file: it is {what}. Identity files are written "
                                f"by Save Identity.")
    raw = metadata[METADATA_KEY]
    if not isinstance(raw, str) or len(raw) > MAX_HEADER:
        raise IdentityFileError(f"{source}: its identity metadata is not a JSON text of sane size.")
    try:  # size and nesting bounded before parsing: a deep "metadata" is a message, not a RecursionError
        header = load_json_bytes(raw, f"{source}: its identity metadata", MAX_HEADER)
    except BadInputError as exc:
        raise IdentityFileError(f"{exc} Identity files are written by Save Identity.") from None
    if not isinstance(header, dict):
        raise IdentityFileError(f"{source}: its identity metadata is not a JSON object.")
    _check_header(header, shapes, source)
    return header, shapes


def _check_header(h: dict, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    fmt = h.get("format")
    if fmt != FORMAT:
        newer = isinstance(fmt, str) and fmt.startswith("portraitbooth-identity/")
        raise IdentityFileError(f"{source}: format {fmt!r} is not {FORMAT!r}"
                                + ("; it was written by a newer PortraitBooth: update the pack." if newer else "."))
    missing = [k for k in REQUIRED_KEYS if k not in h]
    if missing:
        raise IdentityFileError(f"{source}: its identity metadata lacks {', '.join(missing)}; save the identity "
                                f"again.")
    unknown = sorted(set(h) - set(REQUIRED_KEYS))
    if unknown:
        raise IdentityFileError(f"{source}: unknown identity metadata keys {', '.join(unknown)}; it was written by "
                                f"another version of PortraitBooth: update the pack.")
    problems = []
    if not isinstance(h["kind"], str) or not h["kind"]:
        problems.append(f"kind is {h['kind']!r}, expected the recognizer's name")
    for key in ("dim", "count"):
        if not isinstance(h[key], int) or isinstance(h[key], bool) or h[key] < 1:
            problems.append(f"{key} is {h[key]!r}, expected a positive integer")
    if not isinstance(h["per_photo_embeddings"], bool):
        problems.append("per_photo_embeddings is not true/false")
    for key, kind, nullable in (("fields", dict, False), ("metadata", dict, False), ("encoder", dict, True),
                                ("combine", dict, True), ("photos", list, True), ("outliers", list, True)):
        if not isinstance(h[key], kind) and not (nullable and h[key] is None):
            problems.append(f"{key} is {type(h[key]).__name__}, expected "
                            f"{'an object' if kind is dict else 'a list'}{' or null' if nullable else ''}")
    if isinstance(h["photos"], list) and not all(isinstance(p, str) for p in h["photos"]):
        problems.append("photos holds something other than names")
    weights = h["combine"].get("weights") if isinstance(h["combine"], dict) else None
    if weights is not None and not (isinstance(weights, list) and all(  # shown as numbers by describe_identity_file
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
        problems.append(f"combine's weights are {str(weights)[:80]}, expected a list of finite numbers or null")
    if problems:
        raise IdentityFileError(f"{source}: malformed identity metadata: {'; '.join(problems)}.")
    known = _fields()
    stray = sorted(set(h["fields"]) - set(known))
    if stray:
        raise IdentityFileError(f"{source}: stores identity fields this version does not know ({', '.join(stray)}); "
                                f"it was written by a newer PortraitBooth: update the pack.")
    mistyped = []
    for name, value in h["fields"].items():
        # The default's type is the field's type where there is one (bool, str, ...); a
        # hand-edited "normalized": "no" must not pass as true.
        default = known[name].default
        if default is dataclasses.MISSING or default is None or value is None and default is None:
            continue
        want_type = list if isinstance(default, tuple) else type(default)  # JSON has lists only
        ok = isinstance(value, want_type) and (want_type is bool or not isinstance(value, bool))
        if want_type is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            mistyped.append(f"{name} is {value!r}, expected {want_type.__name__}")
    if mistyped:
        raise IdentityFileError(f"{source}: malformed identity fields: {'; '.join(mistyped)}.")
    dim, count = h["dim"], h["count"]
    want = {"vector": (dim,)}
    if h["per_photo_embeddings"]:
        want["embeddings"] = (count, dim)
    lacking = [k for k in want if k not in shapes]
    if lacking:
        raise IdentityFileError(f"{source}: missing tensor(s) {', '.join(lacking)}; save the identity again.")
    # Besides vector/embeddings, a tensor may only be a field of the type not stored as JSON.
    tensor_fields = {k for k in known if k not in ("vector", "embeddings", "kind", "metadata")
                     and k not in NOT_STORED and k not in h["fields"]}
    extra = sorted(k for k in shapes if k not in want and k not in tensor_fields)
    if extra:
        raise IdentityFileError(f"{source}: unexpected tensor(s) {', '.join(extra)}; it is not an identity file "
                                f"of this version.")
    if "clip_hidden" in shapes:  # PhotoMaker: one row of CLIP hidden states per photo, paired with its embedding
        hidden = tuple(shapes["clip_hidden"])
        if not h["per_photo_embeddings"] or len(hidden) != 3 or hidden[0] != count:
            raise IdentityFileError(f"{source}: tensor clip_hidden {hidden} does not hold one [tokens, width] row per "
                                    f"photo ({count}) beside per-photo embeddings; save the identity again.")
    wrong = [f"{k} {tuple(shapes[k])} (expected {s})" for k, s in want.items() if tuple(shapes[k]) != s]
    if wrong:
        raise IdentityFileError(f"{source}: tensor shapes do not match its metadata: {'; '.join(wrong)}.")


def load_identity(path: str | os.PathLike) -> Identity:
    """The Identity stored in `path`, checked; every problem is an IdentityFileError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    source = os.path.basename(path)
    header, shapes = read_identity_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        # The error's type only: a parser's message can quote bytes or offsets of the file.
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise IdentityFileError(f"{source} could not be read ({why}); save the identity again.") from None
    for name in ("vector", "embeddings"):
        t = tensors.get(name)
        if t is not None and t.dtype != torch.float32:
            raise IdentityFileError(f"{source}: tensor {name} is {t.dtype}; expected float32. Save the identity "
                                    f"again.")
    bad = non_finite_names(tensors)  # every tensor field, not only the vector
    if bad:
        raise IdentityFileError(f"{source}: tensor(s) {describe_names(bad)} hold non-finite values (NaN or "
                                f"infinity); analyse the photos again and save a new identity file.")
    vector = tensors["vector"]
    meta = dict(header["metadata"])
    for key, meta_key in NAMED.items():
        if header[key] is not None:
            meta[meta_key] = header[key]
    if not header["per_photo_embeddings"]:
        meta["per_photo_embeddings"] = False  # embeddings below is the vector alone
    values: dict[str, Any] = {"vector": vector, "kind": header["kind"], "metadata": meta,
                              "embeddings": tensors.get("embeddings", vector[None].clone())}
    known = _fields()
    for name, tensor in tensors.items():
        if name not in values:
            values[name] = tensor
    values.update(header["fields"])
    lacking = [name for name, f in known.items() if name not in values and name not in NOT_STORED
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if lacking:
        raise IdentityFileError(f"{source}: lacks the identity field(s) {', '.join(lacking)}, which this version "
                                f"needs; analyse the photos again and save a new file.")
    try:
        identity = Identity(**{k: v for k, v in values.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise IdentityFileError(f"{source}: its fields do not make an identity ({exc}).") from None
    norm = float(vector.norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise IdentityFileError(f"{source}: the identity vector is zero; save the identity again.")
    return identity


def describe_identity_file(path: str | os.PathLike) -> str:
    """A few lines for people: what the file holds (from its header alone)."""
    header, _ = read_identity_header(path)
    photos = header["photos"] or []
    combine = header["combine"] or {}
    lines = [f"{os.path.basename(path)}: {header['kind']} ({header['dim']}-d), from {header['count']} photo(s)"
             + (f": {', '.join(photos[:8])}{', ...' if len(photos) > 8 else ''}" if photos else "")]
    if combine:
        weights = combine.get("weights")
        lines.append(f"combined: {combine.get('mode', '?')}"
                     + (f", weights {', '.join(f'{w:g}' for w in weights)}" if weights else ""))
    for o in header["outliers"] or []:
        if isinstance(o, dict):
            lines.append(f"outlier: {o.get('photo', '?')} (matches {o.get('matches', '?')} of {o.get('of', '?')} "
                         f"other photos)")
    if not header["per_photo_embeddings"]:
        lines.append("per-photo embeddings not stored")
    return "\n".join(lines)


__all__ = ["EXTENSION", "FORMAT", "IdentityFileError", "METADATA_KEY", "describe_identity_file",
           "identity_file_name", "load_identity", "read_identity_header", "save_identity"]
