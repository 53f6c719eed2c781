"""Build a training dataset: people folders -> shards + index + a report of every skip.

Each target photo (or video frame) becomes one sample whose reference face comes from a
*different* photo of the same person when there is one (for videos another frame of the
clip: the middle frame by default, as the paper does, or with a frame stride a frame from
a distant part of the clip).

Scale: people are the unit of work. They are built in sorted order, by this process or
by worker processes (`workers`), and written by this process in that order, so the
dataset is the same whatever the number of workers. `part=(i, N)` builds the i-th of N
contiguous ranges of the sorted people (one per machine) into its own folder;
`training.merge` joins the parts into the dataset one process would have built.

Resume: shards close at person boundaries and each closed shard is committed by one line
appended to build_journal.jsonl (its people, their sample counts, skips and warnings). A
rerun reads the journal, not the finished people's files, and builds only the rest.
build_state.json holds what the samples depend on (settings and face encoder); a rerun
with anything else is refused with the difference named. Skips never stop the build;
they land in report.json and on the console.
"""
from __future__ import annotations

import bisect
import hashlib
import importlib
import io
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from portraitbooth_core.vocabulary import CLASS_WORDS

from .captions import CaptionError, CaptionRequest, CaptionSources, TokenFinder, caption_info
from .face_crops import CropSettings, FaceCrop, analyze_face, embed_pending
from .shards import FORMAT, INDEX, ShardWriter, write_json_atomic
from .sources import (TARGET_FRACTIONS, Person, SkipError, VideoFrameStream, list_people, load_image, scan_person,
                      video_frames)

log = logging.getLogger("portraitbooth.training")
STATE = "build_state.json"
JOURNAL = "build_journal.jsonl"
REPORT = "report.json"
STATE_FORMAT = 2


class BuildStateError(ValueError):
    """An output folder this build cannot continue (other settings, another part, a
    changed source); the message names the difference and how to go on."""


@dataclass
class BuildSettings:
    crops: CropSettings = field(default_factory=CropSettings)
    caption_template: str = ""        # e.g. "a photo of a {word}", for files without a sidecar
    default_word: str = ""            # class word for the template when the person has no class.txt
    synonyms: dict = field(default_factory=lambda: {k: list(v) for k, v in CLASS_WORDS.items()})
    shard_size: int = 1000            # samples per shard (closed at the next person boundary)
    # Videos: 0 takes the paper's two targets (near the start and the end) with the middle
    # frame as reference. K > 0 makes every K-th frame a target (video_fps: about that many
    # targets per second instead), each with a reference frame drawn from the clip at least
    # video_reference_gap of its length away, never a neighbouring frame.
    video_stride: int = 0
    video_fps: float = 0.0
    video_reference_gap: float = 0.25
    # Captions of files without a sidecar: "celebv-text:DIR" (CelebV-Text's descriptions and
    # emotions, training.celebv_text), then "blip:FOLDER" (a local captioner, training.captioner).
    captions: str = ""
    captioner: str = ""

    def fingerprint(self) -> str:
        data = asdict(self)
        for name, default in _ADDED_LATER.items():  # states written before these existed still match
            if data.get(name) == default:
                data.pop(name)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> "BuildSettings":
        if self.video_stride < 0 or self.video_fps < 0:
            raise ValueError(f"video_stride ({self.video_stride}) and video_fps ({self.video_fps}) must be >= 0")
        if self.video_stride and self.video_fps:
            raise ValueError("set video_stride or video_fps, not both (both choose which frames become targets)")
        if not 0 < self.video_reference_gap < 1:
            raise ValueError(f"video_reference_gap is a fraction of the clip, between 0 and 1 "
                             f"(got {self.video_reference_gap})")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
        return self


