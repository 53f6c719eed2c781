"""Wall time of multi-subject generation against one subject, same steps, both modes.

Baseline: one subject the ordinary way (its STEA conditioning into ComfyUI's sampler, as
the single-subject template does). Candidates: the Multi-Subject Region Sampler with 2
and 4 subjects side by side, in 'regional attention' and 'multidiffusion' mode. Target:
regional attention <= 1.3x for two subjects; multidiffusion reported beside it (the
paper's MultiDiffusion took 9x).

Conditionings are shaped like Apply STEA Conditioning's output (77 tokens, the class-token
positions in the cond dict); their values do not change the cost, so no CLIP is loaded.

    OMP_NUM_THREADS=1 python benchmarks/regions_cost.py [--full] [--pairs N] [--steps N]

Quick mode (default): the tiny one-level test UNet at a 32x32 latent, 4 steps.
--full: a full-size SD1.5 UNet (random weights) at a 64x64 latent (512x512 image).
"""
from __future__ import annotations

import argparse
import importlib
import os

if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

CLASS_POSITION = 5  # "a photo of a man": <start> a photo of a man -> man at 5


def stea_like(seed: int) -> list:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=gen),
             {"portraitbooth": {"class_positions": [CLASS_POSITION], "base": "sd15"}}]]


def generation(model, sampling, positive, negative, regions, latent: int, steps: int, mode: str | None):
    """One full generation (noise -> latent) of `steps` Euler steps at CFG 5."""
    import comfy.sample
    import torch

    empty = {"samples": torch.zeros(1, 4, latent, latent)}

    def run():
        if mode is None:  # one subject, plain ComfyUI sampling
            noise = comfy.sample.prepare_noise(empty["samples"], 0)
            comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, empty["samples"],
                                seed=0, disable_pbar=True)
        else:
            sampling.sample_regions(model, positive, negative, regions, empty, 0, steps, 5.0, "euler", "normal",
                                    1.0, mode)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 UNet at a 64x64 latent")
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--subjects", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from headless import comfyui as host

    host.import_comfyui(cpu=not _cuda())
    import torch

    import comfy.utils

    from benchmarks.ecac_cost import build
    from benchmarks.harness import compare, header

    host.import_node_pack()  # the pack as ComfyUI imports it (relative imports work)
    sampling = importlib.import_module("portraitbooth_pack_under_test.nodes.region_sampling")
    comfy.utils.PROGRESS_BAR_ENABLED = False  # no console bar inside timed runs
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    latent = 64 if args.full else 32
    slow = args.full and not _cuda()
    steps = args.steps or (1 if slow else 4 if not args.full else 20)
    pairs = args.pairs or (1 if slow else 5)
    config = {"unet": "sd15-full" if args.full else "tiny-1-level", "latent": latent, "steps": steps,
              "sampler": "euler", "cfg": 5.0, "dtype": "fp32" if not _cuda() else "model default"}
    header("Multi-subject region sampler vs one subject", **config)
    model = build(args.full)
    negative = [[torch.zeros(1, 77, 768), {}]]
    single = stea_like(0)
    scene = [[single[0][0], {}]]  # the global prompt of the multi-subject runs: same tokens, no subject
    baseline = generation(model, sampling, single, negative, None, latent, steps, None)
    for mode, tag in (("regional attention", "attention"), ("multidiffusion", "multidiffusion")):
        for n in args.subjects:
            regions = [sampling.Region(stea_like(i + 1), None, 1.0, f"region {i + 1}") for i in range(n)]
            candidate = generation(model, sampling, scene, negative, regions, latent, steps, mode)
            compare(f"regions_{tag}_{n}_subjects", baseline, candidate, pairs=pairs, warmup=0 if slow else 1,
                    target=1.3 if (tag == "attention" and n == 2) else None,
                    config={**config, "subjects": n, "mode": mode, "layout": "auto side by side"})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
