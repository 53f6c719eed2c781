"""Export a run to the PortraitBooth weight file the nodes load (core `save_portraitbooth`).

UNet patch by mode: LoRA adapters as kohya keys; a fully trained UNet as weight
differences against the base checkpoint (`diffusion_model.<module>.diff`/`.diff_b`,
ComfyUI's "diff" patch); a frozen UNet as no patch. Metadata names the face encoder the
dataset's embeddings came from, the identity words with the synonyms the captions used
(so "a photo of a boy" works with a model whose captions said "boy"), the emotion words
and the run's settings.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from portraitbooth_core.vocabulary import DEFAULT_EMOTION_WORDS
from portraitbooth_core.weights.file import save_portraitbooth
from portraitbooth_core.weights.meta import FaceEncoderSpec

UNET_PREFIX = "model.diffusion_model."


def full_diff_patch(unet: torch.nn.Module, checkpoint: str | os.PathLike,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """trained - base for every UNet tensor that changed, in ComfyUI's diff key form."""
    from safetensors import safe_open

    patch = {}
    with safe_open(str(checkpoint), framework="pt", device="cpu") as f:
        names = set(f.keys())
        for name, param in unet.named_parameters():
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


def unet_patch(trainer) -> dict[str, torch.Tensor]:
    mode = trainer.config.mode
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
            "ema_decay": cfg.ema_decay, "recognizer_feature": cfg.recognizer_feature, **cfg.extra}


def class_words(index: dict) -> tuple[list[str] | None, dict[str, list[str]]]:
    """(identity words, {identity word: synonyms its captions used}) of a dataset index.
    The model learned the identity words (captions were normalized to them); the synonyms
    were in the captions as written, so the model accepts them too."""
    words = index.get("identity_words") or None
    synonyms = {w: list(s) for w, s in (index.get("class_synonyms") or {}).items() if words and w in words}
    return words, synonyms


def export(trainer, path: str | os.PathLike | None = None) -> Path:
    """Write the weight file (EMA weights when EMA is on)."""
    path = Path(path or Path(trainer.config.output) / trainer.config.export_name)
    face = trainer.reader.index["face_encoder"]
    spec = FaceEncoderSpec(kind=face["kind"], dim=int(face["dim"]), feature=face.get("feature", "final"))
    words, synonyms = class_words(trainer.reader.index)

    def write() -> Path:
        projector = trainer.module.projector
        return save_portraitbooth(path, projector, spec, unet_patch(trainer), class_words=words,
                                  emotion_words=DEFAULT_EMOTION_WORDS, training=training_metadata(trainer),
                                  class_synonyms=synonyms)

    if trainer.ema is not None:
        with trainer.ema.applied():
            return write()
    return write()