_ADDED_LATER = {"video_stride": 0, "video_fps": 0.0, "video_reference_gap": 0.25, "captions": "", "captioner": ""}
# Command-line options of the settings, named in the error when a resume is refused.
_OPTIONS = {"settings.crops.resolution": "--resolution", "settings.crops.crop_scale": "--crop-scale",
            "settings.crops.det_threshold": "--det-threshold", "settings.crops.min_face": "--min-face",
            "settings.crops.several_faces": "--several-faces", "settings.caption_template": "--caption-template",
            "settings.default_word": "--default-word", "settings.shard_size": "--shard-size",
            "settings.video_stride": "--video-stride", "settings.video_fps": "--video-fps",
            "settings.video_reference_gap": "--video-reference-gap", "settings.captions": "--captions",
            "settings.captioner": "--captioner", "settings.synonyms": "--class-synonyms",
            "face_encoder.": "--pack/--detector/--recognizer/--parsing-weights",
            "face_models.": "--pack/--parsing-weights (the model files' contents)"}


@dataclass(frozen=True)
class EncoderSpec:
    """How to make the face encoder: `factory` ("module:function") called with `kwargs`.

    Worker processes make their own encoder from it (an encoder holds onnxruntime
    sessions, which do not pickle); the builder's process makes one too, for the
    dataset's record of the encoder."""

    factory: str = "portraitbooth_core.face.loader:build_encoder"
    kwargs: dict = field(default_factory=dict)

    def create(self):
        module, _, name = self.factory.partition(":")
        return getattr(importlib.import_module(module), name)(**self.kwargs)


