"""The three measurements of the evidence run, on a trained `training.trainer.Trainer`
and held-out batches. Each reuses the training code it checks: the same conditioning
splice, the same attention capture, the same DIP decode-crop-recognize path.
"""
from __future__ import annotations

import dataclasses

import torch

from portraitbooth_core.ecac.capture import AttentionCapture
from portraitbooth_core.ecac.health import attention_sums, layer_groups, summarize
from portraitbooth_core.ecac.loss import resize_mask
from portraitbooth_core.ecac.layers import install_on_layers
from portraitbooth_core.dip.estimate import noised_latent, sigma_at
from portraitbooth_core.dip.identity_loss import dip_identity_loss


def _noisy(trainer, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean latent, noisy latent, sigma) as TrainModule.forward makes them."""
    models = trainer.models
    z0 = models.encode_pixels(batch.images)
    sigma = sigma_at(models.alphas_cumprod.to(models.device), batch.timesteps)
    return z0, noised_latent(z0, batch.noise, sigma), sigma


def with_embeddings(batch, embeddings: torch.Tensor):
    return dataclasses.replace(batch, embeddings=embeddings)


@torch.no_grad()
def denoising_loss(trainer, batch) -> float:
    """Held-out noise MSE inside the face (batch.masked_noise), the L_noise of training."""
    module = trainer.module
    saved = module.config
    module.config = dataclasses.replace(saved, loc_weight=0.0, id_weight=0.0, noise_weight=1.0)
    try:
        return float(module(batch)["noise"])
    finally:
        module.config = saved


def stea_effect(trainer, batch, shuffled: torch.Tensor) -> dict:
    """Denoising loss with each sample's own reference embedding vs another identity's.
    margin = shuffled / true - 1: how much worse the model denoises with the wrong face."""
    true = denoising_loss(trainer, batch)
    wrong = denoising_loss(trainer, with_embeddings(batch, shuffled))
    return {"loss_true": true, "loss_shuffled": wrong, "margin": wrong / true - 1.0}


@torch.no_grad()
def ecac_effect(trainer, batch) -> dict:
    """On the layers L_loc trains: the identity token's share of its attention mass that
    falls inside the face mask (vs the mask's share of the image), the expression token's
    mean attention probability inside the mask (vs gamma), and per layer both tokens'
    mean probability in the face core (cells wholly inside the mask at that layer's
    resolution; at 8x8 half the face's cells are border cells, part background), where
    L_loc asks for at least beta and gamma."""
    module, models, cfg = trainer.module, trainer.models, trainer.config
    capture = AttentionCapture({"identity": batch.identity_positions, "expression": batch.expression_positions},
                               differentiable=True)  # keeps every layer's maps (no store needed)
    attn2: dict = {}
    install_on_layers(attn2, module.layers, lambda _layer: capture)
    _, x, sigma = _noisy(trainer, batch)
    models.base.apply_model(x, sigma, c_crossattn=module.conditioning(batch),
                            transformer_options={"patches_replace": {"attn2": attn2}})
    id_share, expr_inside, mask_share, per_layer = [], [], [], {}
    layers = capture.pop_layers()
    # The training monitor's own numbers (portraitbooth_core.ecac.health) on the held-out batch.
    groups = layer_groups(n for n, _ in layers)
    has_expr = torch.tensor([float(bool(p)) for p in batch.expression_positions])
    health = summarize(attention_sums(layers, batch.masks, torch.ones(len(has_expr)), has_expr, groups), groups)
    for name, maps in layers:
        m = resize_mask(batch.masks.to(maps.device), tuple(maps.shape[-2:]))
        a_i, a_j = maps[:, 0], maps[:, 1]
        id_share.append(((a_i * m).flatten(1).sum(1) / a_i.flatten(1).sum(1).clamp_min(1e-12)).mean())
        expr_inside.append(((a_j * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-12)).mean())
        mask_share.append(m.flatten(1).mean(1).mean())
        core, outside = (m >= 0.99).float(), (m <= 0.01).float()
        per_layer[name] = {k: float((a * w).sum() / w.sum().clamp_min(1)) for k, a, w in (
            ("identity_core", a_i, core), ("expression_core", a_j, core), ("identity_outside", a_i, outside))}
    share, mask = float(torch.stack(id_share).mean()), float(torch.stack(mask_share).mean())
    return {"identity_share_in_mask": share, "mask_share": mask, "identity_concentration": share / mask,
            "expression_mean_in_mask": float(torch.stack(expr_inside).mean()),
            "gamma": cfg.ecac_gamma, "beta": cfg.ecac_beta, "layers": len(id_share), "per_layer": per_layer,
            "health": health}


@torch.no_grad()
def dip_effect(trainer, batch, recognizer) -> dict:
    """Recognizer cosine between the reference and the decoded one-step estimate z0_hat
    (DIP's own decode/crop/recognize path), plus the same for the clean target's latent
    (what a perfect denoiser would score: renderings differ, so it is below 1)."""
    models, cfg = trainer.models, trainer.config
    z0, x, sigma = _noisy(trainer, batch)
    denoised = models.base.apply_model(x, sigma, c_crossattn=trainer.module.conditioning(batch)).float()

    def similarity(latents: torch.Tensor) -> float:
        loss = dip_identity_loss(models.decode_latents, recognizer, latents, batch.references, batch.landmarks,
                                 trainer.resolution, cfg.dip_region, cfg.dip_margin)
        return 1.0 - float(loss)

    return {"similarity": similarity(denoised), "clean_similarity": similarity(z0),
            "timesteps": sorted({int(t) for t in batch.timesteps})}
