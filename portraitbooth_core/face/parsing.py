"""Face masks: BiSeNet face parsing (facexlib's network, pre-placed weights) or a fallback.

The parsing network labels 19 CelebAMask-HQ classes; the face mask is a union of the
labels below. Without parsing weights we fall back to an ellipse fitted to the detection
box and tilted along the eye line, and say so in the log and the report.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..optional import require
from .images import resize
from .types import DetectedFace

log = logging.getLogger("portraitbooth.face")
PARSING_WEIGHTS = "parsing_bisenet.pth"
# CelebAMask-HQ labels as facexlib's BiSeNet emits them.
LABELS = {"background": 0, "skin": 1, "l_brow": 2, "r_brow": 3, "l_eye": 4, "r_eye": 5, "eye_g": 6,
          "l_ear": 7, "r_ear": 8, "ear_r": 9, "nose": 10, "mouth": 11, "u_lip": 12, "l_lip": 13,
          "neck": 14, "neck_l": 15, "cloth": 16, "hair": 17, "hat": 18}
# Eyeglasses sit on the face: leaving them out would punch holes around the eyes.
FACE_PARTS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "nose", "mouth", "u_lip", "l_lip")
OPTIONAL_PARTS = {"ears": ("l_ear", "r_ear", "ear_r"), "hair": ("hair",), "neck": ("neck", "neck_l")}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CROP_SCALE = 1.8  # parsing crop side / face box side: CelebAMask-HQ faces fill about half the frame


def label_ids(ears: bool = False, hair: bool = False, neck: bool = False) -> list[int]:
    parts = list(FACE_PARTS)
    for name, on in (("ears", ears), ("hair", hair), ("neck", neck)):
        if on:
            parts += OPTIONAL_PARTS[name]
    return sorted(LABELS[p] for p in parts)


class FaceParser:
    """facexlib's BiSeNet loaded from a pre-placed state dict (never downloads)."""

    name = "bisenet (facexlib)"

    def __init__(self, weights_path: str | os.PathLike, device: str | torch.device = "cpu",
                 ears: bool = False, hair: bool = False, neck: bool = False):
        require("facexlib", "Face parsing masks")
        from facexlib.parsing.bisenet import BiSeNet

        self.path = os.fspath(weights_path)
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        self.net = BiSeNet(num_class=len(LABELS))
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{self.path} does not fit facexlib's BiSeNet (19 classes); is it "
                             f"{PARSING_WEIGHTS}? {str(exc).splitlines()[0]}") from exc
        self.device = torch.device(device)
        self.net.eval().to(self.device)
        self.labels = torch.tensor(label_ids(ears, hair, neck))

    @torch.no_grad()
    def mask(self, image: np.ndarray, face: DetectedFace) -> np.ndarray:
        """HxW float32 mask (0/1) of the face parts of this face."""
        h, w = image.shape[:2]
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        side = int(round(max(face.width, face.height) * CROP_SCALE)) or 1
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        crop = np.zeros((side, side, 3), np.uint8)  # zero-padded where the crop leaves the image
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
        if sx1 <= sx0 or sy1 <= sy0:
            return np.zeros((h, w), np.float32)
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
        x = torch.from_numpy(resize(crop, (512, 512))).permute(2, 0, 1)[None].float().div(255)
        x = ((x - IMAGENET_MEAN) / IMAGENET_STD).to(self.device)
        labels = self.net(x)[0].argmax(1, keepdim=True).float()
        labels = F.interpolate(labels, size=(side, side), mode="nearest")[0, 0].cpu()
        part = torch.isin(labels.long(), self.labels).numpy().astype(np.float32)
        out = np.zeros((h, w), np.float32)
        out[sy0:sy1, sx0:sx1] = part[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
        return out


def fallback_mask(shape_hw: tuple[int, int], face: DetectedFace) -> np.ndarray:
    """HxW float32 ellipse inscribed in the detection box, rotated to the eye line."""
    h, w = shape_hw
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    ax, ay = max(face.width / 2, 1.0), max(face.height / 2, 1.0)
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    angle = np.arctan2(ry - ly, rx - lx)  # head roll
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xs - cx, ys - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return ((u / ax) ** 2 + (v / ay) ** 2 <= 1.0).astype(np.float32)


def announce_fallback(where: str) -> str:
    """Log (and return for the report) that masks come from the fallback."""
    msg = (f"face masks: no {PARSING_WEIGHTS} found ({where}); using an ellipse from the face box and "
           "landmarks instead of face parsing")
    log.warning("[PortraitBooth] %s", msg)
    return msg


def announce_unreadable(path: str | os.PathLike, exc: BaseException) -> str:
    """Log (and return for the report) that a parsing weight file could not be loaded."""
    # Only the error's type: torch's unpickler quotes bytes of the file ("invalid load key, 'r'",
    # "Unsupported operand 149"), and a message must not show what a file holds.
    msg = (f"face masks: {os.fspath(path)} could not be loaded ({type(exc).__name__}: not facexlib's BiSeNet "
           f"state dict, or damaged); using an ellipse "
           f"from the face box and landmarks instead of face parsing. Replace the file with facexlib's "
           f"{PARSING_WEIGHTS} to get parsing masks.")
    log.warning("[PortraitBooth] %s", msg)
    return msg
