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


class IncompletePackError(PackError):
    """A pack folder without the detector or recognizer asked for; `missing` names those
    roles ("detector", "recognizer"), so a caller can name its own alternative."""

    def __init__(self, message: str, missing: tuple[str, ...] = ()):
        super().__init__(message)
        self.missing = tuple(missing)

    def __reduce__(self):  # a build worker's error reaches the builder with its roles
        return type(self), (str(self), self.missing)


class IdentityError(FaceAnalysisError):
    """Identities that cannot be combined (different recognizers, empty)."""
