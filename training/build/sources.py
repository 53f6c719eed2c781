"""What a dataset is built from: a folder of people, each a folder of photos and/or videos.

    root/<person>/photo1.jpg (+ photo1.txt or photo1.json caption sidecar)
    root/<person>/clip.mp4   (+ clip.txt)
    root/<person>/class.txt  optional: the person's class word for template captions

A video gives target frames near its start and end and the reference face from its
middle frame, as the paper does: the reference is then a different frame than the target.
With a frame stride (`VideoFrameStream`) every K-th frame is a target and the builder
draws each one's reference from a distant part of the same clip.

People are listed without reading inside their folders (`list_people`), so a resumed or
split build opens only the folders it still has to build (`scan_person`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from portraitbooth_core.optional import require
from portraitbooth_core.paths import BadInputError

from .person import IMAGE_EXTS, VIDEO_EXTS, Person, SkipError

TARGET_FRACTIONS = (0.1, 0.9)  # where in a video target frames are taken


REFERENCE_FRACTION = 0.5


class SourceFolderError(BadInputError, FileNotFoundError):
    """The source folder of a build is missing or not a folder; the message names it and
    says what it must hold."""


SOURCE_HOLDS = "a folder with one sub-folder of photos and videos per person (or a CelebV-Text root)"


def list_people(root: str | Path) -> list[str]:
    """Names of root's person folders (sub-folders not starting with "."), sorted; one
    directory listing, nothing inside the folders is read. Raises SourceFolderError."""
    root = Path(root)
    if not root.exists():
        raise SourceFolderError(f"the source folder {root} does not exist; give {SOURCE_HOLDS}.")
    if not root.is_dir():
        raise SourceFolderError(f"the source {root} is a file, not a folder; give {SOURCE_HOLDS}.")
    from .celebv_text import is_celebv_text_root, list_clips

    if is_celebv_text_root(root):  # CelebV-Text's own layout: each clip is a person
        return list_clips(root)
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def scan_person(root: str | Path, name: str) -> Person | None:
    """The photos, videos and class word of one person folder; None when it has no photo or video."""
    from .celebv_text import is_celebv_text_root, scan_clip

    if is_celebv_text_root(root):
        return scan_clip(root, name)
    folder = Path(root) / name
    files = sorted(f for f in folder.iterdir() if f.is_file())
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
    videos = [f for f in files if f.suffix.lower() in VIDEO_EXTS]
    if not images and not videos:
        return None
    word_file = folder / "class.txt"
    word = word_file.read_text(encoding="utf-8").strip().lower() if word_file.is_file() else ""
    return Person(name, folder, images, videos, word)


def find_people(root: str | Path) -> list[Person]:
    """Every sub-folder of root with at least one photo or video, sorted by name."""
    return [p for p in (scan_person(root, name) for name in list_people(root)) if p is not None]


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


class VideoFrameStream:
    """Every `stride`-th frame of a video as (frame number, RGB uint8), decoded in order;
    the frames in between are only grabbed, not decoded. With `fps` instead, the stride is
    the clip's frame rate / fps (at least 1). After iterating, `count` is the number of
    frames the clip has (counted, not taken from the container, which may be wrong)."""

    def __init__(self, path: Path, stride: int = 1, fps: float = 0.0):
        self.path, self.stride, self.fps = Path(path), int(stride), float(fps)
        self.count = 0

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        cv2 = require("cv2", "Building a dataset from videos")
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise SkipError("unreadable video")
            stride = self.stride
            if self.fps > 0:
                native = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
                if native <= 0:
                    raise SkipError("the video does not state its frame rate; use a frame stride instead of fps")
                stride = max(1, round(native / self.fps))
            stride = max(1, stride)
            self.count = 0
            while cap.grab():
                n = self.count
                self.count += 1
                if n % stride:
                    continue
                ok, bgr = cap.retrieve()
                if not ok:
                    raise SkipError(f"could not decode frame {n}")
                yield n, np.ascontiguousarray(bgr[:, :, ::-1])
            if self.count < 3:
                raise SkipError("unreadable video or fewer than 3 frames")
        finally:
            cap.release()
