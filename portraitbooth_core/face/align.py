"""Five-point face alignment to the standard ArcFace 112x112 template.

A similarity transform (rotation, uniform scale, translation) maps the detected landmarks
onto the template, as insightface does before every ArcFace recognizer: the recognizers
were trained on crops made this way, so a different crop costs accuracy.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Landmark positions in a 112x112 crop (left eye, right eye, nose, mouth left, mouth
# right); the widely used ArcFace reference points.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) taking points src -> dst, as 2x3."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mean_s, mean_d = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mean_s, dst - mean_d
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    # Reflection guard: a mirror image is not a similarity transform.
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    var_s = (src_c ** 2).sum() / len(src)
    scale = float((s * d).sum() / var_s) if var_s > 0 else 1.0
    trans = mean_d - scale * rot @ mean_s
    return np.hstack([scale * rot, trans[:, None]])


def alignment_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """2x3 matrix taking image pixels to a size x size ArcFace crop."""
    return similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / 112.0))


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Aligned size x size crop (uint8 HxWx3) of the face with these 5 landmarks."""
    matrix = alignment_matrix(landmarks, size)
    try:
        import cv2

        return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
    except ImportError:
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        out = warp_affine_torch(t, torch.from_numpy(matrix)[None].float(), size)
        return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _pixel_to_normalized(width: int, height: int) -> torch.Tensor:
    # Pixel i's centre sits at coordinate i (cv2's convention) and at (2i+1)/W - 1 in
    # grid_sample's align_corners=False space.
    return torch.tensor([[2.0 / width, 0.0, 1.0 / width - 1.0],
                         [0.0, 2.0 / height, 1.0 / height - 1.0],
                         [0.0, 0.0, 1.0]], dtype=torch.float64)


def warp_affine_torch(images: torch.Tensor, matrices: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Differentiable cv2.warpAffine: images [B,C,H,W], matrices [B,2,3] image->crop pixels.

    Gradients flow to `images` (and to `matrices`), which training's identity loss needs
    when it crops the face from a decoded image.
    """
    b, _, h, w = images.shape
    full = torch.zeros(b, 3, 3, dtype=torch.float64, device=images.device)
    full[:, :2] = matrices.to(torch.float64)
    full[:, 2, 2] = 1.0
    n_in = _pixel_to_normalized(w, h).to(images.device)
    n_out = _pixel_to_normalized(size, size).to(images.device)
    # affine_grid wants, for each output location, where to sample in the input.
    theta = n_in @ torch.linalg.inv(full) @ torch.linalg.inv(n_out)
    grid = F.affine_grid(theta[:, :2].to(images.dtype), [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def align_faces_torch(images: torch.Tensor, landmarks: torch.Tensor | np.ndarray, size: int = 112) -> torch.Tensor:
    """Differentiable aligned crops: images [B,C,H,W] (any range), landmarks [B,5,2] pixels."""
    lm = landmarks.detach().cpu().numpy() if isinstance(landmarks, torch.Tensor) else np.asarray(landmarks)
    mats = torch.from_numpy(np.stack([alignment_matrix(p, size) for p in lm])).to(images.device)
    return warp_affine_torch(images, mats, size)
