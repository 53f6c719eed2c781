"""The recipe's loss terms as training calls them, on one micro-batch.

L_noise: epsilon MSE, inside the (latent-sized) face mask only on the masked-noise samples.
L_loc:   ECAC's localization loss (`portraitbooth_core.ecac.loss`), with the run's settings
         (loc_floor: the paper's floor term or the log form that keeps a gradient).
L_id:    DIP's identity loss lives with DIP: `portraitbooth_core.dip.identity_loss`.
"""
from __future__ import annotations

import torch

from portraitbooth_core.ecac.loss import ECACSettings, loss_from_capture, resize_mask

from ..config import TrainConfig


def noise_loss(eps_hat: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the per-sample MSE; masked samples average only inside mask.

    mask: [B,H,W] image-sized; resized to the latent by area (a soft face share per cell).
    """
    sq = (eps_hat.float() - eps.float()).pow(2)                 # [B,C,h,w]
    full = sq.flatten(1).mean(1)
    m = resize_mask(mask, tuple(sq.shape[-2:]))[:, None]        # [B,1,h,w]
    inside = (sq * m).flatten(1).sum(1) / (m.flatten(1).sum(1) * sq.shape[1]).clamp_min(1e-6)
    return torch.where(masked.to(sq.device), inside, full).mean()


def ecac_settings(config: TrainConfig) -> ECACSettings:
    return ECACSettings(beta=config.ecac_beta, gamma=config.ecac_gamma, lam=config.ecac_lambda, mu=config.ecac_mu,
                        floor_form=config.loc_floor)


def localization_loss(layers, mask: torch.Tensor, face_present: torch.Tensor, expression_present: torch.Tensor,
                      config: TrainConfig) -> torch.Tensor:
    return loss_from_capture(layers, mask, ecac_settings(config), face_present=face_present,
                             expression_present=expression_present).total
