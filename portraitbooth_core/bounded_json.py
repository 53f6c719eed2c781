"""JSON from a file someone else wrote, with its size and nesting bounded before it is parsed.

A dataset's index.json, an identity file's metadata or a weight file's header can be
uploaded to a shared ComfyUI by anyone. Python's json module parses a 100 MB text as
readily as a 1 KB one, and a few thousand nested brackets exhaust its recursion (a raw
RecursionError), so every reader of such a file goes through `load_json_bytes`: the size
is checked first, then the nesting depth is measured without recursion (a vectorised scan,
a few ms a megabyte), and only then is the text parsed. Every refusal is a BadInputError
naming the file, never quoting its bytes.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .paths import BadInputError

# Deeper than any file the pack writes (index.json is 4 levels deep, an identity file's
# metadata a handful), far below what exhausts json's recursion (~1000).
MAX_DEPTH = 64
_CHUNK = 1 << 20  # bytes scanned at a time: bounded temporary memory for large files
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class JSONLimitError(BadInputError):
    """A JSON text larger or more deeply nested than its reader accepts."""


def nesting_depth(data: bytes) -> int:
    """The deepest bracket nesting of a JSON text, brackets inside strings not counted.

    Escaped backslashes, then escaped quotes, are removed first (no other escape involves a
    quote), so the quotes left delimit the strings; the scan keeps its string parity and
    depth across chunks. For text that is not valid JSON the result may be too high, never
    too low, and json.loads rejects that text anyway."""
    data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth, deepest, in_string = 0, 0, 0
    for start in range(0, len(data), _CHUNK):
        a = np.frombuffer(data, np.uint8, count=min(_CHUNK, len(data) - start), offset=start)
        quotes = np.cumsum(a == ord('"'), dtype=np.int64)
        # inside a string: an odd number of quotes so far (the opening quote counts, the closing one not)
        inside = ((quotes + in_string) & 1).astype(bool)
        step = _OPEN[a]
        step[inside] = 0
        levels = np.cumsum(step, dtype=np.int64)
        if len(levels):
            deepest = max(deepest, depth + int(levels.max()))
            depth += int(levels[-1])
            in_string = int((quotes[-1] + in_string) & 1)
    return deepest


def load_json_bytes(data: bytes | str, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse the JSON text `data` read from a user-supplied file (`what` names the file, and
    the field when the JSON sits inside one), refusing more than `max_bytes` bytes or more
    than `max_depth` nested arrays/objects with a JSONLimitError, and text that is not UTF-8
    JSON with a BadInputError, before any of the expensive work."""
    import json

    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise JSONLimitError(f"{what} is larger than the {max_bytes:,} bytes allowed there, so it is not read;"
                             f" replace it with a valid one.")
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise JSONLimitError(f"{what} is nested {depth} levels deep, more than the {max_depth} allowed "
                             f"there, so it is not read; replace it with a valid one.")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInputError(f"{what} is not valid JSON (not UTF-8 text); fix or replace it.") from None
    except RecursionError:  # not reachable after the depth scan; kept so no raw RecursionError can escape
        raise JSONLimitError(f"{what} is nested too deeply to read; replace it with a valid one.") from None
    except json.JSONDecodeError as exc:
        # Position only: the decoder's message could quote the file's bytes.
        raise BadInputError(f"{what} is not valid JSON (line {exc.lineno}, column {exc.colno}); fix or replace "
                            f"it.") from None


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """load_json_bytes of a whole local file, reading at most max_bytes + 1 bytes of it (a
    huge file is refused without being read). OSError (a missing file) passes through for
    the caller to word."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    return load_json_bytes(data, what, max_bytes, max_depth)
