"""The names a dataset's own files carry, declared once per format and checked from that declaration.

A dataset folder may come from anyone (uploaded to a shared ComfyUI), so every field of
its files that names a file or a sample is a `NameField` in its reader's table, declared
with `name_fields` (shards.INDEX_NAMES, shard_index.SHARD_NAMES, shard_index.COMPACT_NAMES,
precomputed.MANIFEST_NAMES, precomputed.SIDE_FILE_NAMES, build.journal.JOURNAL_NAMES),
which also lists it in FORMATS. The reader checks a parsed file with
`check_names(doc, TABLE, shown)` before it uses any name, and opens a named file only
through `DatasetLocation.resolve` (which follows symlinks and keeps the result inside the
folder). The hostile-file tests plant bad values in every field of every format in
FORMATS (`with_value`), so a new name field is tested by adding it to its table, and a
new format fails those tests until they know how to plant it.

Field paths: dot-separated keys; `[]` each item of a list, `{}` each key of an object,
`|json` a text holding JSON (parsed, bounded), e.g. "shards[].name",
"__metadata__.keys|json[]".
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

from portraitbooth_core.bounded_json import load_json_bytes
from portraitbooth_core.paths import MAX_NAME, BadInputError, _relative_parts, check_file_name

FILE = "file"   # a relative path of a file inside the dataset folder
NAME = "name"   # one plain name (no folders): a sample key, a checkpoint's file name

# file (as it lies in a dataset folder; <shard> for every shard's) -> its name fields
FORMATS: dict[str, tuple["NameField", ...]] = {}

# A relative name of plain components (letters, digits, '.', '_', '-'; none starting with
# '.'): what the pack itself writes. Such a name and the files made from it pass without
# the slower general check, which a 100k-shard index.json would feel.
_PLAIN_RELATIVE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f]")

_TOKEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(\|json)?(\[\]|\{\})?$")


@dataclass(frozen=True)
class NameField:
    """One field of a dataset file that names something.

    path: where it is (see the module text); kind: FILE or NAME; opens: the files the pack
    opens from its value, relative to the dataset folder ("{}" is the value), each checked
    as a relative path (the first one the reader uses is checked first, so messages name
    the file as it is opened); () for a FILE opened under another folder (its reader
    resolves it there), whose value is still checked as a relative path."""

    path: str
    kind: str = FILE
    opens: tuple[str, ...] = ("{}",)

    def __post_init__(self) -> None:
        if self.kind not in (FILE, NAME):
            raise ValueError(f"NameField {self.path}: kind must be {FILE!r} or {NAME!r}")
        for token in self.path.split("."):
            if not _TOKEN.match(token):
                raise ValueError(f"NameField {self.path}: {token!r} is not a key, key[], key{{}} or key|json")
        # whether every file made from a plain value is plain too (then one match checks all)
        object.__setattr__(self, "_plain_opens", all(_PLAIN_RELATIVE.fullmatch(p.format("x")) for p in self.opens))

    def targets(self, value: str) -> list[str]:
        return [pattern.format(value) for pattern in self.opens]


def name_fields(file: str, *fields: NameField) -> tuple[NameField, ...]:
    """Declare the name fields of one dataset file format (listed in FORMATS for the
    hostile-file tests); returns them for its reader's check_names."""
    FORMATS[file] = fields
    return fields


def _steps(path: str) -> list[tuple[str, bool, str]]:
    return [(m.group(1), bool(m.group(2)), m.group(3) or "") for m in map(_TOKEN.match, path.split("."))]


def field_values(doc: Any, path: str, shown: str = "") -> Iterator[tuple[str, Any]]:
    """(where, value) of every value at `path` in `doc`; `where` spells the path with the
    item numbers ("shards[3].name"). Parts that are missing or of another type yield
    nothing: a file's structure is its reader's to check."""
    def walk(node: Any, steps: list, where: str) -> Iterator[tuple[str, Any]]:
        if not steps:
            yield where, node
            return
        (key, is_json, each), rest = steps[0], steps[1:]
        if not isinstance(node, dict) or key not in node:
            return
        here = f"{where}.{key}" if where else key
        value = node[key]
        if is_json:
            if not isinstance(value, str):
                yield here, value  # not a JSON text: refused as a name below
                return
            value = load_json_bytes(value, f"{shown} field '{here}'", max_bytes=64 << 20)
        if each == "[]":
            if isinstance(value, list):
                for i, item in enumerate(value):
                    yield from walk(item, rest, f"{here}[{i}]")
        elif each == "{}":
            if isinstance(value, dict):
                for k in value:
                    yield f"{here} (a key)", k
        else:
            yield from walk(value, rest, here)

    yield from walk(doc, _steps(path), "")


def check_name(field: NameField, value: Any, what: str) -> None:
    """Refuse a value that is not a name of the field's kind (absolute, '..', NUL, not text),
    by its text alone: nothing is opened or looked up, so the answer never depends on what
    exists on the machine. Raises BadInputError or PathNotAllowedError naming `what`."""
    fix = "it is not a name the pack wrote: rebuild (or re-copy) the dataset."
    if not isinstance(value, str):
        raise BadInputError(f"{what}: expected a name, got {type(value).__name__}; {fix}")
    if field.kind == FILE and field._plain_opens and len(value) <= 1024 and _PLAIN_RELATIVE.fullmatch(value):
        return  # the names the pack writes; anything else gets the full check below
    if field.kind == NAME and len(value) <= MAX_NAME and _PLAIN_NAME.fullmatch(value):
        return
    if _CONTROL.search(value):
        raise BadInputError(f"{what}: contains a NUL byte or another control character; {fix}")
    if field.kind == NAME:
        try:
            plain = check_file_name(value, what) == value
        except BadInputError:
            plain = False
        if not plain:
            raise BadInputError(f"{what}: {value[:120]!r} is not one plain name (no '/', '\\', '..', leading '.' or "
                                f"spaces at its ends, at most {MAX_NAME} characters); {fix}")
        return
    for target in field.targets(value):  # as opened first: the message names the file
        _relative_parts(target, what)
    _relative_parts(value, what)


def check_names(doc: Any, fields: tuple[NameField, ...], shown: str) -> None:
    """Check every name field of a parsed file (`shown`: the file as the user knows it)."""
    for field in fields:
        for where, value in field_values(doc, field.path, shown):
            check_name(field, value, f"{shown} {where}")


def with_value(doc: Any, path: str, value: Any) -> Any:
    """A copy of `doc` with the first value at `path` replaced by `value` (the first key, for
    `{}`), or None when `doc` has nothing there. For tests that plant hostile names."""
    doc = copy.deepcopy(doc)

    def put(node: Any, steps: list) -> bool:
        (key, is_json, each), rest = steps[0], steps[1:]
        if not isinstance(node, dict) or key not in node:
            return False
        inner = json.loads(node[key]) if is_json else node[key]
        if each == "[]":
            done = isinstance(inner, list) and bool(inner)
            if done and rest:
                done = put(inner[0], rest)
            elif done:
                inner[0] = value
        elif each == "{}":
            done = bool(inner) and isinstance(inner, dict)
            if done:
                first = next(iter(inner))
                items = [(value if k == first else k, v) for k, v in inner.items()]
                inner.clear()
                inner.update(items)
        elif rest:
            done = put(inner, rest)
        else:
            inner, done = value, True
        if done:
            node[key] = json.dumps(inner) if is_json else inner
        return done

    return doc if put(doc, _steps(path)) else None
