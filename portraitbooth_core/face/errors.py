"""Errors of the face pipeline. Messages say which input, what was wrong, what to do."""
from __future__ import annotations


class FaceAnalysisError(ValueError):
    """Base class: bad input or setup the user can fix."""


class NoFaceError(FaceAnalysisError):
    """No usable face in an image (carries the image index)."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


class PackError(FaceAnalysisError):
    """An insightface model pack folder is missing, incomplete or has corrupt files."""


class IdentityError(FaceAnalysisError):
    """Identities that cannot be combined (different recognizers, empty)."""
