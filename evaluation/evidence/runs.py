"""The four trainings of the evidence run (full / w/o STEA / w/o DIP / w/o ECAC): the
real `training.trainer.Trainer` with its real losses, same seed, data order and steps.

The UNet is ComfyUI's own UNetModel with SD1.5's layout (one level, 768-d text context)
but 64 channels instead of 320: on two CPU cores a 320-channel UNet makes every run
~20x slower. ComfyUI detects SD1.5 only at 320 channels, so the checkpoint (CLIP-L,
pooling VAE) loads through `training.models.load_models` and its UNet is then swapped
for the small one, initialised the usual way for diffusion UNets: random weights, with
the output convolution and every residual branch's last layer at zero, so training
starts from a model that predicts zero noise instead of from a random output.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

ABLATIONS = ("full", "no_stea", "no_dip", "no_ecac")
LABELS = {"full": "full", "no_stea": "w/o STEA", "no_dip": "w/o DIP", "no_ecac": "w/o ECAC"}
SMALL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1],
                  channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                  transformer_depth_middle=1, num_heads=4, use_spatial_transformer=True,
                  use_linear_in_transformer=False, context_dim=768, legacy=False)
# Residual branches whose last layer a diffusion UNet starts at zero (ResBlock outputs,
# transformer projections) and the UNet's output convolution.
ZERO_INIT = (".out_layers.3.", ".proj_out.", "out.2.")


@dataclass(frozen=True)
class Plan:
    """Everything that sets a run's size; `quick()`: a ~2-minute smoke run (too short for the effects)."""

    resolution: int = 64
    identities: int = 8
    train_per_identity: int = 16
    held_out_per_identity: int = 2
    steps: int = 300
    micro_batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    stea_timesteps: tuple[int, ...] = (200, 400, 600, 800)
    dip_timesteps: tuple[int, ...] = (50, 150, 250)   # DIP's range: t <= R_t = 250
    settings: dict = field(default_factory=dict)     # TrainConfig overrides shared by all four runs

    @classmethod
    def quick(cls) -> "Plan":
        return cls(steps=120, train_per_identity=8)


def small_unet(seed: int):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from comfy_host.standins import _randomize

    unet = UNetModel(**SMALL_UNET, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    _randomize(unet, seed)  # ComfyUI's layers leave weights uninitialised
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if any(part in f".{name}" for part in ZERO_INIT):
                p.zero_()
    return unet


def load_small_models(config, device: torch.device):
    """`training.models.load_models` on the checkpoint, with the small UNet in place."""
    from training.models import Models, load_models

    loaded = load_models(dataclasses.replace(config, mode="frozen"), device)
    unet = small_unet(config.seed).to(device)
    loaded.base.diffusion_model = unet
    unet.requires_grad_(config.mode == "full")
    return Models(loaded.patcher, loaded.base, unet, loaded.clip, loaded.vae, device)


def ablation_settings(name: str, datasets: dict[str, Path]) -> dict:
    """TrainConfig overrides of one row. Without STEA the projector still runs but its
    face embedding is drawn independently of the target (see dataset.uninformative_embeddings):
    the class token then carries no identity, which is what removing STEA takes away."""
    return {"full": {}, "no_stea": {"dataset": str(datasets["uninformative"])},
            "no_dip": {"id_weight": 0.0}, "no_ecac": {"loc_weight": 0.0}}[name]


def train(plan: Plan, name: str, checkpoint: Path, datasets: dict[str, Path], output: Path, progress=None):
    """One trained Trainer (the caller closes it)."""
    from training.config import load_config
    from training.distributed import Dist
    from training.trainer import Trainer

    settings = {"checkpoint": str(checkpoint), "dataset": str(datasets["true"]), "output": str(output / name),
                "mode": "full", "micro_batch": plan.micro_batch, "lr": plan.lr, "steps": plan.steps,
                "seed": plan.seed, "save_every": 10**9, "log_every": 10**9, "projector_hidden": 256,
                **plan.settings, **ablation_settings(name, datasets)}
    config = load_config(None, settings)
    dist = Dist(device=torch.device("cpu"))
    torch.manual_seed(plan.seed)
    trainer = Trainer(config, dist, resume=False, models=load_small_models(config, dist.device))
    history = []
    for step in range(plan.steps):
        history.append(trainer.train_step())
        if progress is not None:
            progress(name, step + 1, plan.steps, history[-1])
    trainer.history = history
    return trainer
