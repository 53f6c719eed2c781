"""Samples in, batches out: deterministic order, per-sample random draws, decoding.

Everything random about a sample (its place in the epoch, conditioning mode, timestep,
noise, masked-noise coin) is a function of (seed, global sample position) alone, and so
is torch's global RNG while a micro-batch runs (`micro_batch_rng`). So a resumed run
draws exactly what the uninterrupted one drew, and N processes together draw exactly
what one process draws for the same global batch, whatever N was before a resume: no
per-rank RNG state has to be saved or mapped onto another number of ranks.

The pipeline is a `torch.utils.data` one keyed by the same positions: MicroBatchSampler
yields each rank's micro-batches (micro_positions), PositionDataset turns a position into
a decoded sample with its draws, `collate` makes the Batch, and DataLoader workers,
pinned memory and prefetch overlap that with the step. A worker computes exactly what
BatchLoader computes in the main process, so the batches are the same bit for bit with
any number of workers, and after a resume at any step.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..config import TrainConfig
from ..dataset.samples import decode
from ..dataset.shards import ShardReader
from .lifecycle import loader_worker_init, under_torchrun

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
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, position: int) -> int:
        epoch = position // self.size
        perm = self._perms.get(epoch)
        if perm is None:
            # int32: 4 bytes a sample per loader process; two epochs kept for a micro-batch
            # that straddles their boundary.
            full = torch.randperm(self.size, generator=generator(self.seed, 7, epoch)).numpy()
            perm = self._perms[epoch] = full.astype(np.int32) if self.size < 2**31 else full
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return int(perm[position % self.size])


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
    positions: list[int] = field(default_factory=list)  # global sample positions
    latents: torch.Tensor | None = None  # [B,4,h,w] precomputed VAE latents (model space), else None
    text: torch.Tensor | None = None     # [B,77,768] precomputed CLIP encodings of `captions`, else None

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        moved = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        """Page-locked copies (DataLoader's pin_memory calls this): faster, asynchronous copies to a GPU."""
        return Batch(**{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def draw(position: int, config: TrainConfig, latent_hw: tuple[int, int], timesteps: int = 1000) -> dict:
    g = generator(config.seed, 11, position)
    u = float(torch.rand((), generator=g))
    mode = UNCOND if u < config.p_uncond else TEXT_ONLY if u < config.p_uncond + config.p_text_only else IDENTITY
    t = int(torch.randint(0, timesteps, (), generator=g))
    noise = torch.randn(4, *latent_hw, generator=g)
    masked = bool(float(torch.rand((), generator=g)) < config.p_masked_noise) and mode == IDENTITY
    return {"mode": mode, "t": t, "noise": noise, "masked": masked}


def collate(samples: list[dict]) -> Batch:
    """Samples of PositionDataset -> one Batch (also DataLoader's collate_fn)."""
    modes = [s["draw"]["mode"] for s in samples]
    pre = [s.get("latent") is not None for s in samples]
    if any(pre) and not all(pre):
        raise RuntimeError("a micro-batch mixes samples with and without precomputed inputs")
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
        timesteps=torch.tensor([s["draw"]["t"] for s in samples]),
        noise=torch.stack([s["draw"]["noise"] for s in samples]),
        masked_noise=torch.tensor([s["draw"]["masked"] for s in samples]),
        positions=[int(s["position"]) for s in samples],
        latents=torch.stack([s["latent"] for s in samples]) if all(pre) else None,
        text=torch.stack([s["text"] for s in samples]) if all(pre) else None,
    )


class PositionDataset(torch.utils.data.Dataset):
    """Global sample position -> that sample decoded, with its draws (and its precomputed
    latent and text encoding when the dataset has them). Positions are unbounded: epoch e
    is permutation e of the dataset (SampleOrder). Picklable: a loader worker opens its own
    files and maps its own index."""

    def __init__(self, reader: ShardReader, config: TrainConfig, latent_hw: tuple[int, int], precomputed=None):
        self.reader, self.config, self.latent_hw = reader, config, tuple(latent_hw)
        self.order = SampleOrder(len(reader), config.seed)
        self.precomputed = precomputed  # precompute.Precomputed or None

    def __getitem__(self, position: int) -> dict:
        index = self.order(position)
        raw = self.reader.read(index)
        drawn = draw(position, self.config, self.latent_hw)
        # Precomputed inputs first: a sample changed since the precompute is refused as such,
        # before its (possibly damaged) bytes are decoded.
        pre = self.precomputed.lookup(index, raw, drawn["mode"] == UNCOND) if self.precomputed is not None else None
        sample = decode(raw)
        sample["draw"], sample["position"] = drawn, position
        if pre is not None:
            sample["latent"], sample["text"] = pre
        return sample

    def __getitems__(self, positions: list[int]) -> list[dict]:
        return [self[p] for p in positions]


class BatchLoader:
    """Reads and decodes the samples at given global positions, in this process."""

    def __init__(self, reader: ShardReader, config: TrainConfig, precomputed=None):
        self.reader, self.config, self.precomputed = reader, config, precomputed
        self.order = SampleOrder(len(reader), config.seed)
        self.resolution = int(reader.index["resolution"])
        self._datasets: dict[tuple[int, int], PositionDataset] = {}

    def dataset(self, latent_hw: tuple[int, int]) -> PositionDataset:
        key = tuple(latent_hw)
        if key not in self._datasets:
            self._datasets[key] = PositionDataset(self.reader, self.config, key, self.precomputed)
        return self._datasets[key]

    def batch(self, positions: list[int], latent_hw: tuple[int, int]) -> Batch:
        dataset = self.dataset(latent_hw)
        return collate([dataset[p] for p in positions])


class MicroBatchSampler(torch.utils.data.Sampler):
    """One rank's micro-batches from (start_step, start_micro) on, as lists of global
    positions (micro_positions); to `end_step` (exclusive), or without end when None."""

    def __init__(self, config: TrainConfig, rank: int, world: int, start_step: int, start_micro: int = 0,
                 end_step: int | None = None):
        self.config, self.rank, self.world = config, rank, world
        self.start_step, self.start_micro, self.end_step = start_step, start_micro, end_step

    def __iter__(self) -> Iterator[list[int]]:
        step, micro = self.start_step, self.start_micro
        while self.end_step is None or step < self.end_step:
            yield micro_positions(step, micro, self.rank, self.config, self.world)
            micro += 1
            if micro == self.config.grad_accum:
                step, micro = step + 1, 0

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an open-ended MicroBatchSampler has no length")
        return max(0, (self.end_step - self.start_step) * self.config.grad_accum - self.start_micro)


def loader_workers(requested: int) -> int:
    """`num_workers` as set, or for -1 (auto): the CPUs this process may use, shared among
    the ranks of this node (torchrun's LOCAL_WORLD_SIZE), one left for the rank itself,
    at most 4."""
    if requested >= 0:
        return requested
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(4, cpus // local - 1))


def make_loader(dataset: PositionDataset, sampler: MicroBatchSampler, workers: int, prefetch_factor: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    extra = {"prefetch_factor": prefetch_factor} if workers > 0 else {}
    if workers > 0 and under_torchrun():  # killing torchrun ends the ranks, and their loader workers with them
        extra["worker_init_fn"] = loader_worker_init
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                       pin_memory=pin_memory, **extra)


class MicroBatchStream:
    """The trainer's micro-batches in order, from a DataLoader started at the first one asked
    for. Asked for any other (step, micro) than the next one (a resume, a test that sets the
    step), it starts a new DataLoader there: what comes back is always the batch of exactly
    those positions."""

    def __init__(self, dataset: PositionDataset, config: TrainConfig, rank: int, world: int,
                 device: torch.device, end_step: int | None = None):
        self.dataset, self.config, self.rank, self.world = dataset, config, rank, world
        self.device, self.end_step = device, end_step
        self.workers = loader_workers(config.num_workers)
        self.pin_memory = device.type == "cuda"
        self._it = None
        self.starts = 0  # DataLoaders started (tests: no restart in a plain run)

    def get(self, step: int, micro: int) -> Batch:
        expected = micro_positions(step, micro, self.rank, self.config, self.world)
        if self._it is not None:
            batch = next(self._it, None)
            if batch is not None and batch.positions == expected:
                return batch
            self.close()
        end = self.end_step if self.end_step is not None and step < self.end_step else None
        sampler = MicroBatchSampler(self.config, self.rank, self.world, step, micro, end)
        self._it = iter(make_loader(self.dataset, sampler, self.workers, self.config.prefetch_factor,
                                    self.pin_memory))
        self.starts += 1
        batch = next(self._it)
        if batch.positions != expected:  # cannot happen unless the sampler and micro_positions disagree
            raise RuntimeError(f"the data loader gave positions {batch.positions}, expected {expected}")
        return batch

    def close(self) -> None:
        """Stop the workers (an iterator's shutdown runs when it is released)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
