"""Build a training dataset: people folders -> shards + index + a report of every skip.

Each target photo (or video frame) becomes one sample whose reference face comes from a
*different* photo of the same person when there is one (for videos another frame of the
clip: the middle frame by default, as the paper does, or with a frame stride a frame from
a distant part of the clip).

Scale: people are the unit of work. They are built in sorted order, by this process or
by worker processes (`workers`), and written by this process in that order, so the
dataset is the same whatever the number of workers. `part=(i, N)` builds the i-th of N
contiguous ranges of the sorted people (one per machine) into its own folder;
`training.build.merge` joins the parts into the dataset one process would have built.

Resume: shards close at person boundaries and each closed shard is committed by one line
appended to build_journal.jsonl (its people, their sample counts, skips and warnings). A
rerun reads the journal, not the finished people's files, and builds only the rest.
build_state.json holds what the samples depend on (settings and face encoder); a rerun
with anything else is refused with the difference named. Skips never stop the build;
they land in report.json and on the console.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

from portraitbooth_core.bounded_json import read_json_file

from ..dataset.shards import write_json_atomic
from .analyze import PersonAnalyzer, PersonResult, default_finder
from .captions import TokenFinder
from .journal import DatasetWriter, Journal, person_entry, write_dataset_files
from .person import Person
from .settings import (JOURNAL, STATE, STATE_FORMAT, BuildSettings, BuildStateError, EncoderSpec, encoder_identity,
                       face_encoder_record, legacy_record, listing_digest, model_files_identity, parse_part,
                       part_names, record_digest, state_differences, upgraded_record)
from .sources import list_people, scan_person

log = logging.getLogger("portraitbooth.training")


# -- the whole build ---------------------------------------------------------------------------
class DatasetBuilder:
    """Builds (or finishes building) a dataset folder from people folders.

    encoder: a face encoder, or an EncoderSpec (needed for workers > 1: each worker
    process makes its own encoder). workers: processes analyzing people (0: one per CPU
    core). part: "i/N" or (i, N) to build only the i-th of N ranges of people."""

    def __init__(self, source: str | Path, output: str | Path, encoder, settings: BuildSettings = BuildSettings(),
                 finder: TokenFinder | None = None, progress: bool = True, workers: int = 1,
                 part: str | tuple[int, int] | None = None, captioner=None):
        self.source, self.output = Path(source), Path(output)
        if captioner is not None and workers != 1:
            raise TypeError("workers > 1 loads the captioner in every worker from settings.captioner "
                            "(\"blip:FOLDER\"); set that instead of passing a captioner")
        if captioner is not None and not settings.captioner:  # recorded: a resume cannot switch captioners
            settings = replace(settings, captioner=getattr(captioner, "name", type(captioner).__name__))
        self.captioner = captioner
        self.spec = encoder if isinstance(encoder, EncoderSpec) else None
        self.encoder = encoder.create() if self.spec is not None else encoder
        self.settings = settings.validate()
        self.workers = (os.cpu_count() or 1) if workers == 0 else int(workers)
        if self.workers < 1:
            raise ValueError(f"workers must be 0 (one per CPU core) or more, got {workers}")
        if self.workers > 1 and self.spec is None:
            raise TypeError("workers > 1 needs the face encoder as an EncoderSpec (how each worker process makes "
                            "its own: an encoder holds onnxruntime sessions, which cannot be sent to a process)")
        if self.workers > 1 and finder is not None:
            raise TypeError("workers > 1 uses the default caption token finder in every worker; leave finder unset")
        self.part = parse_part(part)
        self._finder = finder
        self._analyzer: PersonAnalyzer | None = None
        self.progress = progress
        self.skipped: list[dict] = []
        self.warnings: list[str] = []
        self.subject_words: dict[str, set[str]] = {}  # identity word -> words captions used, pending

    @property
    def finder(self) -> TokenFinder:
        if self._finder is None:  # made on first use: a build that uses workers never needs one here
            self._finder = default_finder()
        return self._finder

    # -- per person ------------------------------------------------------------------
    def _person_samples(self, person: Person) -> list[dict]:
        """(target, reference, caption) samples of one person; its skips, warnings and
        caption words are kept on the builder until the person is written."""
        if self._analyzer is None:
            self._analyzer = PersonAnalyzer(self.source, self.encoder, self.settings, self.finder, self.captioner)
        return self._take(self._analyzer(person))

    def _take(self, result: PersonResult) -> list[dict]:
        self.skipped += result.skipped
        self.warnings += result.warnings
        for word, written in result.words.items():
            self.subject_words.setdefault(word, set()).update(written)
        return result.samples

    def _entry(self, name: str, samples: list[dict]) -> dict:
        words = {w: sorted(s) for w, s in sorted(self.subject_words.items())}
        entry = person_entry(PersonResult(name, samples, self.skipped, self.warnings, words))
        self.skipped, self.warnings, self.subject_words = [], [], {}
        return entry

    def _people(self, names: list[str]) -> Iterator[tuple[str, list[dict] | None]]:
        """(name, samples) in the order of names; None for a folder without photo or video."""
        if self.workers == 1:
            for name in _progress(names, self.progress):
                person = scan_person(self.source, name)
                yield name, (None if person is None else self._person_samples(person))
            return
        from .pool import analyzed_people

        results = analyzed_people(self.spec, self.source, self.settings, names, self.workers)
        for name, result in _progress(results, self.progress, total=len(names)):
            yield name, (None if result is None else self._take(result))

    # -- the whole build ---------------------------------------------------------------
    def identity(self) -> dict:
        """Everything that decides what a sample holds: the build settings and the face
        encoder (its embeddings, masks and detections, and its model files' contents). A
        build resumes only when this is unchanged, so one dataset never mixes, e.g.,
        128-d dlib and 512-d ArcFace embeddings."""
        return {"settings": json.loads(json.dumps(asdict(self.settings))),
                "face_encoder": encoder_identity(self.encoder), "face_models": model_files_identity(self.encoder)}

    def _open(self, names: list[str]) -> Journal:
        """Check the output folder's state against this build; the journal to continue."""
        path, journal_path = self.output / STATE, self.output / JOURNAL
        identity = self.identity()
        state = read_json_file(path, str(path), max_bytes=64 << 20) if path.is_file() else None
        if state is None:
            journal_path.unlink(missing_ok=True)  # no state: a fresh build (deleting the state starts over)
        else:
            self._check(state, identity, names)
        journal = Journal(journal_path)
        if state is not None and "people_done" in state and journal.count == 0:
            journal.append(legacy_record(state))  # a state file of the previous format, kept as the first record
        new = {"format": STATE_FORMAT, "fingerprint": record_digest(identity), "identity": identity,
               "part": list(self.part) if self.part else None, "complete": None}
        if self.part:
            new["listing"] = listing_digest(names)
        write_json_atomic(path, new)
        for tmp in self.output.glob(".*.tmp"):  # a shard an interrupted build never closed
            tmp.unlink()
        return journal

    def _check(self, state: dict, identity: dict, names: list[str]) -> None:
        old = state.get("identity")
        if isinstance(old, dict):
            differences = state_differences(upgraded_record(old, identity), identity)
        else:  # a state from before the encoder was recorded: its settings fingerprint must match
            legacy = state.get("fingerprint") == self.settings.fingerprint() and \
                state.get("embedding_dim") in (None, identity["face_encoder"]["dim"])
            differences = [] if legacy else \
                ["the build settings or the face encoder (recorded before this version named them)"]
        if differences:
            raise BuildStateError(
                f"{self.output} holds a dataset built with other settings ({'; '.join(differences)}), so this "
                f"build cannot continue it: samples of both would mix in one dataset. Build with the recorded "
                f"settings and face encoder to continue it, or use a new output folder (or delete {STATE} there "
                f"to start over).")
        recorded = tuple(state["part"]) if state.get("part") else None
        if recorded != self.part:
            shown = lambda p: f"part {p[0]}/{p[1]}" if p else "the whole build (no --part)"  # noqa: E731
            raise BuildStateError(
                f"{self.output} holds {shown(recorded)}, but this build is {shown(self.part)}. Build the same "
                f"part into this folder to continue it, or use a new output folder for each part.")
        if self.part and state.get("listing") and state["listing"] != listing_digest(names):
            raise BuildStateError(
                f"{self.source} lists other people folders now ({listing_digest(names)['people']}) than when part "
                f"{self.part[0]}/{self.part[1]} was started in {self.output} ({state['listing']['people']}): the "
                f"parts are ranges of that list, so they would overlap or miss people. Restore the source folder, "
                f"or build every part again into new folders.")

    def build(self) -> dict:
        """Build (or finish building) the dataset; returns the report."""
        names = list_people(self.source)  # first: a wrong source folder leaves no empty output folder behind
        self.output.mkdir(parents=True, exist_ok=True)
        journal = self._open(names)
        todo = [n for n in part_names(names, self.part) if n not in journal.done]
        writer = DatasetWriter(self.output, self.settings.shard_size, journal)
        people = self._people(todo)
        try:
            for name, samples in people:
                if samples is not None:
                    writer.add(self._entry(name, samples), samples)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            people.close()  # stops the worker processes when the build stops early
        return self._finish(journal)

    def _finish(self, journal: Journal) -> dict:
        report = write_dataset_files(self.output, journal, json.loads(json.dumps(asdict(self.settings))),
                                     face_encoder_record(self.encoder))
        state = json.loads((self.output / STATE).read_text())
        state["complete"] = {"records": journal.count}
        write_json_atomic(self.output / STATE, state)
        return report




def _progress(items, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc="people", unit="person", total=total)
    except ImportError:
        return items


def format_report(report: dict) -> str:
    lines = [f"dataset: {report['samples']} samples in {report['shards']} shard(s) from {report['people']} "
             f"people; {len(report['skipped'])} file(s) skipped"]
    lines += [f"  skipped {s['file']}: {s['reason']}" for s in report["skipped"]]
    lines += [f"  warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
