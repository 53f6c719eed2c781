"""Precomputed inputs: VAE latents and CLIP text encodings of a dataset, so that a training
step does no VAE or text encode (`python -m training precompute DATASET --model SD15`).

What is stored is what the step would compute, by the same code: the latent is
Models.encode_pixels of the decoded image (ComfyUI's VAE encode returns the posterior's
mean, not a sample, so there is nothing random to draw and training stays exact), and
the text is step.TextCache's encoding of the caption (the first 77-token chunk). The
per-sample draws (mode, timestep, noise) stay in the data path, keyed by position. The
only difference from encoding in the step is float rounding: another batch composition
(and device, when precomputed elsewhere) for the VAE; fp16/bf16 storage (--dtype) rounds
further, halving the files.

Layout: DATASET/precomputed/<shard>.safetensors per shard (tensors `latents` [n,4,h,w],
`text` [u,77,768] of the shard's distinct captions with row 0 the empty caption,
`text_row` [n], `digest` [n,16]) and precomputed/manifest.json, written last. They are
tied to the dataset and the model: the manifest records each shard's index digest and a
hash of the checkpoint's VAE and text-encoder tensors, each sample's digest covers its
image and caption bytes; any mismatch stops training with the command that remakes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from portraitbooth_core.bounded_json import load_json_bytes
from portraitbooth_core.paths import BadInputError, PathNotAllowedError
from portraitbooth_core.weights.safetensors_header import read_header

from .names import FILE, NAME, NameField, check_names, name_fields
from .shards import ShardReader
from .storage import DatasetFileError

log = logging.getLogger("portraitbooth.training")


FOLDER = "precomputed"


MANIFEST = f"{FOLDER}/manifest.json"


FORMAT = "portraitbooth-precomputed/1"


ENCODER_PREFIXES = ("first_stage_model.", "cond_stage_model.")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "U8": torch.uint8}


# Every field of the manifest and of a side file's metadata that names a file or a sample
# (names.py). A shard name is opened as the shard's JSON and its side file.
_SHARD = ("{}.json", f"{FOLDER}/{{}}.safetensors")
MANIFEST_NAMES = name_fields(MANIFEST, NameField("shards{}", FILE, _SHARD), NameField("checkpoint", NAME))
SIDE_FILE_NAMES = name_fields(f"{FOLDER}/<shard>.safetensors", NameField("__metadata__.shard", FILE, _SHARD),
                              NameField("__metadata__.keys|json[]", NAME))

MAX_MANIFEST_BYTES = 32 << 20      # ~70 bytes a shard
MAX_SIDE_HEADER_BYTES = 64 << 20   # ~15 bytes a sample (its key), plus four tensor entries
_TENSORS = ("latents", "text", "text_row", "digest")


class PrecomputedError(DatasetFileError):
    """The dataset's precomputed inputs do not belong to this dataset or model."""


def side_file(shard_name: str) -> str:
    return f"{FOLDER}/{shard_name}.safetensors"


def sample_digest(raw: dict[str, bytes]) -> bytes:
    """16 bytes over what the stored latent and text were made from (image and caption)."""
    h = hashlib.blake2b(digest_size=16)
    for ext in ("jpg", "json"):
        data = raw.get(ext, b"")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def encoder_fingerprint(checkpoint: str | Path) -> str:
    """A hash of the checkpoint's VAE and text-encoder tensors (names, types, shapes, bytes):
    the same for any file with the same encoders, whatever its UNet."""
    path = Path(checkpoint)
    h = hashlib.sha256(FORMAT.encode())
    try:
        parsed = read_header(path, complete=False)
        size, header = parsed.length, parsed.tensors
    except ValueError:
        header, size = {}, 0
    names = sorted(k for k in header if k.startswith(ENCODER_PREFIXES))
    with open(path, "rb") as f:
        if not names:  # not a safetensors SD checkpoint with the usual prefixes: the whole file
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
            return h.hexdigest()[:32]
        base = 8 + size
        for name in names:
            entry = header[name]
            begin, end = entry["data_offsets"]
            h.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
            f.seek(base + begin)
            left = end - begin
            while left > 0:
                block = f.read(min(left, 1 << 24))
                if not block:
                    raise ValueError(f"{path}: truncated tensor {name}")
                h.update(block)
                left -= len(block)
    return h.hexdigest()[:32]


