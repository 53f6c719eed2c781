"""One forward pass of the training objective, as an nn.Module so DDP can wrap it.

The module owns only what trains (the UNet or its LoRA adapters, and the STEA projector);
the frozen CLIP, VAE and recognizer ride along outside its parameters so DDP neither
broadcasts nor watches them.
"""

from __future__ import annotations

import torch
from torch import nn

from portraitbooth_core.dip.estimate import eps_from_denoised, noised_latent, sigma_at
from portraitbooth_core.dip.identity_loss import dip_identity_loss
from portraitbooth_core.ecac.capture import AttentionCapture
from portraitbooth_core.ecac.health import FIELDS, TOKENS, attention_sums, layer_groups
from portraitbooth_core.ecac.layers import cross_attention_layers, install_on_layers, select_layers
from portraitbooth_core.stea.projector import STEAProjector, splice_identity

from ..config import TrainConfig
from ..models.load import Models
from ..models.precision import autocast, choose_precision
from ..models.text_cache import TextCache
from .data import IDENTITY, Batch
from .losses import localization_loss, noise_loss

TERMS = ("noise", "loc", "id")


class TrainModule(nn.Module):
    def __init__(self, models: Models, projector: STEAProjector, config: TrainConfig, recognizer=None,
                 resolution: int = 512, precision: str | None = None):
        """precision: 'fp32', 'bf16' or 'fp16' (precision.choose_precision); None: chosen
        from config.precision for the models' device."""
        super().__init__()
        self.precision = precision or choose_precision(config.precision, models.device)
        self.unet = models.unet if config.mode == "full" else None
        self.lora = models.lora
        self.projector = projector
        self.config, self.resolution = config, resolution
        self._frozen = (models, recognizer)  # a tuple: not registered as submodules
        self.text = TextCache(models.clip)
        self.layers = select_layers(cross_attention_layers(models.unet), config.loc_layers)
        # Attention health (portraitbooth_core.ecac.health) from L_loc's own maps: per forward
        # a small device tensor of sums (`health`), read by the trainer with the loss terms.
        self.health_groups = layer_groups(l.name for l in self.layers)
        self.monitor_health = True  # off: no health sums (the train-step benchmark measures their cost)
        self.health: torch.Tensor | None = None

    @property
    def health_size(self) -> int:
        """Numbers in `health` (flattened) when the run's config captures maps; else 0."""
        return len(TOKENS) * len(self.health_groups) * FIELDS if self.config.loc_weight > 0 else 0

    @property
    def models(self) -> Models:
        return self._frozen[0]

    def autocast(self):
        return autocast(self.precision, self.models.device)

    def conditioning(self, batch: Batch) -> torch.Tensor:
        device = self.models.device
        conds = []
        for i, caption in enumerate(batch.captions):
            # Precomputed encodings (precompute.py) are this same TextCache output, made ahead.
            cond = batch.text[i:i + 1].to(device) if batch.text is not None else self.text(caption).to(device)
            if int(batch.modes[i]) == IDENTITY:
                cond = splice_identity(cond, batch.identity_positions[i], batch.embeddings[i:i + 1], self.projector)
            conds.append(cond)
        return torch.cat(conds)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, models = self.config, self.models
        z0 = batch.latents if batch.latents is not None else models.encode_pixels(batch.images)
        sigma = sigma_at(models.alphas_cumprod.to(models.device), batch.timesteps)
        x = noised_latent(z0, batch.noise, sigma)
        identity = batch.modes == IDENTITY
        capture = None
        options: dict = {}
        if cfg.loc_weight > 0:
            capture = AttentionCapture({"identity": batch.identity_positions,
                                        "expression": batch.expression_positions}, differentiable=True)
            attn2: dict = {}
            install_on_layers(attn2, self.layers, lambda _layer: capture)
            options = {"patches_replace": {"attn2": attn2}}
        cond = self.conditioning(batch)
        with self.autocast():
            denoised = models.base.apply_model(x, sigma, c_crossattn=cond, transformer_options=options).float()
        eps_hat = eps_from_denoised(x, denoised, sigma)
        terms: dict[str, torch.Tensor] = {}
        if cfg.noise_weight > 0:
            terms["noise"] = noise_loss(eps_hat, batch.noise, batch.masks, batch.masked_noise)
        self.health = None
        if capture is not None:
            layers = capture.pop_layers()
            has_expr = torch.tensor([bool(p) for p in batch.expression_positions], device=x.device)
            terms["loc"] = localization_loss(layers, batch.masks, identity.float(), has_expr.float(), cfg)
            if self.monitor_health and layers:
                self.health = attention_sums(layers, batch.masks, identity.float(), has_expr.float(),
                                             self.health_groups)
        dip = identity & (batch.timesteps <= cfg.id_max_timestep)
        recognizer = self._frozen[1]
        if cfg.id_weight > 0 and recognizer is not None and bool(dip.any()):
            idx = dip.nonzero().flatten()
            with self.autocast():
                terms["id"] = dip_identity_loss(models.decode_latents, recognizer, denoised[idx], batch.references[idx],
                                                batch.landmarks[idx], self.resolution, cfg.dip_region,
                                                cfg.dip_margin).float()
        weights = {"noise": cfg.noise_weight, "loc": cfg.loc_weight, "id": cfg.id_weight}
        total = sum(weights[k] * v for k, v in terms.items())
        if not torch.is_tensor(total):
            total = x.new_zeros(())
        # The projector is unused by a micro-batch without identity samples; an explicit
        # zero gradient keeps DDP from waiting for it (no unused-parameter search needed).
        # Only the projector: the same trick over a full UNet costs thousands of kernels.
        total = total + 0.0 * sum(p.sum() for p in self.projector.parameters())
        terms["total"] = total
        return terms
