"""What a build has committed: the append-only journal (one line per closed shard, so a
rerun continues where the last one stopped), the shard writer, and the dataset files
(index.json, report.json) written from the journal."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from portraitbooth_core.bounded_json import load_json_bytes

from ..dataset.names import FILE, NameField, check_names, name_fields
from ..dataset.shards import FORMAT, INDEX, ShardWriter, write_json_atomic
from .analyze import PersonResult
from .settings import JOURNAL, REPORT, class_synonyms_seen


# Every field of a journal record that names a file (names.py): merge opens a part's shard
# tar and its precomputed side file from them, and index.json lists them. People's names
# are only compared, never opened. (build_state.json and report.json name no file the pack
# opens: settings, digests, counts and the skipped files' names for the user to read.)
_SHARD = ("{}.json", "precomputed/{}.safetensors")
JOURNAL_NAMES = name_fields(JOURNAL, NameField("shard.name", FILE, _SHARD), NameField("shard.tar", FILE),
                            NameField("shards[].name", FILE, _SHARD), NameField("shards[].tar", FILE))
MAX_JOURNAL_LINE = 64 << 20  # one commit: a shard entry and its people (skipped files, warnings)


# -- the journal and the writer --------------------------------------------------------------
class Journal:
    """build_journal.jsonl: one line per commit (a closed shard with its people, or the
    last people, who gave no samples), appended after the shard is in place. Loading keeps
    running totals, not the records, and drops a last line a kill cut short."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self.shards: list[dict] = []
        self.done: set[str] = set()
        self.people = 0
        self.samples = 0
        self.skipped: list[dict] = []
        self.warnings: list[str] = []
        self.words: dict[str, set[str]] = {}
        self.embedding_dim: int | None = None
        good = 0
        for line, size in _journal_lines(path):
            self._apply(line)
            good += size
        if path.is_file() and path.stat().st_size > good:
            with open(path, "r+b") as f:  # a line cut short by a kill: its shard is redone
                f.truncate(good)

    def _apply(self, record: dict) -> None:
        self.count += 1
        shards = record.get("shards", []) + ([record["shard"]] if record.get("shard") else [])
        self.shards += shards
        self.samples += sum(int(s["count"]) for s in shards)
        for person in record["people"]:
            self.done.add(person["name"])
            self.people += 1
            self.skipped += person.get("skipped", [])
            self.warnings += person.get("warnings", [])
            for word, written in person.get("words", {}).items():
                self.words.setdefault(word, set()).update(written)
        # a record converted from a state file of the previous format keeps these whole
        self.skipped += record.get("skipped", [])
        self.warnings += record.get("warnings", [])
        for word, written in record.get("words", {}).items():
            self.words.setdefault(word, set()).update(written)
        self.embedding_dim = self.embedding_dim or record.get("embedding_dim")

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._apply(record)


def _journal_lines(path: Path) -> Iterator[tuple[dict, int]]:
    """(record, its size in bytes) for each complete line of a journal; every name in a
    record is checked (JOURNAL_NAMES) before it is used, and a line too long or too deeply
    nested to be a record ends the journal there, as a damaged one does."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return
            try:
                record = load_json_bytes(raw, f"{path} line {number}", MAX_JOURNAL_LINE)
            except ValueError:
                return
            if not isinstance(record, dict):
                return
            check_names(record, JOURNAL_NAMES, f"{path} line {number}")
            yield record, len(raw)


def journal_records(folder: Path) -> Iterator[dict]:
    """The complete records of a dataset folder's journal, in order (for merge)."""
    for record, _ in _journal_lines(Path(folder) / JOURNAL):
        yield record


def _embedding_dim(sample: dict) -> int:
    return int(np.load(io.BytesIO(sample["emb.npy"])).shape[0])


class DatasetWriter:
    """Takes people in order with their samples: keys count up from the journal's total,
    a shard closes at the first person boundary at or past shard_size, then the journal
    commits it. The builder and merge both write through this, which is why a merged
    dataset is the one a single build writes."""

    def __init__(self, output: Path, shard_size: int, journal: Journal):
        self.output, self.shard_size, self.journal = Path(output), shard_size, journal
        self.writer: ShardWriter | None = None
        self.pending: list[dict] = []
        self.dim: int | None = None

    def add(self, person: dict, samples: list[dict]) -> None:
        if samples and self.writer is None:
            self.writer = ShardWriter(self.output, f"shard-{len(self.journal.shards):05d}")
        for sample in samples:
            self.writer.add(f"{self.journal.samples + len(self.writer.keys):08d}", sample)
            self.dim = self.dim or _embedding_dim(sample)
        self.pending.append(person)
        if self.writer is not None and len(self.writer.keys) >= self.shard_size:
            self.commit()

    def commit(self) -> None:
        entry = self.writer.close() if self.writer is not None else None
        self.journal.append({"people": self.pending, "shard": entry, "embedding_dim": self.dim})
        self.writer, self.pending, self.dim = None, [], None

    def close(self) -> None:
        if self.writer is not None or self.pending:
            self.commit()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def person_entry(result: PersonResult) -> dict:
    """A person's journal entry (empty fields left out: a million people fit in the file)."""
    entry = {"name": result.name, "samples": len(result.samples)}
    for key in ("skipped", "warnings", "words"):
        if getattr(result, key):
            entry[key] = getattr(result, key)
    return entry


def write_dataset_files(output: Path, journal: Journal, settings: dict, face_encoder: dict) -> dict:
    """index.json and report.json from the journal's totals; shard files past the last
    committed one (left by a killed run) are removed. Returns the report."""
    names = {s["name"] for s in journal.shards}
    for path in output.glob("shard-*"):
        stem = path.name.split(".", 1)[0]
        if re.fullmatch(r"shard-\d{5,}", stem) and stem not in names and path.suffix in (".tar", ".json"):
            path.unlink()
    index = {"format": FORMAT, "resolution": settings["crops"]["resolution"], "samples": journal.samples,
             "shards": journal.shards, "face_encoder": {**face_encoder, "dim": journal.embedding_dim},
             "identity_words": sorted(settings["synonyms"]),
             # the other words the kept captions used for each identity word; export
             # lists them in the weight file so the model accepts them in prompts
             "class_synonyms": class_synonyms_seen(journal.words),
             "build": settings}
    write_json_atomic(output / INDEX, index)
    report = {"samples": journal.samples, "shards": len(journal.shards), "people": journal.people,
              "skipped": journal.skipped, "warnings": journal.warnings}
    write_json_atomic(output / REPORT, report)
    return report