def encode_image(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    """An image file's bytes for a shard member (PNG for masks and faces, JPEG for targets)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, np.float32), allow_pickle=False)
    return buf.getvalue()


# -- one person -> samples (in this process or a worker) -------------------------------------
@dataclass
class PersonResult:
    """What one person folder gives: samples in order, and what goes to the report."""

    name: str
    samples: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    words: dict[str, list[str]] = field(default_factory=dict)  # identity word -> words the captions used


@dataclass
class _Face:
    """An analyzed face, its images already encoded (a long video keeps many of them)."""

    crop: FaceCrop
    jpg: bytes = b""
    mask: bytes = b""
    ref: bytes = b""


def _encoded(crop: FaceCrop) -> _Face:
    face = _Face(crop, encode_image(crop.image, "JPEG", quality=95), encode_image(crop.mask),
                 encode_image(crop.aligned))
    crop.image = crop.mask = None  # the arrays are not needed again
    return face


def _memoize_word_ids(finder) -> None:
    # The finder looks up the ids of every expression word for every caption (~60
    # tokenizer calls, ~30 ms); the ids of a word never change, so they are kept.
    if getattr(finder, "_builder_memo", False) or not callable(getattr(finder, "ids_of", None)):
        return
    lookup, cache = finder.ids_of, {}

    def ids_of(word: str) -> list[int]:
        if word not in cache:
            cache[word] = tuple(lookup(word))
        return list(cache[word])

    finder.ids_of, finder._builder_memo = ids_of, True


_finder: list[TokenFinder] = []


def default_finder() -> TokenFinder:
    """The process's SD1.5 token finder, made once (loading the tokenizer takes seconds)."""
    if not _finder:
        _finder.append(TokenFinder())
    return _finder[0]


def _pick(key: str, n: int) -> int:
    """A fixed choice among n, from a name: the same on every run and every machine."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


class PersonAnalyzer:
    """One person folder -> PersonResult. The builder's process and every worker run this."""

    def __init__(self, source: Path, encoder, settings: BuildSettings, finder: TokenFinder, captioner=None):
        self.source, self.encoder, self.settings, self.finder = Path(source), encoder, settings, finder
        # sidecar, then CelebV-Text, then the captioner (loaded here on first use), then the template
        self.captions = CaptionSources(settings.synonyms, settings.default_word, settings.captions,
                                       captioner or settings.captioner)
        self._frame_counts: dict[str, int] = {}  # video -> frames, for where a frame lies in its clip
        # caption -> CaptionInfo (or the skip) for the whole run: a template caption is the
        # same for thousands of people, and tokenizing it is a good part of a person's time
        self._caption_infos: dict[tuple, object] = {}
        _memoize_word_ids(finder)

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.source))

    def _face(self, image: np.ndarray, name: str, result: PersonResult) -> _Face | None:
        try:
            return _encoded(analyze_face(self.encoder, image, self.settings.crops))
        except SkipError as exc:
            result.skipped.append({"file": name, "reason": str(exc)})
            return None

    def __call__(self, person: Person) -> PersonResult:
        result = PersonResult(person.name)
        photos: list[tuple[str, _Face]] = []
        for path in person.images:
            try:
                image = load_image(path)
            except SkipError as exc:
                result.skipped.append({"file": self._rel(path), "reason": str(exc)})
                continue
            face = self._face(image, self._rel(path), result)
            if face is not None:
                photos.append((self._rel(path), face))
        embed_pending(self.encoder, [f.crop for _, f in photos])  # one recognizer call for the person
        pairs = []  # (target name, target face, reference name, reference face, caption source path)
        for i, (name, face) in enumerate(photos):
            ref_name, ref = photos[(i + 1) % len(photos)]
            if len(photos) == 1:
                result.warnings.append(f"{name}: the only usable photo of '{person.name}'; its reference face "
                                       f"is the same photo (add another photo of this person)")
            pairs.append((name, face, ref_name, ref, self.source / name))
        for path in person.videos:
            stride = self.settings.video_stride or self.settings.video_fps
            pairs += (self._video_frames(path, result) if stride else self._video_ends(path, result))
        raws = self.captions.resolve([CaptionRequest(path, name, face.jpg, person.class_word,
                                                     getattr(face.crop, "gender", None),
                                                     getattr(face.crop, "age", None), self._position(name))
                                      for name, face, _, _, path in pairs])
        captions = self._caption_infos  # a video's frames and a template's people share one: analyzed once
        if len(captions) > 100_000:  # unique sidecar captions: bounded memory
            captions.clear()
        words: dict[str, set[str]] = {}
        for (name, face, ref_name, ref, caption_path), raw in zip(pairs, raws):
            key = (raw.text, raw.error, person.class_word or self.settings.default_word)
            if key not in captions:
                try:
                    if raw.error:
                        raise CaptionError(raw.error)
                    captions[key] = caption_info(raw.text, self.finder, self.settings.caption_template,
                                                 person.class_word or self.settings.default_word,
                                                 self.settings.synonyms)
                except CaptionError as exc:
                    captions[key] = exc
            info = captions[key]
            if isinstance(info, Exception):
                result.skipped.append({"file": name, "reason": str(info)})
                continue
            box, landmarks = face.crop.box.tolist(), face.crop.landmarks.tolist()
            meta = {"person": person.name, "source": name, "reference_source": ref_name,
                    "reference_same_image": ref_name == name, "caption": info.caption,
                    "identity_word": info.identity_word, "identity_positions": info.identity_positions,
                    "expression_words": info.expression_words, "expression_positions": info.expression_positions,
                    "subject_word": info.subject_word, "caption_source": raw.source, "box": box,
                    "landmarks": landmarks}
            words.setdefault(info.identity_word, set()).add(info.subject_word)
            result.samples.append({"jpg": face.jpg, "mask.png": face.mask, "ref.png": ref.ref,
                                   "emb.npy": _npy(ref.crop.embedding), "json": json.dumps(meta).encode()})
        result.words = {w: sorted(s) for w, s in sorted(words.items())}
        return result

    def _position(self, name: str) -> float | None:
        """Where a video sample's frame lies in its clip (0..1); None for a photo."""
        video, _, frame = name.rpartition("#")
        if frame.startswith("target") and frame[6:].isdigit() and int(frame[6:]) < len(TARGET_FRACTIONS):
            return TARGET_FRACTIONS[int(frame[6:])]
        if frame.startswith("frame") and frame[5:].isdigit() and self._frame_counts.get(video):
            return int(frame[5:]) / self._frame_counts[video]
        return None

    def _video_ends(self, path: Path, result: PersonResult) -> list[tuple]:
        """The paper's sampling: targets near the start and the end, the middle frame as reference."""
        rel = self._rel(path)
        try:
            targets, middle = video_frames(path)
        except SkipError as exc:
            result.skipped.append({"file": rel, "reason": str(exc)})
            return []
        ref = self._face(middle, f"{rel}#middle", result)
        if ref is None:
            return []
        found = [(f"{rel}#target{k}", self._face(frame, f"{rel}#target{k}", result))
                 for k, frame in enumerate(targets)]
        found = [(name, face) for name, face in found if face is not None]
        embed_pending(self.encoder, [ref.crop] + [f.crop for _, f in found])
        return [(name, face, f"{rel}#middle", ref, path) for name, face in found]

    def _video_frames(self, path: Path, result: PersonResult) -> list[tuple]:
        """Every stride-th frame a target; its reference a frame of the clip at least
        video_reference_gap of the clip away, chosen from the frame's name (the same
        choice on every run)."""
        rel = self._rel(path)
        stream = VideoFrameStream(path, self.settings.video_stride, self.settings.video_fps)
        frames: list[tuple[int, _Face]] = []
        skipped: list[dict] = []
        try:
            for n, frame in stream:
                try:
                    frames.append((n, _encoded(analyze_face(self.encoder, frame, self.settings.crops))))
                except SkipError as exc:
                    skipped.append({"file": f"{rel}#frame{n}", "reason": str(exc)})
        except SkipError as exc:
            result.skipped.append({"file": rel, "reason": str(exc)})
            return []
        result.skipped += skipped
        self._frame_counts[rel] = stream.count
        embed_pending(self.encoder, [f.crop for _, f in frames])
        gap = max(2, math.ceil(self.settings.video_reference_gap * stream.count))
        numbers = [n for n, _ in frames]
        pairs = []
        for n, face in frames:
            before = bisect.bisect_right(numbers, n - gap)  # frames[:before] lie gap or more before n
            after = bisect.bisect_left(numbers, n + gap)    # frames[after:] lie gap or more after n
            choices = before + len(frames) - after
            if not choices:
                result.skipped.append({"file": f"{rel}#frame{n}", "reason": f"no usable reference frame at least "
                                       f"{gap} frames away in the clip ({stream.count} frames)"})
                continue
            k = _pick(f"{rel}#frame{n}", choices)
            m, ref = frames[k] if k < before else frames[after + k - before]
            pairs.append((f"{rel}#frame{n}", face, f"{rel}#frame{m}", ref, path))
        return pairs


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
    """(record, its size in bytes) for each complete line of a journal."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            try:
                yield json.loads(raw), len(raw)
            except ValueError:
                return


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


# -- parts -----------------------------------------------------------------------------------
def parse_part(part) -> tuple[int, int] | None:
    """"i/N" (or (i, N)) -> (i, N) with 0 <= i < N; None for a whole build."""
    if part is None or part == "":
        return None
    if isinstance(part, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", part)
        if not m:
            raise ValueError(f"part must look like i/N (e.g. 0/4: the first of 4 parts), got {part!r}")
        part = (int(m.group(1)), int(m.group(2)))
    i, n = (int(x) for x in part)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"part {i}/{n}: N must be at least 1 and i between 0 and N-1")
    return i, n


def part_names(names: list[str], part: tuple[int, int] | None) -> list[str]:
    """The i-th of N contiguous ranges of the sorted people: part i of N on every machine
    that lists the same source folder."""
    if part is None:
        return list(names)
    i, n = part
    return names[i * len(names) // n:(i + 1) * len(names) // n]


def listing_digest(names: list[str]) -> dict:
    """What the parts of one build must agree on: the people folders they split."""
    return {"people": len(names), "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]}


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


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
        from .build_pool import analyzed_people

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
        state = json.loads(path.read_text()) if path.is_file() else None
        if state is None:
            journal_path.unlink(missing_ok=True)  # no state: a fresh build (deleting the state starts over)
        else:
            self._check(state, identity, names)
        journal = Journal(journal_path)
        if state is not None and "people_done" in state and journal.count == 0:
            journal.append(_legacy_record(state))  # a state file of the previous format, kept as the first record
        new = {"format": STATE_FORMAT, "fingerprint": _digest(identity), "identity": identity,
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
            differences = _differences(_upgraded(old, identity), identity)
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
        self.output.mkdir(parents=True, exist_ok=True)
        names = list_people(self.source)
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


def _legacy_record(state: dict) -> dict:
    return {"legacy": True, "shards": state.get("shards", []),
            "people": [{"name": n} for n in state.get("people_done", [])],
            "skipped": state.get("skipped", []), "warnings": state.get("warnings", []),
            "words": state.get("subject_words", {}), "embedding_dim": state.get("embedding_dim")}


def _upgraded(old: dict, new: dict) -> dict:
    """A recorded identity with what its version did not record yet: settings added since
    at their defaults (what that version built), other entries as they are now."""
    old = json.loads(json.dumps(old))
    defaults = json.loads(json.dumps(asdict(BuildSettings())))

    def fill(into: dict, base: dict) -> None:
        for key, value in base.items():
            if key not in into:
                into[key] = value
            elif isinstance(value, dict) and isinstance(into[key], dict) and key != "synonyms":
                fill(into[key], value)

    if isinstance(old.get("settings"), dict):
        fill(old["settings"], defaults)
    for key, value in new.items():
        old.setdefault(key, value)
    return old


def face_encoder_record(encoder) -> dict:
    """index.json's face_encoder entry, without its dim (from the samples)."""
    recognizer = getattr(encoder, "recognizer", None)
    return {"kind": encoder.kind, "feature": "final",
            "recognizer": recognizer_record(recognizer, getattr(encoder, "settings", {})),
            "settings": getattr(encoder, "settings", {})}


