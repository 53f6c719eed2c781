"""Training-step time with precomputed latents + text encodings vs encoding in the step.

Same trainer, same micro-batch, same weights; a step is forward + backward + AdamW update.
  baseline   the step encodes: VAE encode of the images, CLIP encode of the captions
             with a cold text cache (a real dataset's captions rarely repeat; the cache
             holds 2048)
  warm       the step encodes the images, captions come from the warm text cache
  candidate  precomputed inputs (`python -m training precompute`): no VAE/CLIP encode
Ratio = candidate / baseline (lower is better). Models: the tests' stand-in
(standins/sd15.py: tiny UNet, CLIP-L, TAESD) and the training benchmark's (tiny UNet,
CLIP-L, the full KL VAE of SD1.5); the tiny UNet makes the encodes' share far larger than
with SD1.5's real UNet, so read the absolute seconds saved, not only the ratio.

    OMP_NUM_THREADS=1 python benchmarks/precompute_gain.py [--resolution 64] [--pairs 5] [--full]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

from benchmarks.train_standins import build_checkpoint, build_dataset, cache_dir  # noqa: E402


def checkpoints(full: bool) -> dict[str, Path]:
    from standins.sd15 import build_sd15_checkpoint

    if full:  # the full-size SD1.5 UNet with its KL VAE: the share the encodes have for real
        return {"sd15-full-klvae": build_checkpoint(True)}
    return {"standin-taesd": build_sd15_checkpoint(cache_dir() / "sd15_standin_taesd.safetensors"),
            "standin-klvae": build_checkpoint(False)}


def step_fns(trainer):
    import torch

    n = trainer.config.micro_batch
    pre = trainer.loader.batch(list(range(n)), trainer.latent_hw).to(trainer.dist.device)
    assert pre.latents is not None, "the dataset copy has no precomputed inputs"
    live = dataclasses.replace(pre, latents=None, text=None)

    def make(batch, cold: bool):
        def step():
            if cold:
                trainer.module.text.cache.clear()
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.module(batch)["total"].backward()
            trainer.optimizer.step()
        return step

    torch.manual_seed(0)
    return make(live, True), make(live, False), make(pre, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 at 512 px, batch 4 (a GPU)")
    args = parser.parse_args()
    if args.full:
        args.resolution, args.micro_batch = 512, 4
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from headless.comfyui import find_comfyui, import_comfyui

    import_comfyui(cpu=None, path=find_comfyui())
    import torch

    from benchmarks.harness import compare, header
    from training.config import load_config
    from training.run.distributed import Dist
    from training.build.precompute import precompute
    from training.run.trainer import Trainer

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = build_dataset(args.resolution, args.full)
    for name, checkpoint in checkpoints(args.full).items():
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            shutil.copytree(source, data, ignore=shutil.ignore_patterns("index.compact.*", "precomputed"))
            report = precompute(str(data), str(checkpoint), device, progress=False)
            config = load_config(None, {"checkpoint": str(checkpoint), "dataset": str(data), "output": str(Path(tmp) / "run"),
                                        "micro_batch": args.micro_batch, "save_every": 10**6, "log_every": 10**6,
                                        "id_max_timestep": 999})
            trainer = Trainer(config, Dist(device=device), resume=False)
            try:
                cold, warm, pre = step_fns(trainer)
                info = {"model": name, "px": args.resolution, "batch": args.micro_batch, "mode": config.mode,
                        "precompute_s_per_sample": round(report["seconds"] / max(report["samples"], 1), 3)}
                header("training step with precomputed inputs vs encoding in the step", **info)
                compare("precomputed_vs_encode_cold_text", cold, pre, pairs=args.pairs,
                        config={**info, "baseline": "VAE encode + CLIP encode (cold cache)"})
                compare("precomputed_vs_encode_warm_text", warm, pre, pairs=args.pairs,
                        config={**info, "baseline": "VAE encode, captions from the warm cache"})
            finally:
                trainer.close()


if __name__ == "__main__":
    main()
