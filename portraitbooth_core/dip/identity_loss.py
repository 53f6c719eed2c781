"""DIP's identity loss: L_id = 1 - cos(phi(reference), phi(face(x0_hat))).

On identity samples with t <= R_t the one-step estimate x0_hat (`estimate.py`) is decoded
by the frozen VAE with gradients, the face is cropped by the sample's known landmarks with
the ArcFace alignment, and the differentiable recognizer compares it with the reference.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..face.align import align_faces_torch, alignment_matrix


def identity_loss(reference: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """1 - cos(reference, features), batch-averaged: the paper's L_id on recognizer outputs."""
    ref = F.normalize(reference.to(features.dtype), dim=-1)
    return (1.0 - (ref * F.normalize(features, dim=-1)).sum(-1)).mean()


def face_windows(landmarks: torch.Tensor, latent_hw: tuple[int, int], ratio: int, margin: int,
                 crop: int = 112) -> list[tuple[int, int, int, int]]:
    """Latent windows (y0, y1, x0, x1), one size for all samples, that contain the region
    the recognizer's aligned crop reads (plus `margin` latent cells of decoder context)."""
    h, w = latent_hw
    corners = np.array([[0, 0, 1], [crop, 0, 1], [0, crop, 1], [crop, crop, 1]], dtype=np.float64)
    boxes = []
    for lm in landmarks.detach().cpu().double().numpy():
        full = np.vstack([alignment_matrix(lm, crop), [0, 0, 1]])
        pts = (np.linalg.inv(full) @ corners.T).T[:, :2] / ratio   # crop corners in latent cells
        y0, x0 = np.floor(pts.min(0))[::-1] - margin
        y1, x1 = np.ceil(pts.max(0))[::-1] + margin
        boxes.append((y0, y1, x0, x1))
    size_h = int(min(h, max(b[1] - b[0] for b in boxes)))
    size_w = int(min(w, max(b[3] - b[2] for b in boxes)))
    windows = []
    for y0, y1, x0, x1 in boxes:  # same size for every sample (one batched decode), kept inside the latent
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        top = int(min(max(round(cy - size_h / 2), 0), h - size_h))
        left = int(min(max(round(cx - size_w / 2), 0), w - size_w))
        windows.append((top, top + size_h, left, left + size_w))
    return windows


def dip_identity_loss(decode: Callable[[torch.Tensor], torch.Tensor], recognizer, z0_hat: torch.Tensor,
                      references: torch.Tensor, landmarks: torch.Tensor, resolution: int, region: str = "face",
                      margin: int = 2) -> torch.Tensor:
    """L_id on the samples given (already selected: identity mode, t <= R_t); landmarks
    are in pixels of the dataset's resolution x resolution images; `decode` maps latents
    to [k,3,H,W] images in 0..1 with gradients (the frozen VAE).

    region "face" decodes only the latent window around the face (the recognizer sees
    nothing else): the VAE decode and its backward, DIP's main cost, shrink with the
    face's share of the image. "full" decodes the whole image, as the paper describes.
    """
    ratio = resolution // z0_hat.shape[-1]
    lm = landmarks.float()
    if region == "face":
        windows = face_windows(lm, tuple(z0_hat.shape[-2:]), ratio, margin)
        z0_hat = torch.stack([z0_hat[i, :, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in enumerate(windows)])
        offsets = torch.tensor([[w[2] * ratio, w[0] * ratio] for w in windows], dtype=lm.dtype, device=lm.device)
        lm = lm - offsets[:, None, :]
    images = decode(z0_hat)                                      # [k,3,H,W] 0..1, with gradients
    lm = lm * (images.shape[-2] / float(z0_hat.shape[-2] * ratio))
    size = recognizer.input_size
    refs = references if references.shape[-1] == size else F.interpolate(references, size=size, mode="bilinear",
                                                                          align_corners=False)
    crops = align_faces_torch(images.float(), lm, size)
    # One recognizer pass for references and generated faces: on a GPU this step is
    # bound by kernel launches, not arithmetic. Gradients reach only the generated half.
    features = recognizer(torch.cat([refs.to(crops.dtype), crops]))
    target, generated = features[:len(refs)].detach(), features[len(refs):]
    return identity_loss(target, generated)
