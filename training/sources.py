"""What a dataset is built from: a folder of people, each a folder of photos and/or videos.

    root/<person>/photo1.jpg (+ photo1.txt or photo1.json caption sidecar)
    root/<person>/clip.mp4   (+ clip.txt)
    root/<person>/class.txt  optional: the person's class word for template captions

A video gives target frames near its start and end and the reference face from its
middle frame, as the paper does: the reference is then a different frame than the target.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from portraitbooth_core.optional import require

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mkv", ".webm"}
TARGET_FRACTIONS = (0.1, 0.9)  # where in a video target frames are taken
REFERENCE_FRACTION = 0.5


class SkipError(Exception):
    """A source that cannot become a sample; the message is the reason in the report."""


@dataclass(frozen=True)
class Person:
    name: str
    folder: Path
    images: list[Path]
    videos: list[Path]
    class_word: str  # from class.txt, or ""


def find_people(root: str | Path) -> list[Person]:
    """Every sub-folder of root with at least one photo or video, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset source folder not found: {root}")
    people = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in folder.iterdir() if f.is_file())
        images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
        videos = [f for f in files if f.suffix.lower() in VIDEO_EXTS]
        word_file = folder / "class.txt"
        word = word_file.read_text(encoding="utf-8").strip().lower() if word_file.is_file() else ""
        if images or videos:
            people.append(Person(folder.name, folder, images, videos, word))
    return people


def load_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB, EXIF rotation applied; SkipError for anything unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SkipError(f"corrupt or unreadable image ({type(exc).__name__}: {exc})") from None


def video_frames(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """(target frames near start and end, middle reference frame) as RGB uint8."""
    cv2 = require("cv2", "Building a dataset from videos")
    cap = cv2.VideoCapture(str(path))
    try:
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if not cap.isOpened() or count < 3:
            raise SkipError("unreadable video or fewer than 3 frames")

        def frame(fraction: float) -> np.ndarray:
            cap.set(cv2.CAP_PROP_POS_FRAMES, min(count - 1, int(fraction * count)))
            ok, bgr = cap.read()
            if not ok:
                raise SkipError(f"could not decode the frame at {fraction:.0%}")
            return np.ascontiguousarray(bgr[:, :, ::-1])

        return [frame(f) for f in TARGET_FRACTIONS], frame(REFERENCE_FRACTION)
    finally:
        cap.release()
