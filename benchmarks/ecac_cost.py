"""Per-step cost of the ECAC patch: patched vs unpatched UNet evaluation (CFG batch of 2).

Quick mode (default): the tiny one-level test UNet at a 32x32 latent. --full: a
full-size SD1.5 UNet (random weights) at a 64x64 latent (512 px). Two figures each:
expression control on (strength 1, face mask, maps captured) and capture only
(strength 0). Target: within 10% (ratio <= 1.10).

    OMP_NUM_THREADS=1 python benchmarks/ecac_cost.py [--full] [--pairs N]
"""
from __future__ import annotations

import argparse
import os

if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

# SD1.5's UNet as comfy/model_detection.py describes it.
SD15_FULL = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1, num_heads=8,
    use_spatial_transformer=True, use_linear_in_transformer=False, context_dim=768, legacy=False,
)


def build(full: bool):
    import comfy.sd

    from standins.sd15 import tiny_unet_state_dict

    overrides = SD15_FULL if full else {}
    model = comfy.sd.load_diffusion_model_state_dict(tiny_unet_state_dict(0, **overrides))
    if model is None:
        raise RuntimeError("ComfyUI did not detect the stand-in UNet")
    return model


def step_fn(model, latent: int):
    """One CFG-batched UNet evaluation the way the sampler calls it (cond + uncond)."""
    import comfy.model_management
    import torch

    gen = torch.Generator().manual_seed(0)
    device = comfy.model_management.get_torch_device()
    x = torch.randn(2, 4, latent, latent, generator=gen).to(device)
    ctx = torch.randn(2, 77, 768, generator=gen).to(device)
    sigma = torch.full((2,), 5.0, device=device)
    comfy.model_management.load_models_gpu([model])

    def run():
        to = dict(model.model_options.get("transformer_options", {}))
        to.update(cond_or_uncond=[1, 0], sigmas=sigma[:1])
        with torch.no_grad():
            model.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 UNet at a 64x64 latent")
    parser.add_argument("--pairs", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from headless import comfyui as host

    host.import_comfyui(cpu=not _cuda())
    import torch

    from benchmarks.harness import compare, header
    from portraitbooth_core.ecac.control import ControlSettings

    import importlib

    pack = host.import_node_pack()  # the pack as ComfyUI imports it
    ecac = importlib.import_module(f"{pack.__name__}.nodes.ecac")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    latent = 64 if args.full else 32
    pairs = args.pairs or (3 if args.full and not _cuda() else 7)
    config = {"unet": "sd15-full" if args.full else "tiny-1-level", "latent": latent, "batch": "cfg 2"}
    header("ECAC patch cost per UNet evaluation", **config)
    model = build(args.full)
    labels = {"woman": [5], "smiling": [4]}
    mask = torch.zeros(latent * 8, latent * 8)
    mask[: latent * 4, latent * 2: latent * 6] = 1
    base = step_fn(model, latent)
    control, _ = ecac.apply_ecac(model, [5], [4], labels, ControlSettings(strength=1.0), mask)
    compare("ecac_control_step", base, step_fn(control, latent), pairs=pairs, target=1.10,
            config={**config, "strength": 1.0, "capture": True})
    capture, _ = ecac.apply_ecac(model, [5], [4], labels, ControlSettings(strength=0.0))
    compare("ecac_capture_only_step", base, step_fn(capture, latent), pairs=pairs, target=1.10,
            config={**config, "strength": 0.0, "capture": True})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