def _header(reader: ShardReader, name: str) -> tuple[int, dict]:
    """(start of the data, header) of a safetensors side file, read by range, its size and
    nesting bounded and its name fields checked. `name` is resolved inside the dataset
    folder (ShardReader.read_range): a symlink leading out is refused before any read."""
    shown = reader.location.describe(name)
    (size,) = struct.unpack("<Q", reader.read_range(name, 0, 8))
    if size > MAX_SIDE_HEADER_BYTES:
        raise PrecomputedError(f"{shown}: its header is larger than a side file's; rerun precompute.")
    header = load_json_bytes(reader.read_range(name, 8, size), shown, MAX_SIDE_HEADER_BYTES)
    if not isinstance(header, dict):
        raise PrecomputedError(f"{shown}: its header is not a JSON object; rerun precompute.")
    check_names(header, SIDE_FILE_NAMES, shown)
    return 8 + size, header


def _entry_ok(entry, rows: int | None) -> bool:
    """A tensor entry whose dtype, shape and byte range agree (and, with rows, whose first
    dimension is `rows`): what _tensor may read without guarding."""
    if not isinstance(entry, dict) or entry.get("dtype") not in _ST_DTYPES:
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    counts = lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                   for x in v)  # noqa: E731
    if not (counts(shape) and shape and counts(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        return False
    size = torch.empty((), dtype=_ST_DTYPES[entry["dtype"]]).element_size()
    for n in shape:
        size *= n
    return offsets[1] - offsets[0] == size and (rows is None or shape[0] == rows)


def read_manifest(reader: ShardReader) -> dict:
    """precomputed/manifest.json, bounded and checked: its format, and every name in it."""
    shown = reader.location.describe(MANIFEST)
    manifest = reader.location.read_json(reader.location.resolve(MANIFEST, shown), shown, MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise _stop(reader, f"are in an unknown format ({str(found)[:80]!r})")
    check_names(manifest, MANIFEST_NAMES, shown)
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
        raise PrecomputedError(f"{shown} shards: must map shard names to index digests; rerun precompute.")
    return manifest


def check_files(reader: ShardReader) -> int:
    """Before training: the dataset's precomputed manifest and every side file's header
    (names, keys, tensor layout) checked without the model; the number of side files (0:
    none). Whether they match the checkpoint's encoders is Precomputed.open's check."""
    if not reader.location.exists(MANIFEST):
        return 0
    pre = Precomputed(reader, read_manifest(reader), "SD15.safetensors", check_shards=True)
    for shard in range(len(reader.compact.names)):
        pre._shard(shard)
        pre._headers.clear()
    return len(reader.compact.names)


def _tensor(reader: ShardReader, name: str, start: int, entry: dict, row: int | None = None) -> torch.Tensor:
    """A whole tensor, or one row of its first dimension, read by range."""
    dtype = _ST_DTYPES[entry["dtype"]]
    shape = list(entry["shape"])
    begin, end = entry["data_offsets"]
    if row is not None:
        row_bytes = (end - begin) // shape[0]
        begin, end, shape = begin + row * row_bytes, begin + (row + 1) * row_bytes, shape[1:]
    data = bytearray(reader.read_range(name, start + begin, end - begin))
    return torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)


def _stop(reader: ShardReader, reason: str, checkpoint: str = "SD15.safetensors") -> PrecomputedError:
    where = reader.location.describe(FOLDER)
    return PrecomputedError(
        f"{where}: the precomputed latents/text encodings {reason}, so training on them would be wrong. "
        f"Remake them with `python -m training precompute {reader.location.text} --model {checkpoint}`, "
        f"or delete {where} (or set precomputed=off) to encode in every step.")


class Precomputed:
    """A dataset's precomputed inputs, checked against the dataset and the model on open;
    `lookup` (in loader workers) reads one sample's latent and text encoding."""

    def __init__(self, reader: ShardReader, manifest: dict, checkpoint: str, check_shards: bool = False):
        self.reader, self.manifest, self.checkpoint = reader, manifest, checkpoint
        shape = manifest.get("latent_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and
                all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 4096 for x in shape)):
            raise _stop(reader, "have no valid latent_shape in their manifest", checkpoint)
        self.latent_shape = tuple(shape)
        self._headers: OrderedDict[int, dict] = OrderedDict()
        if check_shards:
            self._check_shard_list()

    def _check_shard_list(self) -> None:
        compact = self.reader.compact
        recorded = self.manifest.get("shards") or {}
        changed = [name for s, name in enumerate(compact.names) if recorded.get(name) != compact.shard_digest(s)]
        if changed or set(recorded) != set(compact.names):
            gone = sorted(set(recorded) - set(compact.names))
            what = [repr(n[:80]) for n in changed[:3] + gone[:3]]
            raise _stop(self.reader, f"were made before the dataset changed ({len(changed)} shard(s) differ or are "
                                     f"new, {len(gone)} gone: {', '.join(what)}; {MANIFEST} field 'shards')",
                        self.checkpoint)

    @classmethod
    def open(cls, reader: ShardReader, checkpoint: str) -> "Precomputed | None":
        """None when the dataset has none; PrecomputedError when they do not match it or the
        checkpoint's VAE/text encoder."""
        if not reader.location.exists(MANIFEST):
            return None
        manifest = read_manifest(reader)
        pre = cls(reader, manifest, checkpoint, check_shards=True)
        mine = encoder_fingerprint(checkpoint)
        if manifest.get("encoders") != mine:
            raise _stop(reader, f"were made with another VAE/text encoder ({manifest.get('checkpoint')!r}, "
                                f"fingerprint {str(manifest.get('encoders'))[:40]}) than {Path(checkpoint).name} "
                                f"({mine})", checkpoint)
        return pre

    def check_latent_shape(self, latent_hw: tuple[int, int], channels: int = 4) -> None:
        if self.latent_shape != (channels, *latent_hw):
            raise _stop(self.reader, f"have latents of shape {list(self.latent_shape)}, the model makes "
                                     f"{[channels, *latent_hw]}", self.checkpoint)

    def _shard(self, shard: int) -> dict:
        cached = self._headers.get(shard)
        if cached is not None:
            self._headers.move_to_end(shard)
            return cached
        compact = self.reader.compact
        shard_name = compact.names[shard]
        name = side_file(shard_name)
        try:
            start, header = _header(self.reader, name)
        except (PathNotAllowedError, BadInputError):
            raise  # typed, naming the file and field
        except (OSError, ValueError, struct.error) as exc:
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise _stop(self.reader, f"lack a readable {name} ({problem})", self.checkpoint) from None
        meta = header.get("__metadata__")
        meta = meta if isinstance(meta, dict) else {}
        raw_keys = meta.get("keys", "[]")  # its items were checked as names with the header
        keys = load_json_bytes(raw_keys, f"{self.reader.location.describe(name)} field '__metadata__.keys'",
                               MAX_SIDE_HEADER_BYTES) if isinstance(raw_keys, str) else None
        rows = len(keys) if isinstance(keys, list) else -1
        bad = [t for t in _TENSORS if not _entry_ok(header.get(t), None if t == "text" else rows)]
        if rows < 0 or bad or header["digest"]["dtype"] != "U8" or header["digest"]["shape"] != [rows, 16] or \
                header["text_row"]["dtype"] != "I64" or len(header["text_row"]["shape"]) != 1 or \
                list(header["latents"]["shape"][1:]) != list(self.latent_shape):
            what = ", ".join(bad) or "__metadata__.keys, digest, text_row or latents"
            raise _stop(self.reader, f"in {name} are damaged ({what} missing or not of the side file's layout)",
                        self.checkpoint)
        if meta.get("shard") not in (None, shard_name) or \
                meta.get("index_digest") != self.manifest["shards"].get(shard_name) or \
                meta.get("encoders") != self.manifest.get("encoders"):
            raise _stop(self.reader, f"in {name} do not match the manifest (an interrupted precompute?)",
                        self.checkpoint)
        entry = {"name": name, "start": start, "header": header, "keys": keys,
                 "digest": _tensor(self.reader, name, start, header["digest"]),
                 "text_row": _tensor(self.reader, name, start, header["text_row"])}
        text_rows = header["text"]["shape"][0]
        if len(entry["text_row"]) and (int(entry["text_row"].min()) < 0 or int(entry["text_row"].max()) >= text_rows):
            raise _stop(self.reader, f"in {name} are damaged (text_row points past the text table)", self.checkpoint)
        self._headers[shard] = entry
        while len(self._headers) > 64:
            self._headers.popitem(last=False)
        return entry

    def lookup(self, index: int, raw: dict[str, bytes], uncond: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent [4,h,w], text encoding [77,768]) of sample `index` (float32); the empty
        caption's encoding for an unconditional draw, as the step would encode it."""
        compact = self.reader.compact
        shard = compact.shard_of(index)
        row = index - compact.rows(shard)[0]
        entry = self._shard(shard)
        key = raw["__key__"].decode()
        if row >= len(entry["keys"]) or entry["keys"][row] != key or \
                bytes(entry["digest"][row].tolist()) != sample_digest(raw):
            raise _stop(self.reader, f"were made from another version of sample {key!r} of shard "
                                     f"{compact.names[shard]} (its image or caption changed since)", self.checkpoint)
        header, start, name = entry["header"], entry["start"], entry["name"]
        latent = _tensor(self.reader, name, start, header["latents"], row).float()
        text_row = 0 if uncond else int(entry["text_row"][row])
        text = _tensor(self.reader, name, start, header["text"], text_row).float()
        return latent, text


def side_file_current(reader: ShardReader, name: str, index_digest: str, encoders: str, dtype: str) -> bool:
    if not reader.location.exists(name):
        return False
    try:
        _, header = _header(reader, name)
    except (OSError, ValueError, struct.error):  # damaged or not ours: made again
        return False
    meta = header.get("__metadata__") or {}
    return (meta.get("format"), meta.get("index_digest"), meta.get("encoders"), meta.get("dtype")) == \
        (FORMAT, index_digest, encoders, dtype)


def side_file_bytes(shard_name: str, index_digest: str, encoders: str, dtype: str, keys: list[str],
                    digests: list[bytes], captions: list[str], latents: torch.Tensor,
                    text: Callable[[str], torch.Tensor]) -> bytes:
    """One shard's side file: `latents` [n,4,h,w] and each sample's key, sample_digest and
    caption in shard order; `text(caption)` gives a caption's [1,77,768] encoding. The text
    table holds the shard's distinct captions, sorted, with row 0 the empty caption (what an
    unconditional draw uses). Written by `precompute`, and by `merge` from the parts' rows."""
    from safetensors.torch import save

    distinct = [""] + sorted(set(captions) - {""})
    rows = {c: r for r, c in enumerate(distinct)}
    tensors = {
        "latents": latents.to(DTYPES[dtype]),
        "text": torch.cat([text(c) for c in distinct]).to(DTYPES[dtype]),
        "text_row": torch.tensor([rows[c] for c in captions], dtype=torch.int64),
        "digest": torch.tensor([list(d) for d in digests], dtype=torch.uint8).reshape(len(keys), 16),
    }
    meta = {"format": FORMAT, "shard": shard_name, "index_digest": index_digest,
            "encoders": encoders, "dtype": dtype, "keys": json.dumps(keys)}
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def manifest_bytes(encoders: str, checkpoint_name: str, dtype: str, latent_shape: list[int], resolution: int,
                   shard_digests: dict[str, str]) -> bytes:
    """precomputed/manifest.json, written after every side file: its presence means a complete set."""
    manifest = {"format": FORMAT, "encoders": encoders, "checkpoint": checkpoint_name, "dtype": dtype,
                "latent_shape": list(latent_shape), "resolution": resolution, "shards": shard_digests}
    return json.dumps(manifest, indent=1, sort_keys=True).encode()
