"""index.json, the file that makes a folder a dataset: its format, the bounds on what it may
hold, its name fields, and the checks every reader runs before using it (ShardReader, the
compact index, merge). It may come from anyone (a dataset uploaded to a shared server).
"""
from __future__ import annotations

from portraitbooth_core.bounded_json import load_json_bytes

from .names import FILE, NAME, NameField, check_names, name_fields
from .storage import DatasetFileError, DatasetLocation

INDEX = "index.json"
FORMAT = "portraitbooth-shards/1"

# Bounds checked before the work they would cost (an uploaded index.json listing 200k
# shards once held the ComfyUI queue for 32 s): 100k shards of the builder's 1000 samples
# is 100M samples; index.json spends ~70 bytes a shard.
MAX_SHARDS = 100_000
MAX_INDEX_BYTES = 32 << 20

# Every field of index.json that names a file (names.py). A shard's name is opened as its
# JSON and as its precomputed side file.
INDEX_NAMES = name_fields(
    INDEX,
    NameField("shards[].name", FILE, ("{}.json", "precomputed/{}.safetensors")),
    NameField("shards[].tar", FILE),  # must be the shard JSON's (shard_index checks)
    # looked up under the recognizer folders, not the dataset's (recorded_recognizer)
    NameField("face_encoder.recognizer.pack", NAME),
    NameField("face_encoder.recognizer.file", FILE, ()),
)


def check_index(index, shown: str) -> list[dict]:
    """The shard entries of a parsed index.json, after the checks that cost nothing per
    entry (format, structure, the shard count), then every name field (by text, nothing
    opened), then duplicate shards. Raises DatasetFileError naming the file and field."""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise DatasetFileError(f"{shown}: unknown dataset format {str(found)[:80]!r} (this version reads {FORMAT}); "
                               f"build the dataset with `python -m training build`.")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise DatasetFileError(f"{shown}: 'shards' must be a list of shard entries; rebuild the dataset.")
    if len(shards) > MAX_SHARDS:
        raise DatasetFileError(f"{shown}: 'shards' lists {len(shards):,} shards, more than the {MAX_SHARDS:,} a "
                               f"dataset may have; build it with a larger --shard-size.")
    if not all(isinstance(s, dict) for s in shards):
        raise DatasetFileError(f"{shown}: 'shards' must be a list of shard entries; rebuild the dataset.")
    check_names(index, INDEX_NAMES, shown)
    seen: dict[str, int] = {}
    for n, shard in enumerate(shards):
        name = shard.get("name")
        if name in seen:
            raise DatasetFileError(f"{shown} shards[{n}].name: {name[:120]!r} is also shards[{seen[name]}]; each "
                                   f"shard is listed once. Rebuild the dataset.")
        seen[name] = n
        count = shard.get("count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            raise DatasetFileError(f"{shown} shards[{n}].count: not a sample count; rebuild the dataset.")
    return shards


def read_index(location: DatasetLocation) -> tuple[dict, bytes]:
    """(parsed and checked index.json, its bytes) of a dataset: resolved inside the folder
    (a symlink leading out is refused, whether or not its target exists), read up to
    MAX_INDEX_BYTES, its nesting bounded, then check_index."""
    shown = location.describe(INDEX)
    target = location.resolve(INDEX, shown)
    try:
        raw = location.read_limited(target, MAX_INDEX_BYTES)
    except OSError as exc:
        raise DatasetFileError(f"{shown}: could not be read ({exc.strerror or type(exc).__name__}); rebuild "
                               f"(or re-copy) the dataset.") from None
    index = load_json_bytes(raw, shown, MAX_INDEX_BYTES)
    check_index(index, shown)
    return index, raw
