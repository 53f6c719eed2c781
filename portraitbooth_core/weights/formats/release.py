"""Reading another project's released weight file without running its code: `torch.save`
pickles through `torch.load(weights_only=True)` (memory-mapped where the file allows), or
safetensors after its header is checked. Every format module reads its release here and
words the refusals for its own users (which file is the official one, how big it is)."""
from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..safetensors_header import SafetensorsHeaderError, read_header


@dataclass(frozen=True)
class ReleaseWords:
    """How one format's refusals read: its error types and what to tell the user."""

    truncated: type[Exception]   # raised for an empty, cut-off or corrupt file
    unsafe: type[Exception]      # raised for a pickle that would run code
    real_file: str               # e.g. "FastComposer's real pytorch_model.bin"
    official: str                # where the official file is, e.g. its download page
    size_note: str               # what is known of the real file's size, e.g. its parameter count


def read_release(path: Path, words: ReleaseWords) -> Any:
    """The object a release file holds (a dict of tensors for a safetensors file); never
    unpickles code. Refusals are `words.truncated` or `words.unsafe`, naming the file."""
    source = str(path)
    if path.stat().st_size == 0:
        raise words.truncated(f"{source} is empty (0 bytes): the download failed. Download it again.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, words)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files from torch < 1.6 (or a plain pickle) are not zip archives and cannot be
            # memory-mapped; read them normally, still with weights_only.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise words.unsafe(
                f"Refused {source}: it contains pickled Python objects{what} that would run code when loaded. "
                f"{words.real_file} holds plain tensors only, so this file is not it or has been tampered with. "
                f"Do not load it with weights_only=False; download the official file ({words.official}).") from None
        raise words.truncated(f"{source} could not be read ({text}); it is truncated or corrupt. "
                              f"Download it again.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise words.truncated(
            f"{source} ({path.stat().st_size:,} bytes) could not be read: it is truncated or corrupt (torch: {exc}). "
            f"{words.size_note}; download it again.") from None


def _read_safetensors(path: Path, words: ReleaseWords) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        read_header(path)  # refuses a cut-off or foreign file before safetensors maps it
    except SafetensorsHeaderError as exc:
        raise words.truncated(f"{path} could not be read: {exc}. Download it again.") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise words.truncated(f"{path} could not be read ({type(exc).__name__}). Download it again.") from None
