"""The one reader of .safetensors headers: identity files, PortraitBooth weight files,
checkpoints and UNet files all go through `read_header`.

Only the header is read (8-byte length, then JSON), so it is cheap on multi-GB files and
runs no code. Every failure is a `SafetensorsHeaderError` (a ValueError) whose message names
the file by its base name and never quotes the file's bytes or numbers taken from a header
that failed to parse: a random or hostile file must not end up in an error shown in the UI.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..bounded_json import JSONLimitError, load_json_bytes

# The safetensors library refuses headers above 100 MB; anything larger is not one.
MAX_HEADER_LENGTH = 100_000_000
METADATA = "__metadata__"


class SafetensorsHeaderError(ValueError):
    """A file whose safetensors header cannot be used; `str()` names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path.name} {problem}")


class UnreadableFileError(SafetensorsHeaderError):
    """The operating system refused to read the file (missing, a folder, no permission, I/O error)."""


class NotSafetensorsError(SafetensorsHeaderError):
    """The bytes are not a safetensors header: random data, a pickle, a cut-off header."""


class TruncatedSafetensorsError(SafetensorsHeaderError):
    """A valid header, but the file is shorter than the tensors it lists: a cut-off copy."""

    def __init__(self, path: str | os.PathLike, actual: int, expected: int) -> None:
        self.actual, self.expected = actual, expected
        super().__init__(path, f"is truncated: {actual} of {expected} bytes")


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a .safetensors header says: tensors (name -> {dtype, shape, data_offsets}) and metadata."""

    path: Path
    length: int  # bytes of header JSON after the 8-byte length field
    tensors: dict[str, dict]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        """File offset where the tensor data (and every data_offsets origin) begins."""
        return 8 + self.length

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(entry["shape"]) for name, entry in self.tensors.items()}

    @property
    def expected_size(self) -> int:
        """The byte size a complete file with this header has."""
        return self.data_start + max((entry["data_offsets"][1] for entry in self.tensors.values()), default=0)


def _not_safetensors(path: str | os.PathLike, why: str) -> NotSafetensorsError:
    return NotSafetensorsError(path, f"is corrupt or not a safetensors file ({why})")


def header_length(path: str | os.PathLike, first8: bytes, file_size: int | None = None) -> int:
    """The header length from a file's first 8 bytes; NotSafetensorsError when implausible.

    `file_size` (when known) also refuses a length that runs past the end of the file.
    """
    if len(first8) != 8:
        raise _not_safetensors(path, "shorter than 8 bytes")
    (length,) = struct.unpack("<Q", first8)
    # The number itself is never shown: for a file that is not safetensors it is noise.
    if length < 2 or length > MAX_HEADER_LENGTH or (file_size is not None and 8 + length > file_size):
        raise _not_safetensors(path, "header length field is implausible")
    return length


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_entry(entry: object) -> bool:
    """Checked once here so callers can index dtype/shape/data_offsets without guarding."""
    if not isinstance(entry, dict):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (isinstance(entry.get("dtype"), str) and isinstance(shape, list) and all(map(_is_count, shape))
            and isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1])


def parse_header(path: str | os.PathLike, raw: bytes, length: int) -> SafetensorsHeader:
    """Parse and check the header JSON `raw` (the `length` bytes after the length field)."""
    try:  # size and nesting bounded first: a deeply nested header is refused, not a RecursionError
        header = load_json_bytes(raw, Path(path).name, MAX_HEADER_LENGTH)
    except JSONLimitError:
        raise _not_safetensors(path, "header is nested too deeply to be a safetensors header") from None
    except ValueError:
        # The decoder's message quotes bytes and positions from the file: leave it out.
        raise _not_safetensors(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "header is not a JSON object")
    metadata = header.pop(METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _not_safetensors(path, "its __metadata__ is not a table of texts")
    if not all(map(_valid_entry, header.values())):
        raise _not_safetensors(path, "a tensor entry lacks a valid dtype, shape or data_offsets")
    return SafetensorsHeader(Path(path), length, header, metadata)


def read_header(path: str | os.PathLike, complete: bool = True) -> SafetensorsHeader:
    """The checked header of a .safetensors file, reading nothing past it.

    complete: also raise TruncatedSafetensorsError when the file is shorter than its header says
    (a cut-off download or copy), so callers never find out later from a failed tensor read.
    """
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            length = header_length(path, f.read(8), file_size)
            raw = f.read(length)
    except OSError as exc:
        raise UnreadableFileError(path, f"could not be read ({exc.strerror or type(exc).__name__})") from None
    header = parse_header(path, raw, length)
    if complete and file_size < header.expected_size:
        raise TruncatedSafetensorsError(path, file_size, header.expected_size)
    return header


def read_header_as(path: str | os.PathLike, error: Callable[[str], Exception], truncated_fix: str,
                   corrupt_fix: str) -> SafetensorsHeader:
    """read_header, its refusals raised as the caller's own `error` with the caller's fix
    appended (a truncated file is usually fixed otherwise than a foreign or corrupt one)."""
    try:
        return read_header(path)
    except TruncatedSafetensorsError as exc:
        raise error(f"{exc}. {truncated_fix}") from None
    except SafetensorsHeaderError as exc:
        raise error(f"{exc}. {corrupt_fix}") from None


def read_range_header(path: str | os.PathLike, read: Callable[[int, int], bytes]) -> SafetensorsHeader:
    """The same checks for a file read by byte ranges (`read(offset, size)`, e.g. remote storage)."""
    length = header_length(path, read(0, 8))
    return parse_header(path, read(8, length), length)


__all__ = ["MAX_HEADER_LENGTH", "NotSafetensorsError", "SafetensorsHeader", "SafetensorsHeaderError",
           "TruncatedSafetensorsError", "UnreadableFileError", "header_length", "parse_header", "read_header", "read_header_as",
           "read_range_header"]
