"""Noising and the one-step denoised estimate, in ComfyUI's sigma space.

The paper writes DDPM's z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps and DIP's estimate
z0_hat = (z_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t). ComfyUI's SD1.5 models take
x = z_t / sqrt(abar_t) = z0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t) and
return the denoised latent, so the same estimate is z0_hat = x - sigma_t eps_theta: the
model output itself. One set of functions for training, validation and the evidence run.
"""
from __future__ import annotations

import torch


def sigma_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for DDPM timestep(s) t."""
    abar = alphas_cumprod[timesteps]
    return ((1 - abar) / abar).sqrt()


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.dim() - 1))) if sigma.dim() else sigma


def noised_latent(z0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x = z0 + sigma * noise (ComfyUI's noisy latent; sigma per sample or one value)."""
    return z0 + _per_sample(sigma, z0) * noise


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise prediction that a denoised prediction at noise level sigma implies."""
    return (x - denoised) / _per_sample(sigma, x)


def denoised_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """DIP's one-step estimate z0_hat from a noise prediction."""
    return x - _per_sample(sigma, x) * eps
