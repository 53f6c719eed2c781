"""A person to build samples from (a folder of photos and videos, or a CelebV-Text clip),
and the error that skips a source."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mkv", ".webm"}


class SkipError(Exception):
    """A source that cannot become a sample; the message is the reason in the report."""


@dataclass(frozen=True)
class Person:
    name: str
    folder: Path
    images: list[Path]
    videos: list[Path]
    class_word: str  # from class.txt, or ""
