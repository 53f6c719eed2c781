"""Training-step cost of PortraitBooth's losses vs a plain noise-loss fine-tuning step.

Same model (ComfyUI's SD1.5 classes, random weights: UNet + CLIP-L + the full KL VAE),
same batch, same optimizer; a step is forward + backward + AdamW update.
  baseline  plain noise loss (text conditioning, no projector, no attention capture)
  paper     identity splice + L_noise (masked on half) + L_loc + L_id with DIP on every
            sample (t <= 250 for all: the most expensive step the recipe can draw)
  recipe    the recipe's own draws (10% text-only, 10% uncond, DIP where t <= 250):
            the average step of a real run
Figures: time ratio (target <= 1.5) and peak-memory ratio (CUDA peak allocated; on the
CPU the peak RSS growth of a separate process per side). On a GPU also images/s. Each step
reads its loss back as the trainer does (one device sync); with the attention-health monitor
on (the default, portraitbooth_core/ecac/health.py) its sums ride along in that read.
  monitor   `paper` with the monitor vs `paper` without it: the collapse alarm's cost
            (target <= 1.03: no UNet pass, reductions of the maps L_loc already has)

Quick mode (default): one-level 320-channel UNet, 64 px (8x8 latents), small stand-in
recognizer; a CPU run under a minute whose tiny UNet makes the VAE's share (DIP) look
far larger than with SD1.5's real UNet. --full: full-size SD1.5 UNet at 512 px with an R100-sized recognizer (GPU).

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--full] [--pairs N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

from benchmarks.train_standins import build_checkpoint, build_dataset, cache_dir  # noqa: E402


def make_trainer(full: bool, micro_batch: int | None = None, count: int = 8):
    import torch

    from training.config import load_config
    from training.run.distributed import Dist
    from training.run.trainer import Trainer

    resolution = 512 if full else 64
    cuda = torch.cuda.is_available()
    config = load_config(None, {"checkpoint": str(build_checkpoint(full)), "dataset": str(build_dataset(resolution, full, count)),
                                "output": str(cache_dir() / "run"), "mode": "full", "micro_batch": micro_batch or (2 if not full else 4),
                                "save_every": 10**6, "log_every": 10**6})
    device = torch.device("cuda") if cuda else torch.device("cpu")
    return Trainer(config, Dist(device=device), resume=False), resolution


SIDES = {  # name -> (loss weights that differ from the paper's, description)
    "baseline": "plain noise loss, text conditioning",
    "paper": "all losses, every sample an identity sample with t <= 250 (DIP on all)",
    "recipe": "all losses, the recipe's own draws (average step), 8 different batches in turn",
    "loc_only": "identity splice + L_noise + L_loc (no DIP)",
    "id_only": "identity splice + L_noise + L_id on every sample (no attention capture)",
}


def side_fn(trainer, side: str, monitor: bool = True):
    """One step of `side`; monitor: the attention-health sums on (as training has them) or off."""
    import dataclasses

    import torch

    from training.run.data import IDENTITY, TEXT_ONLY

    cfg = trainer.config
    n = cfg.micro_batch
    batches = []
    for k in range(8 if side == "recipe" else 1):
        batch = trainer.loader.batch(list(range(k * n, (k + 1) * n)), trainer.latent_hw)
        if side == "baseline":
            batch.modes[:] = TEXT_ONLY
            batch.masked_noise[:] = False
        elif side != "recipe":
            batch.modes[:] = IDENTITY
            batch.timesteps = torch.linspace(0, 250, len(batch.timesteps)).long()
        batches.append(batch.to(trainer.dist.device))
    weights = {"baseline": {"loc_weight": 0.0, "id_weight": 0.0}, "loc_only": {"id_weight": 0.0},
               "id_only": {"loc_weight": 0.0}}.get(side, {})
    config = dataclasses.replace(cfg, **weights)
    turn = [0]

    def step():
        module = trainer.module
        module.config, module.monitor_health = config, monitor
        batch = batches[turn[0] % len(batches)]
        turn[0] += 1
        trainer.optimizer.zero_grad(set_to_none=True)
        total = module(batch)["total"]
        total.backward()
        # The trainer's one read per micro-batch: the loss, and the health sums with it.
        read = total.detach().float()[None]
        if module.health is not None:
            read = torch.cat([read, module.health.flatten().to(read)])
        read.cpu()
        trainer.optimizer.step()
    return step


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_side(full: bool, side: str) -> None:
    """Child process: peak RSS growth during 2 steps of one side (the CPU memory figure).
    RSS is sampled by a thread: ru_maxrss would report the model-loading peak instead."""
    import threading
    import time

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    trainer, _ = make_trainer(full)
    step = side_fn(trainer, side)
    before, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    for _ in range(2):
        step()
    done.set()
    watcher.join()
    print(json.dumps({"side": side, "growth_mb": peak[0] - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 UNet at 512 px")
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--memory-side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from headless.comfyui import find_comfyui, import_comfyui

    import_comfyui(cpu=None, path=find_comfyui())
    import torch

    if args.memory_side:
        return memory_side(args.full, args.memory_side)
    from benchmarks.harness import compare, header

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    trainer, resolution = make_trainer(args.full)
    cuda = torch.cuda.is_available()
    config = {"unet": "sd15-full" if args.full else "tiny-1-level", "vae": "kl (full SD VAE)", "px": resolution,
              "batch": trainer.config.micro_batch, "mode": "full UNet", "dtype": "bf16 autocast" if cuda else "fp32"}
    header("training step: PortraitBooth losses vs plain noise loss", **config)
    pairs = args.pairs or (5 if cuda else 3)
    base = side_fn(trainer, "baseline")
    sides = ("paper", "recipe", "loc_only", "id_only") if cuda or args.full else ("paper", "recipe")
    for side in sides:
        # The recipe's average step has the tighter target (cluster issue: <= 1.25x on a GPU).
        compare(f"train_step_{side}_vs_noise_only", base, side_fn(trainer, side), pairs=pairs,
                target=1.25 if side == "recipe" else 1.5,
                config={**config, "side": side, "what": SIDES[side]})
    # The collapse alarm's monitor (issue 23): the same `paper` step with and without it.
    compare("train_step_health_monitor_vs_without", side_fn(trainer, "paper", monitor=False),
            side_fn(trainer, "paper"), pairs=max(pairs, 5), target=1.03,
            config={**config, "side": "paper", "what": "attention-health sums on vs off (no extra UNet pass)"})
    memory = {}
    for side in ("baseline", "paper"):
        if cuda:
            fn = side_fn(trainer, side)
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            memory[side] = torch.cuda.max_memory_allocated() / 2**20
        else:
            cmd = [sys.executable, __file__, "--memory-side", side] + (["--full"] if args.full else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            memory[side] = json.loads(out)["growth_mb"]
    print(json.dumps({"name": "train_step_peak_memory_paper_vs_noise_only",
                      "ratio": round(memory["paper"] / max(memory["baseline"], 1e-6), 3), "spread": None,
                      "target": None, "device": __import__("benchmarks.harness").harness.device_name(),
                      "config": {**config, "measure": "cuda peak allocated" if cuda else "peak RSS growth (MiB)",
                                 **{f"{k}_mb": round(v, 1) for k, v in memory.items()}}}), flush=True)
    if cuda:
        import time

        fn = side_fn(trainer, "recipe")
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        ips = 5 * trainer.config.micro_batch / (time.perf_counter() - start)
        print(json.dumps({"name": "train_images_per_second", "value": round(ips, 2), "device":
                          torch.cuda.get_device_name(0), "config": {**config, "side": "recipe"}}), flush=True)


if __name__ == "__main__":
    main()
