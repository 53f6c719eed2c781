"""Training data path: does the loader keep up with the training step?

The DataLoader of `training.data` (positions -> decoded samples with their draws, worker
processes, prefetch) against what one training step consumes, in the same run:
  loader   samples/s delivered by a running DataLoader at batch 8, for 0, 1, 2, 4 workers
           (at most the CPUs there are): a figure per worker count, and per worker
  step     one recipe training step at batch 8 (ComfyUI's SD1.5 classes, random weights;
           the loader's batch is already in memory)
Main figure: data_loader_vs_step_demand = loader samples/s (workers as training's `auto`
picks them) / samples per second a step consumes; target >= 4 (the loader is never the
bottleneck). Rounds interleave a step and a loader burst; median and min-max spread.

Quick mode (default): one-level UNet, 64 px samples, on a CPU. --full: full-size SD1.5
UNet at 512 px with 512 px JPEG samples (meant for a GPU).

    OMP_NUM_THREADS=1 python benchmarks/data_path.py [--full] [--rounds N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

BATCH = 8


def loader_rate(trainer, workers: int, batches: int, start_step: int) -> float:
    """Samples/s of a DataLoader with `workers` workers over `batches` micro-batches,
    after its first batch (worker start-up is paid once per run, not per step)."""
    from training.run.data import MicroBatchSampler, make_loader

    config = trainer.config
    sampler = MicroBatchSampler(config, 0, 1, start_step, 0, start_step + batches + 1)
    it = iter(make_loader(trainer.loader.dataset(trainer.latent_hw), sampler, workers,
                          max(2, config.prefetch_factor), pin_memory=trainer.dist.device.type == "cuda"))
    next(it)
    start = time.perf_counter()
    count = sum(len(batch.positions) for batch in it)
    seconds = time.perf_counter() - start
    del it
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 UNet, 512 px samples")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    from headless.comfyui import find_comfyui, import_comfyui

    import_comfyui(cpu=None, path=find_comfyui())
    import torch

    from benchmarks.harness import device_name, header, timed
    from benchmarks.train_step import make_trainer, side_fn
    from training.run.data import loader_workers

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    trainer, resolution = make_trainer(args.full, micro_batch=BATCH, count=256 if args.full else 64)
    auto = loader_workers(-1)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = sorted({0, 1, 2, 4, auto} & set(range(cpus + 1)) | {auto})
    config = {"unet": "sd15-full" if args.full else "tiny-1-level", "px": resolution, "batch": BATCH,
              "auto_workers": auto, "cpus": cpus, "jpeg_targets": True}
    header("data path: DataLoader samples/s vs what a training step consumes", **config)
    step = side_fn(trainer, "recipe")
    step()  # warm-up
    rounds = args.rounds or (5 if torch.cuda.is_available() else 3)
    burst = 12 if args.full else 6
    ratios, steps, rates = [], [], []
    for r in range(rounds):
        seconds = timed(step)
        rate = loader_rate(trainer, auto, burst, start_step=r * (burst + 1))
        steps.append(seconds)
        rates.append(rate)
        ratios.append(rate / (BATCH / seconds))
    print(json.dumps({
        "name": "data_loader_vs_step_demand", "ratio": round(statistics.median(ratios), 3),
        "spread": [round(min(ratios), 3), round(max(ratios), 3)], "target": ">= 4",
        "meets_target": statistics.median(ratios) >= 4, "device": device_name(),
        "config": {**config, "workers": auto, "rounds": rounds, "step_s": round(statistics.median(steps), 4),
                   "loader_samples_per_s": round(statistics.median(rates), 1)}}), flush=True)
    for workers in counts:
        rate = statistics.median(loader_rate(trainer, workers, burst, start_step=1000 + k * (burst + 1))
                                 for k in range(2))
        print(json.dumps({
            "name": f"data_loader_samples_per_s_{workers}_workers", "value": round(rate, 1),
            "per_worker": round(rate / max(1, workers), 1), "device": device_name(),
            "config": {**config, "workers": workers}}), flush=True)
    trainer.close()


if __name__ == "__main__":
    main()
