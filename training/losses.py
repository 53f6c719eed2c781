"""The three loss terms of PortraitBooth's recipe, on one micro-batch.

L_noise: epsilon MSE, inside the (latent-sized) face mask only on the masked-noise samples.
L_loc:   ECAC's localization loss from the core, on the captured cross-attention maps.
L_id:    DIP's identity loss from the core: 1 - cos(phi(reference), phi(face(x0_hat)))
         on identity samples with t <= R_t; x0_hat is decoded by the frozen VAE with
         gradients and the face is cropped by the sample's known landmarks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from portraitbooth_core.ecac_loss import ECACSettings, loss_from_capture, resize_mask
from portraitbooth_core.face.arcface_torch import identity_loss

from .config import TrainConfig


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
    return ECACSettings(beta=config.ecac_beta, gamma=config.ecac_gamma, lam=config.ecac_lambda, mu=config.ecac_mu)


def localization_loss(layers, mask: torch.Tensor, face_present: torch.Tensor, expression_present: torch.Tensor,
                      config: TrainConfig) -> torch.Tensor:
    return loss_from_capture(layers, mask, ecac_settings(config), face_present=face_present,
                             expression_present=expression_present).total


def dip_identity_loss(models, recognizer, z0_hat: torch.Tensor, references: torch.Tensor,
                      landmarks: torch.Tensor, resolution: int) -> torch.Tensor:
    """L_id on the samples given (already selected: identity mode, t <= R_t); landmarks
    are in pixels of the dataset's resolution x resolution images."""
    images = models.decode_latents(z0_hat)                       # [k,3,H,W] 0..1, with gradients
    lm = landmarks * (images.shape[-1] / float(resolution))
    with torch.no_grad():
        target = recognizer(F.interpolate(references, size=recognizer.input_size, mode="bilinear",
                                          align_corners=False) if references.shape[-1] != recognizer.input_size
                            else references)
    features = recognizer.embed_faces(images.float(), lm)
    return identity_loss(target, features)
