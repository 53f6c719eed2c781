"""The four trainings of the evidence run (full / w/o STEA / w/o DIP / w/o ECAC): the
real `training.trainer.Trainer` with its real losses, same seed, data order and steps.

The UNet is ComfyUI's own UNetModel with SD1.5's layout (one level, 768-d text context)
but 64 channels instead of 320: on two CPU cores a 320-channel UNet makes every run
~20x slower. ComfyUI detects SD1.5 only at 320 channels, so the checkpoint (CLIP-L,
pooling VAE) loads through `training.models.load_models` and its UNet is then swapped
for the small one, initialised the usual way for diffusion UNets: random weights, with
the output convolution and every residual branch's last layer at zero, so training
starts from a model that predicts zero noise instead of from a random output.

Each seed first pretrains that UNet into a text-to-image model of the task (noise loss
only, captions without the face embedding: what SD1.5 is to PortraitBooth); every row
then fine-tunes the same base. From scratch, L_loc has no face-aware features to work
with and either moves nothing or drives the identity token's attention to zero.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

ABLATIONS = ("full", "no_stea", "no_dip", "no_ecac")
LABELS = {"full": "full", "no_stea": "w/o STEA", "no_dip": "w/o DIP", "no_ecac": "w/o ECAC"}
# The collapse study (`--collapse-study`, collapse.py): the full run (paper L_loc at the evidence
# weights), the same with L_loc's log floor, and the paper's own weights lambda 0.001, mu 0.01.
STUDY = ("full", "log_floor", "paper_weights")
# Not run unless named (--only): the log floor at the paper's weights.
STUDY_EXTRA = ("log_floor_paper_weights",)
STUDY_LABELS = {"full": "paper L_loc, lambda = mu = 1 (the evidence's)", "log_floor": "log floor, lambda = mu = 1",
                "paper_weights": "paper L_loc, lambda 0.001, mu 0.01 (the paper's)",
                "log_floor_paper_weights": "log floor, lambda 0.001, mu 0.01"}
SMALL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1],
                  channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                  transformer_depth_middle=1, num_heads=4, use_spatial_transformer=True,
                  use_linear_in_transformer=False, context_dim=768, legacy=False)
# Residual branches whose last layer a diffusion UNet starts at zero (ResBlock outputs,
# transformer projections) and the UNet's output convolution.
ZERO_INIT = (".out_layers.3.", ".proj_out.", "out.2.")


# The paper's lambda = 0.001 and mu = 0.01 suit SD1.5, whose cross-attention already
# finds faces: here L_loc then moves nothing in a few hundred steps. At 1.0 it does.
EVIDENCE_SETTINGS = {"ecac_lambda": 1.0, "ecac_mu": 1.0}


@dataclass(frozen=True)
class Plan:
    """Everything that sets one seed's runs: the world, the base's pretraining, the fine-tuning."""

    resolution: int = 64
    identities: int = 8
    train_per_identity: int = 16
    held_out_per_identity: int = 2
    steps: int = 600
    micro_batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    stea_timesteps: tuple[int, ...] = (200, 400, 600, 800)
    dip_timesteps: tuple[int, ...] = (50, 150, 250)   # DIP's range: t <= R_t = 250
    pretrain_steps: int = 1000                        # shared text-to-image base (0: from scratch)
    settings: dict = field(default_factory=lambda: dict(EVIDENCE_SETTINGS))  # TrainConfig overrides, all runs


def small_unet(seed: int):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from standins.sd15 import randomize

    unet = UNetModel(**SMALL_UNET, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    randomize(unet, seed)  # ComfyUI's layers leave weights uninitialised
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if any(part in f".{name}" for part in ZERO_INIT):
                p.zero_()
    return unet


def load_small_models(config, device: torch.device, base: Path | None = None):
    """`training.models.load_models` on the checkpoint, with the small UNet in place
    (fresh, the pretrained `base` weights, or config.init_unet's through the warm start's
    own loader, which checks them against this UNet)."""
    from training.models.load import Models, load_models

    loaded = load_models(dataclasses.replace(config, mode="frozen", init_unet=""), device)
    unet = small_unet(config.seed).to(device)
    warm = None
    if config.init_unet:
        from training.models.warm_start import load_init_unet

        warm = load_init_unet(unet, config.init_unet)
    elif base is not None:
        from safetensors.torch import load_file

        unet.load_state_dict(load_file(str(base)))
    loaded.base.diffusion_model = unet
    unet.requires_grad_(config.mode == "full")
    return Models(loaded.patcher, loaded.base, unet, loaded.clip, loaded.vae, device, warm_start=warm,
                  encoders_from=loaded.encoders_from)


def ablation_settings(name: str, datasets: dict[str, Path]) -> dict:
    """TrainConfig overrides of one row. Without STEA the projector still runs but its
    face embedding is drawn independently of the target (see dataset.uninformative_embeddings):
    the class token then carries no identity, which is what removing STEA takes away."""
    return {"full": {}, "no_stea": {"dataset": str(datasets["uninformative"])},
            "no_dip": {"id_weight": 0.0}, "no_ecac": {"loc_weight": 0.0},
            "log_floor": {"loc_floor": "log"}, "paper_weights": {"ecac_lambda": 0.001, "ecac_mu": 0.01},
            "log_floor_paper_weights": {"loc_floor": "log", "ecac_lambda": 0.001, "ecac_mu": 0.01}}[name]


# The base: a text-to-image model of the task (noise loss only, no face embedding),
# as SD1.5 is to PortraitBooth. Every ablation fine-tunes the same base.
PRETRAIN = {"loc_weight": 0.0, "id_weight": 0.0, "p_text_only": 0.9, "p_uncond": 0.1}


def _trainer(plan: Plan, name: str, checkpoint: Path, dataset: Path, output: Path, steps: int,
             overrides: dict, base: Path | None, projector=None):
    from training.config import STEPS_MAX, load_config
    from training.run.distributed import Dist
    from training.run.trainer import Trainer

    settings = {"checkpoint": str(checkpoint), "dataset": str(dataset), "output": str(output / name),
                "mode": "full", "micro_batch": plan.micro_batch, "lr": plan.lr, "steps": steps,
                # save and log after the last step only: the largest step count a setting takes
                "seed": plan.seed, "save_every": STEPS_MAX, "log_every": STEPS_MAX, "projector_hidden": 256,
                # 64 px samples decode in microseconds: loader worker processes would only add
                # start-up and hand-over costs to runs that already share the cores (--jobs).
                "num_workers": 0, **overrides}
    config = load_config(None, settings)
    dist = Dist(device=torch.device("cpu"))
    torch.manual_seed(plan.seed)
    return Trainer(config, dist, resume=False, models=load_small_models(config, dist.device, base),
                   projector=projector)


def _steps(trainer, name: str, steps: int, progress) -> list[dict]:
    """Every step's logged values; the collapse alarm watches each (as a run logging every
    step does) and its alarms are kept in `trainer.alarms` (step, token, text)."""
    history = []
    trainer.alarms = []
    for step in range(steps):
        history.append(trainer.train_step())
        for alarm in trainer.watch(history[-1]):
            trainer.alarms.append({"step": alarm.step, "token": alarm.token, "text": alarm.describe()})
        if progress is not None:
            progress(name, step + 1, steps, history[-1])
    return history


def pretrain(plan: Plan, checkpoint: Path, dataset: Path, work: Path, progress=None) -> Path | None:
    """The shared base UNet (safetensors), trained once per plan and reused from `work`."""
    if plan.pretrain_steps <= 0:
        return None
    from safetensors.torch import save_file

    # What the base depends on: not the fine-tuning length, measurements or loss settings it switches off.
    fields = {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("steps", "stea_timesteps", "dip_timesteps")}
    fields["settings"] = {k: v for k, v in plan.settings.items() if k not in PRETRAIN and not k.startswith("ecac_")}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(work) / f"base-{key}.safetensors"
    if path.is_file():
        return path
    trainer = _trainer(plan, "pretrain", checkpoint, dataset, Path(work) / "runs", plan.pretrain_steps,
                       {**plan.settings, **PRETRAIN}, None)
    try:
        _steps(trainer, "pretrain", plan.pretrain_steps, progress)
        state = {k: v.detach().contiguous() for k, v in trainer.models.unet.state_dict().items()}
    finally:
        trainer.close()
    tmp = path.with_suffix(".part")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path


def train(plan: Plan, name: str, checkpoint: Path, datasets: dict[str, Path], output: Path, progress=None,
          base: Path | None = None):
    """One trained Trainer (the caller closes it), fine-tuned from `base` when given."""
    overrides = {**plan.settings, **ablation_settings(name, datasets)}
    dataset = overrides.pop("dataset", datasets["true"])
    trainer = _trainer(plan, name, checkpoint, dataset, output, plan.steps, overrides, base)
    trainer.history = _steps(trainer, name, plan.steps, progress)
    return trainer
