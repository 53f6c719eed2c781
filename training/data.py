"""Samples in, batches out: deterministic order, per-sample random draws, decoding.

Everything random about a sample (its place in the epoch, conditioning mode, timestep,
noise, masked-noise coin) is a function of (seed, global sample position) alone, and so
is torch's global RNG while a micro-batch runs (`micro_batch_rng`). So a resumed run
draws exactly what the uninterrupted one drew, and N processes together draw exactly
what one process draws for the same global batch, whatever N was before a resume: no
per-rank RNG state has to be saved or mapped onto another number of ranks.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainConfig
from .shards import ShardReader

IDENTITY, TEXT_ONLY, UNCOND = 0, 1, 2


def key(seed: int, *keys: int) -> int:
    value = seed & 0xFFFFFFFF
    for k in keys:
        value = (value * 1_000_003 + int(k) + 1) % (2**61 - 1)
    return value


def generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(key(seed, *keys))


@contextlib.contextmanager
def micro_batch_rng(seed: int, position: int, device: torch.device):
    """Torch's global RNG (CPU, and `device` when it is a GPU) seeded by the global position
    of a micro-batch's first sample, restored afterwards. Nothing in today's step draws
    from it, but anything that does (dropout, a random augmentation) then gives the same
    numbers on any number of ranks and after a resume."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        value = key(seed, 13, position)
        torch.default_generator.manual_seed(value)
        if devices:
            torch.cuda.manual_seed(value)  # the current device: the rank's own GPU
        yield


class SampleOrder:
    """Global sample position -> dataset index, a fresh permutation every epoch."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError("the dataset has no samples")
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, None

    def __call__(self, position: int) -> int:
        epoch = position // self.size
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator(self.seed, 7, epoch))
        return int(self._perm[position % self.size])


def micro_positions(step: int, micro: int, rank: int, config: TrainConfig, world: int) -> list[int]:
    """Global positions of one micro-batch. Micro-batch m of rank r holds slot m*world + r,
    so 1 process x 2 accumulation steps sees the same micro-batches as 2 processes x 1."""
    per_step = world * config.micro_batch * config.grad_accum
    slot = micro * world + rank
    start = step * per_step + slot * config.micro_batch
    return list(range(start, start + config.micro_batch))


@dataclass
class Batch:
    images: torch.Tensor        # [B,3,R,R] 0..1
    masks: torch.Tensor         # [B,R,R] 0..1
    landmarks: torch.Tensor     # [B,5,2] pixels of the R x R image
    embeddings: torch.Tensor    # [B,D] reference face embeddings (projector input)
    references: torch.Tensor    # [B,3,112,112] aligned reference faces 0..1 (L_id target)
    captions: list[str]
    identity_positions: list[list[int]]
    expression_positions: list[list[int]]
    modes: torch.Tensor         # [B] IDENTITY / TEXT_ONLY / UNCOND
    timesteps: torch.Tensor     # [B] long
    noise: torch.Tensor         # [B,4,h,w]
    masked_noise: torch.Tensor  # [B] bool

    def to(self, device: torch.device) -> "Batch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


def _image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L",) else im)


def decode(raw: dict[str, bytes]) -> dict:
    meta = json.loads(raw["json"])
    img = torch.from_numpy(_image(raw["jpg"]).copy()).permute(2, 0, 1).float() / 255
    mask = torch.from_numpy(_image(raw["mask.png"]).copy()).float() / 255
    ref = torch.from_numpy(_image(raw["ref.png"]).copy()).permute(2, 0, 1).float() / 255
    emb = torch.from_numpy(np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False).astype(np.float32))
    return {"image": img, "mask": mask if mask.ndim == 2 else mask[..., 0], "ref": ref, "embedding": emb,
            "landmarks": torch.tensor(meta["landmarks"], dtype=torch.float32), "meta": meta}


def draw(position: int, config: TrainConfig, latent_hw: tuple[int, int], timesteps: int = 1000) -> dict:
    g = generator(config.seed, 11, position)
    u = float(torch.rand((), generator=g))
    mode = UNCOND if u < config.p_uncond else TEXT_ONLY if u < config.p_uncond + config.p_text_only else IDENTITY
    t = int(torch.randint(0, timesteps, (), generator=g))
    noise = torch.randn(4, *latent_hw, generator=g)
    masked = bool(float(torch.rand((), generator=g)) < config.p_masked_noise) and mode == IDENTITY
    return {"mode": mode, "t": t, "noise": noise, "masked": masked}


class BatchLoader:
    """Reads and decodes the samples at given global positions."""

    def __init__(self, reader: ShardReader, config: TrainConfig):
        self.reader, self.config = reader, config
        self.order = SampleOrder(len(reader), config.seed)
        self.resolution = int(reader.index["resolution"])

    def batch(self, positions: list[int], latent_hw: tuple[int, int]) -> Batch:
        samples = [decode(self.reader.read(self.order(p))) for p in positions]
        draws = [draw(p, self.config, latent_hw) for p in positions]
        modes = [d["mode"] for d in draws]
        return Batch(
            images=torch.stack([s["image"] for s in samples]),
            masks=torch.stack([s["mask"] for s in samples]),
            landmarks=torch.stack([s["landmarks"] for s in samples]),
            embeddings=torch.stack([s["embedding"] for s in samples]),
            references=torch.stack([s["ref"] for s in samples]),
            captions=["" if m == UNCOND else s["meta"]["caption"] for s, m in zip(samples, modes)],
            identity_positions=[list(s["meta"]["identity_positions"]) for s in samples],
            expression_positions=[list(s["meta"]["expression_positions"]) for s in samples],
            modes=torch.tensor(modes),
            timesteps=torch.tensor([d["t"] for d in draws]),
            noise=torch.stack([d["noise"] for d in draws]),
            masked_noise=torch.tensor([d["masked"] for d in draws]),
        )
