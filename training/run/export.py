"""Export a run to the PortraitBooth weight file the nodes load (core `save_portraitbooth`).

UNet patch by mode: LoRA adapters as kohya keys; a fully trained UNet as weight
differences against the base checkpoint (`diffusion_model.<module>.diff`/`.diff_b`,
ComfyUI's "diff" patch); a frozen UNet as no patch. A run warm-started from another UNet
(init_unet) exports its whole UNet, LoRA folded in, as differences against the base
checkpoint whatever the mode: the patch is applied to the checkpoint, not to that UNet.
Metadata names the face encoder the dataset's embeddings came from, the identity words
with the synonyms the captions used (so "a photo of a boy" works with a model whose
captions said "boy"), the emotion words and the run's settings (and warm start).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from portraitbooth_core.vocabulary import DEFAULT_EMOTION_WORDS
from .stage0 import export_metadata as warm_start_metadata
from portraitbooth_core.weights.file import save_portraitbooth
from portraitbooth_core.weights.finite import NonFiniteWeightsError, describe_names, non_finite_names
from portraitbooth_core.weights.meta import PROJECTOR_PREFIX, FaceEncoderSpec

UNET_PREFIX = "model.diffusion_model."


def full_diff_patch(unet: torch.nn.Module | Mapping[str, torch.Tensor], checkpoint: str | os.PathLike,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """trained - base for every UNet tensor that changed, in ComfyUI's diff key form.
    unet: the module, or its weights by parameter name (merged_lora_weights)."""
    from safetensors import safe_open

    patch = {}
    weights = unet.items() if isinstance(unet, Mapping) else unet.named_parameters()
    with safe_open(str(checkpoint), framework="pt", device="cpu") as f:
        names = set(f.keys())
        for name, param in weights:
            key = UNET_PREFIX + name
            if key not in names:
                continue
            diff = param.detach().float().cpu() - f.get_tensor(key).float()
            if not torch.any(diff):
                continue
            stem, kind = name.rsplit(".", 1)
            suffix = ".diff" if kind == "weight" else ".diff_b" if kind == "bias" else None
            if suffix is None:
                continue
            patch[f"diffusion_model.{stem}{suffix}"] = diff.to(dtype).contiguous()
    return patch


def merged_lora_weights(unet: torch.nn.Module, lora) -> dict[str, torch.Tensor]:
    """The UNet's parameters with each LoRA adapter's W += alpha/rank * up @ down folded
    in (what the forward hooks compute), on the CPU in float32."""
    weights = {n: p.detach().float().cpu() for n, p in unet.named_parameters()}
    for key, adapter in lora.adapters.items():
        name = f"{lora.names[key]}.weight"
        up, down = adapter.up.weight.detach().float().cpu(), adapter.down.weight.detach().float().cpu()
        # Linear: [out, r] @ [r, in]; Conv2d: the 1x1 up conv mixes the down conv's r kernels.
        delta = torch.einsum("or,r...->o...", up.flatten(1), down)
        weights[name] = weights[name] + delta * (adapter.alpha / adapter.rank)
    return weights


def unet_patch(trainer) -> dict[str, torch.Tensor]:
    mode = trainer.config.mode
    if trainer.config.init_unet:
        # Warm-started: the UNet trained on is not the checkpoint's, so a LoRA (or no patch)
        # alone would be applied to the wrong weights. Export the whole difference against
        # the checkpoint: applied to it (Load PortraitBooth Model) it is the trained UNet.
        weights = merged_lora_weights(trainer.models.unet, trainer.models.lora) if mode == "lora" \
            else trainer.models.unet
        return full_diff_patch(weights, trainer.config.checkpoint)
    if mode == "lora":
        return trainer.models.lora.export()
    if mode == "full":
        return full_diff_patch(trainer.models.unet, trainer.config.checkpoint)
    return {}


def training_metadata(trainer) -> dict:
    cfg = trainer.config
    return {"mode": cfg.mode, "steps": trainer.step, "lr": cfg.learning_rate, "global_batch": trainer.global_batch,
            "resolution": int(trainer.reader.index["resolution"]), "samples": len(trainer.reader),
            "base_checkpoint": Path(cfg.checkpoint).name,
            "loss_weights": {"noise": cfg.noise_weight, "loc": cfg.loc_weight, "id": cfg.id_weight},
            "id_max_timestep": cfg.id_max_timestep, "p_text_only": cfg.p_text_only, "p_uncond": cfg.p_uncond,
            "p_masked_noise": cfg.p_masked_noise,
            "ecac": {"beta": cfg.ecac_beta, "gamma": cfg.ecac_gamma, "lambda": cfg.ecac_lambda, "mu": cfg.ecac_mu,
                     "layers": cfg.loc_layers},
            "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha} if cfg.mode == "lora" else None,
            "ema_decay": cfg.ema_decay, "recognizer_feature": cfg.recognizer_feature,
            **({"warm_start": warm_start_metadata(trainer)} if cfg.init_unet or cfg.stage0_steps > 0 else {}),
            **cfg.extra}


def warm_start_source(trainer) -> dict | None:
    """The file's `source`: a warm-started model derives from FastComposer's weights (MIT),
    whose origin import-fastcomposer stamped on the files it wrote."""
    meta = warm_start_metadata(trainer)
    if not meta:
        return None
    stamp = (meta.get("unet") or {}).get("source") or (meta.get("stage0") or {}).get("teacher_source") or {}
    return {"warm_start": {"unet": (meta.get("unet") or {}).get("file"),
                           "stage0_teacher": (meta.get("stage0") or {}).get("teacher"),
                           **{k: stamp[k] for k in ("model", "repository", "weights", "license") if k in stamp}}}


def class_words(index: dict) -> tuple[list[str] | None, dict[str, list[str]]]:
    """(identity words, {identity word: synonyms its captions used}) of a dataset index.
    The model learned the identity words (captions were normalized to them); the synonyms
    were in the captions as written, so the model accepts them too."""
    words = index.get("identity_words") or None
    synonyms = {w: list(s) for w, s in (index.get("class_synonyms") or {}).items() if words and w in words}
    return words, synonyms


def _divergence_cause(trainer, trained_finite: bool | None) -> str:
    """The setting that most likely made the weights non-finite, in the words of the settings."""
    cfg = trainer.config
    if trained_finite:  # EMA on, its average broken, the trained weights fine
        decay = getattr(trainer.ema, "decay", cfg.ema_decay)
        return (f"the EMA average is not finite while the trained weights are: ema_decay (now {decay:g}) must lie "
                f"in [0, 1), e.g. 0.999, or be 0 to export the trained weights without EMA")
    return (f"the training diverged: lower the learning rate lr (now {cfg.learning_rate:g}) or the loss weights "
            f"(noise_weight, loc_weight, id_weight), and train again from an earlier checkpoint or from the start")


def export(trainer, path: str | os.PathLike | None = None) -> Path:
    """Write the weight file (EMA weights when EMA is on). Weights holding NaN or infinity are
    refused before anything is written (NonFiniteWeightsError naming the tensors and the setting
    that likely caused them): such a file would load and give black images."""
    path = Path(path or Path(trainer.config.output) / trainer.config.export_name)
    face = trainer.reader.index["face_encoder"]
    spec = FaceEncoderSpec(kind=face["kind"], dim=int(face["dim"]), feature=face.get("feature", "final"))
    words, synonyms = class_words(trainer.reader.index)
    # Read before the EMA weights are swapped in: tells a broken average from a diverged run.
    trained_finite = not non_finite_names(dict(trainer.ema.params)) if trainer.ema is not None else None

    def write() -> Path:
        projector = trainer.module.projector
        patch = unet_patch(trainer)
        bad = non_finite_names({PROJECTOR_PREFIX + k: v for k, v in projector.state_dict().items()} | dict(patch))
        if bad:
            raise NonFiniteWeightsError(
                f"export: {path.name} not written: {len(bad)} tensor(s) hold non-finite values (NaN or infinity): "
                f"{describe_names(bad)}. Likely cause: {_divergence_cause(trainer, trained_finite)}.")
        return save_portraitbooth(path, projector, spec, patch, class_words=words,
                                  emotion_words=DEFAULT_EMOTION_WORDS, training=training_metadata(trainer),
                                  class_synonyms=synonyms, source=warm_start_source(trainer))

    if trainer.ema is not None:
        with trainer.ema.applied():
            return write()
    return write()