def encoder_identity(encoder) -> dict:
    """The face encoder as it shapes samples: recognizer kind, embedding size and file,
    detector, mask maker. The onnxruntime provider is left out (same model, same samples)."""
    settings = dict(getattr(encoder, "settings", {}) or {})
    recognizer = getattr(encoder, "recognizer", None)
    parser = getattr(encoder, "parser", None)
    return {"kind": getattr(encoder, "kind", None), "dim": getattr(recognizer, "dim", None),
            "recognizer": recognizer_record(recognizer, settings),
            "detector": settings.get("detector") or type(getattr(encoder, "detector", None)).__name__,
            "det_size": settings.get("det_size"), "masks": settings.get("masks"),
            "parsing": None if parser is None else {"file": Path(str(getattr(parser, "path", ""))).name,
                                                    "labels": [int(x) for x in getattr(parser, "labels", [])]}}


_file_digests: dict[tuple, str] = {}


def _file_digest(path) -> str:
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _file_digests[key] = h.hexdigest()[:16]
    return _file_digests[key]


def model_files_identity(encoder) -> dict:
    """The contents of the detector, recognizer and parsing files (sha256): a pack whose
    files were replaced under the same names gives other samples."""
    out = {}
    for role in ("detector", "recognizer", "parser"):
        model = getattr(encoder, role, None)
        path = getattr(model, "path", None)
        if model is None:
            out[role] = None
        elif isinstance(path, (str, os.PathLike)) and Path(path).is_file():
            out[role] = {"file": Path(path).name, "sha256": _file_digest(path)}
        else:  # a model shipped inside a package (RetinaFace, dlib): its class names it
            out[role] = {"class": f"{type(model).__module__}.{type(model).__name__}"}
    return out


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'name: recorded -> now' for each leaf that differs between two identities, with the
    command-line option that sets it."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            name = f"{prefix}{k}"
            option = next((o for key, o in _OPTIONS.items() if name == key or
                           (key.endswith(".") and name.startswith(key))), None)
            out.append(f"{name}: {json.dumps(a, sort_keys=True)} recorded, {json.dumps(b, sort_keys=True)} now"
                       + (f" ({option})" if option else ""))
    return out


def recognizer_record(recognizer, settings: dict) -> dict | None:
    """The recognizer ONNX as {pack folder name, file inside it}: a dataset moves between
    machines and may be uploaded to a server, so it never records an absolute path; the
    trainer finds the file under its own models folders (shards.recorded_recognizer)."""
    path = getattr(recognizer, "path", None)
    if not path:
        return None
    path = Path(path)
    pack = settings.get("pack") or path.parent.name
    # a pack unpacked one level down (antelopev2/antelopev2/*.onnx) keeps that level in the file name
    file = path.name if path.parent.name == pack else f"{path.parent.name}/{path.name}"
    return {"pack": pack, "file": file}


def class_synonyms_seen(subject_words: dict) -> dict[str, list[str]]:
    """{identity word: [synonyms the captions used, sorted]}, identity words without any left out."""
    out = {word: sorted(set(written) - {word}) for word, written in sorted(subject_words.items())}
    return {word: syns for word, syns in out.items() if syns}


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
