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
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from .shards import ShardReader

log = logging.getLogger("portraitbooth.training")

FOLDER = "precomputed"
MANIFEST = f"{FOLDER}/manifest.json"
FORMAT = "portraitbooth-precomputed/1"
ENCODER_PREFIXES = ("first_stage_model.", "cond_stage_model.")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "U8": torch.uint8}


class PrecomputedError(ValueError):
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
    from portraitbooth_core.weights.family import _raw_header

    path = Path(checkpoint)
    h = hashlib.sha256(FORMAT.encode())
    try:
        size, header = _raw_header(path)
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
    """(start of the data, header) of a safetensors side file, read by range."""
    (size,) = struct.unpack("<Q", reader.read_range(name, 0, 8))
    if size > 100_000_000:
        raise PrecomputedError(f"{reader.location.describe(name)} is not a safetensors file; rerun precompute.")
    return 8 + size, json.loads(reader.read_range(name, 8, size))


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

    def __init__(self, reader: ShardReader, manifest: dict, checkpoint: str):
        self.reader, self.manifest, self.checkpoint = reader, manifest, checkpoint
        self.latent_shape = tuple(manifest["latent_shape"])
        self._headers: OrderedDict[int, dict] = OrderedDict()

    @classmethod
    def open(cls, reader: ShardReader, checkpoint: str) -> "Precomputed | None":
        """None when the dataset has none; PrecomputedError when they do not match it or the
        checkpoint's VAE/text encoder."""
        if not reader.location.exists(MANIFEST):
            return None
        manifest = reader.location.read_json(reader.location.path(MANIFEST), reader.location.describe(MANIFEST))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise _stop(reader, f"are in an unknown format ({manifest.get('format') if isinstance(manifest, dict) else '?'})",
                        checkpoint)
        compact = reader.compact
        recorded = manifest.get("shards") or {}
        changed = [name for s, name in enumerate(compact.names) if recorded.get(name) != compact.shard_digest(s)]
        if changed or set(recorded) != set(compact.names):
            gone = sorted(set(recorded) - set(compact.names))
            what = changed[:3] + gone[:3]
            raise _stop(reader, f"were made before the dataset changed ({len(changed)} shard(s) differ or are new, "
                                f"{len(gone)} gone: {', '.join(what)})", checkpoint)
        mine = encoder_fingerprint(checkpoint)
        if manifest.get("encoders") != mine:
            raise _stop(reader, f"were made with another VAE/text encoder ({manifest.get('checkpoint')!r}, "
                                f"fingerprint {manifest.get('encoders')}) than {Path(checkpoint).name} ({mine})",
                        checkpoint)
        return cls(reader, manifest, checkpoint)

    def check_latent_shape(self, latent_hw: tuple[int, int], channels: int = 4) -> None:
        if self.latent_shape != (channels, *latent_hw):
            raise _stop(self.reader, f"have latents of shape {list(self.latent_shape)}, the model makes "
                                     f"{[channels, *latent_hw]}", self.checkpoint)

    def _shard(self, shard: int) -> dict:
        cached = self._headers.get(shard)
        if cached is not None:
            self._headers.move_to_end(shard)
            return cached
        name = side_file(self.reader.compact.names[shard])
        try:
            start, header = _header(self.reader, name)
        except (OSError, ValueError, KeyError) as exc:
            raise _stop(self.reader, f"lack a readable {name} ({type(exc).__name__}: {str(exc)[:120]})",
                        self.checkpoint) from None
        meta = header.get("__metadata__") or {}
        entry = {"name": name, "start": start, "header": header, "keys": json.loads(meta.get("keys", "[]")),
                 "digest": _tensor(self.reader, name, start, header["digest"]),
                 "text_row": _tensor(self.reader, name, start, header["text_row"])}
        if meta.get("index_digest") != self.manifest["shards"][self.reader.compact.names[shard]] or \
                meta.get("encoders") != self.manifest.get("encoders"):
            raise _stop(self.reader, f"in {name} do not match the manifest (an interrupted precompute?)",
                        self.checkpoint)
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


def _side_file_current(reader: ShardReader, name: str, index_digest: str, encoders: str, dtype: str) -> bool:
    if not reader.location.exists(name):
        return False
    try:
        _, header = _header(reader, name)
    except (OSError, ValueError, PrecomputedError):
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


def precompute(dataset: str, checkpoint: str, device: torch.device | str = "cpu", batch_size: int = 16,
               dtype: str = "fp32", progress: bool = True) -> dict:
    """Write the precomputed inputs of every shard (shards already done for this dataset,
    model and dtype are kept: an interrupted run continues), then the manifest."""
    from .config import TrainConfig
    from .data import decode
    from .models import load_models
    from .step import TextCache

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    device = torch.device(device)
    reader = ShardReader(dataset)
    try:
        encoders = encoder_fingerprint(checkpoint)
        models = load_models(TrainConfig(checkpoint=str(checkpoint), dataset=str(dataset), mode="frozen"), device)
        text = TextCache(models.clip, limit=4096)
        resolution = int(reader.index["resolution"])
        ratio = getattr(models.vae, "downscale_ratio", 8)
        latent_shape = [4, resolution // ratio, resolution // ratio]
        compact = reader.compact
        # No manifest while side files are being remade: a half-remade set is never used.
        reader.location.remove(MANIFEST)
        digests, written, kept, total_bytes = {}, 0, 0, 0
        names = compact.names
        for s, shard_name in enumerate(names):
            digests[shard_name] = compact.shard_digest(s)
            name = side_file(shard_name)
            if _side_file_current(reader, name, digests[shard_name], encoders, dtype):
                kept += 1
                continue
            start, count = compact.rows(s)
            keys, sample_digests, captions, latents = [], [], [], []
            images = []

            def flush():
                if images:
                    with torch.no_grad():
                        z = models.encode_pixels(torch.stack(images).to(device))
                    latents.append(z.float().cpu())
                    images.clear()

            for i in range(start, start + count):
                raw = reader.read(i)
                sample = decode(raw)
                keys.append(raw["__key__"].decode())
                sample_digests.append(sample_digest(raw))
                captions.append(sample["meta"]["caption"])
                images.append(sample["image"])
                if len(images) == batch_size:
                    flush()
            flush()
            data = side_file_bytes(shard_name, digests[shard_name], encoders, dtype, keys, sample_digests, captions,
                                   torch.cat(latents) if latents else torch.zeros(0, *latent_shape), text)
            reader.location.write_bytes_atomic(name, data)
            written += 1
            total_bytes += len(data)
            if progress:
                print(f"[precompute] {s + 1}/{len(names)} {shard_name}: {count} samples, "
                      f"{len(set(captions) - {''})} captions, {len(data) / 2**20:.1f} MiB", flush=True)
        reader.location.write_bytes_atomic(MANIFEST, manifest_bytes(encoders, Path(checkpoint).name, dtype,
                                                                    latent_shape, resolution, digests))
    finally:
        reader.close()
    return {"samples": len(compact), "shards": len(names), "written": written, "kept": kept,
            "bytes": total_bytes, "seconds": round(time.perf_counter() - started, 2), "dtype": dtype}
