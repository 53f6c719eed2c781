"""Write a dataset's precomputed inputs (`python -m training precompute DATASET --model SD15`):
VAE latents and CLIP text encodings made by the same code the training step runs; the
format and its reader are in training.dataset.precomputed."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..dataset.precomputed import (DTYPES, MANIFEST, encoder_fingerprint, manifest_bytes, sample_digest, side_file,
                                   side_file_bytes, side_file_current)
from ..dataset.shards import ShardReader


def precompute(dataset: str, checkpoint: str, device: torch.device | str = "cpu", batch_size: int = 16,
               dtype: str = "fp32", progress: bool = True) -> dict:
    """Write the precomputed inputs of every shard (shards already done for this dataset,
    model and dtype are kept: an interrupted run continues), then the manifest."""
    from ..config import TrainConfig
    from ..dataset.samples import decode
    from ..models.load import load_models
    from ..models.text_cache import TextCache

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
            if side_file_current(reader, name, digests[shard_name], encoders, dtype):
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
