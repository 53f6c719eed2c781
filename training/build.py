"""Build a training dataset: people folders -> shards + index + a report of every skip.

Each target photo (or video end frame) becomes one sample whose reference face comes
from a *different* photo of the same person when there is one (the video's middle frame
for videos). Building is resumable: shards close at person boundaries and
build_state.json records which people are in closed shards, so a rerun redoes only the
rest. Skips never stop the build; they land in report.json and on the console.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from portraitbooth_core.vocabulary import CLASS_WORDS

from .captions import CaptionError, TokenFinder, caption_info, read_caption
from .face_crops import CropSettings, FaceCrop, face_crop
from .shards import FORMAT, INDEX, ShardWriter, write_json_atomic
from .sources import Person, SkipError, find_people, load_image, video_frames

log = logging.getLogger("portraitbooth.training")
STATE = "build_state.json"
REPORT = "report.json"


@dataclass
class BuildSettings:
    crops: CropSettings = field(default_factory=CropSettings)
    caption_template: str = ""        # e.g. "a photo of a {word}", for files without a sidecar
    default_word: str = ""            # class word for the template when the person has no class.txt
    synonyms: dict = field(default_factory=lambda: {k: list(v) for k, v in CLASS_WORDS.items()})
    shard_size: int = 1000            # samples per shard (closed at the next person boundary)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


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


class DatasetBuilder:
    def __init__(self, source: str | Path, output: str | Path, encoder, settings: BuildSettings = BuildSettings(),
                 finder: TokenFinder | None = None, progress: bool = True):
        self.source, self.output = Path(source), Path(output)
        self.encoder, self.settings = encoder, settings
        self.finder = finder or TokenFinder()
        self.progress = progress
        self.state: dict = {}
        self.skipped: list[dict] = []
        self.warnings: list[str] = []
        self.subject_words: dict[str, set[str]] = {}  # identity word -> words captions used, pending

    # -- per person ------------------------------------------------------------------
    def _analyze(self, name: str, image: np.ndarray) -> FaceCrop | None:
        try:
            return face_crop(self.encoder, image, self.settings.crops)
        except SkipError as exc:
            self.skipped.append({"file": name, "reason": str(exc)})
            return None

    def _person_samples(self, person: Person) -> list[dict]:
        """(target, reference, caption) triples of one person, skips recorded."""
        rel = lambda p: str(p.relative_to(self.source))  # noqa: E731
        photos: list[tuple[str, FaceCrop]] = []
        for path in person.images:
            try:
                crop = self._analyze(rel(path), load_image(path))
            except SkipError as exc:
                self.skipped.append({"file": rel(path), "reason": str(exc)})
                continue
            if crop is not None:
                photos.append((rel(path), crop))
        pairs = []  # (target name, target crop, reference name, reference crop, caption source path)
        for i, (name, crop) in enumerate(photos):
            ref_name, ref = photos[(i + 1) % len(photos)]
            if len(photos) == 1:
                self.warnings.append(f"{name}: the only usable photo of '{person.name}'; its reference face "
                                     f"is the same photo (add another photo of this person)")
            pairs.append((name, crop, ref_name, ref, self.source / name))
        for path in person.videos:
            try:
                targets, middle = video_frames(path)
            except SkipError as exc:
                self.skipped.append({"file": rel(path), "reason": str(exc)})
                continue
            ref = self._analyze(f"{rel(path)}#middle", middle)
            if ref is None:
                continue
            for k, frame in enumerate(targets):
                crop = self._analyze(f"{rel(path)}#target{k}", frame)
                if crop is not None:
                    pairs.append((f"{rel(path)}#target{k}", crop, f"{rel(path)}#middle", ref, path))
        samples = []
        for name, crop, ref_name, ref, caption_path in pairs:
            try:
                info = caption_info(read_caption(caption_path), self.finder, self.settings.caption_template,
                                    person.class_word or self.settings.default_word, self.settings.synonyms)
            except (CaptionError, json.JSONDecodeError) as exc:
                self.skipped.append({"file": name, "reason": str(exc)})
                continue
            meta = {"person": person.name, "source": name, "reference_source": ref_name,
                    "reference_same_image": ref_name == name, "caption": info.caption,
                    "identity_word": info.identity_word, "identity_positions": info.identity_positions,
                    "expression_words": info.expression_words, "expression_positions": info.expression_positions,
                    "subject_word": info.subject_word, "box": crop.box.tolist(), "landmarks": crop.landmarks.tolist()}
            self.subject_words.setdefault(info.identity_word, set()).add(info.subject_word)
            samples.append({"jpg": encode_image(crop.image, "JPEG", quality=95),
                            "mask.png": encode_image(crop.mask), "ref.png": encode_image(ref.aligned),
                            "emb.npy": _npy(ref.embedding), "json": json.dumps(meta).encode()})
        return samples

    # -- the whole build ---------------------------------------------------------------
    def identity(self) -> dict:
        """Everything that decides what a sample holds: the build settings and the face
        encoder (its embeddings, masks and detections). A build resumes only when this is
        unchanged, so one dataset never mixes, e.g., 128-d dlib and 512-d ArcFace embeddings."""
        return {"settings": json.loads(json.dumps(asdict(self.settings))), "face_encoder": encoder_identity(self.encoder)}

    def _load_state(self) -> None:
        path = self.output / STATE
        identity = self.identity()
        fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        fresh = {"fingerprint": fingerprint, "identity": identity, "shards": [], "people_done": [], "skipped": [],
                 "warnings": [], "next_key": 0, "embedding_dim": None, "subject_words": {}}
        if path.is_file():
            state = json.loads(path.read_text())
            old = state.get("identity")
            legacy = old is None and state.get("fingerprint") == self.settings.fingerprint() and \
                state.get("embedding_dim") in (None, identity["face_encoder"]["dim"])
            if state.get("fingerprint") != fingerprint and not legacy:
                what = "; ".join(_differences(old, identity)) if isinstance(old, dict) else \
                    "the build settings or the face encoder (recorded before this version named them)"
                raise ValueError(f"{self.output} holds a dataset built with other settings ({what}), so this build "
                                 f"cannot continue it: samples of both would mix in one dataset. Build with the "
                                 f"recorded settings and face encoder to continue it, or use a new output folder "
                                 f"(or delete {STATE} there to start over).")
            state["fingerprint"], state["identity"] = fingerprint, identity  # a legacy state, now named
            self.state = state
            state.setdefault("subject_words", {})  # a state file from before words were recorded
        else:
            self.state = fresh
        for tmp in self.output.glob(".*.tmp"):  # a shard an interrupted build never closed
            tmp.unlink()

    def _flush(self, writer: ShardWriter, people: list[str]) -> None:
        entry = writer.close()
        s = self.state
        s["shards"].append(entry)
        s["people_done"] += people
        s["skipped"] += self.skipped
        s["warnings"] += self.warnings
        self._merge_subject_words()
        self.skipped, self.warnings = [], []
        write_json_atomic(self.output / STATE, s)

    def _merge_subject_words(self) -> None:
        # Recorded with the people they came from: a rerun redoes unflushed people, so their
        # words must not be in the state before their shard is closed.
        seen = self.state["subject_words"]
        for word, written in self.subject_words.items():
            seen[word] = sorted(set(seen.get(word, [])) | written)
        self.subject_words = {}

    def build(self) -> dict:
        """Build (or finish building) the dataset; returns the report."""
        self.output.mkdir(parents=True, exist_ok=True)
        self._load_state()
        people = [p for p in find_people(self.source) if p.name not in set(self.state["people_done"])]
        writer, pending = None, []
        bar = _progress(people, self.progress)
        for person in bar:
            samples = self._person_samples(person)
            if samples and writer is None:
                writer = ShardWriter(self.output, f"shard-{len(self.state['shards']):05d}")
            for sample in samples:
                dim = int(np.load(io.BytesIO(sample["emb.npy"])).shape[0])
                self.state["embedding_dim"] = self.state["embedding_dim"] or dim
                writer.add(f"{self.state['next_key']:08d}", sample)
                self.state["next_key"] += 1
            pending.append(person.name)
            if writer is not None and len(writer.keys) >= self.settings.shard_size:
                self._flush(writer, pending)
                writer, pending = None, []
        if writer is not None:
            self._flush(writer, pending)
        elif pending or self.skipped or self.warnings:
            self._flush_empty(pending)
        return self._finish()

    def _flush_empty(self, people: list[str]) -> None:
        s = self.state
        s["people_done"] += people
        s["skipped"] += self.skipped
        s["warnings"] += self.warnings
        self._merge_subject_words()
        self.skipped, self.warnings = [], []
        write_json_atomic(self.output / STATE, s)

    def _finish(self) -> dict:
        s = self.state
        enc = self.encoder
        recognizer = getattr(enc, "recognizer", None)
        index = {"format": FORMAT, "resolution": self.settings.crops.resolution,
                 "samples": sum(sh["count"] for sh in s["shards"]), "shards": s["shards"],
                 "face_encoder": {"kind": enc.kind, "dim": s["embedding_dim"], "feature": "final",
                                  "recognizer": recognizer_record(recognizer, getattr(enc, "settings", {})),
                                  "settings": getattr(enc, "settings", {})},
                 "identity_words": sorted(self.settings.synonyms),
                 # the other words the kept captions used for each identity word; export
                 # lists them in the weight file so the model accepts them in prompts
                 "class_synonyms": class_synonyms_seen(s["subject_words"]),
                 "build": asdict(self.settings)}
        write_json_atomic(self.output / INDEX, index)
        report = {"samples": index["samples"], "shards": len(s["shards"]), "people": len(s["people_done"]),
                  "skipped": s["skipped"], "warnings": s["warnings"]}
        write_json_atomic(self.output / REPORT, report)
        return report


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


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'name: recorded -> now' for each leaf that differs between two identities."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a, sort_keys=True)} recorded, {json.dumps(b, sort_keys=True)} now")
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


def _progress(items, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc="people", unit="person")
    except ImportError:
        return items


def format_report(report: dict) -> str:
    lines = [f"dataset: {report['samples']} samples in {report['shards']} shard(s) from {report['people']} "
             f"people; {len(report['skipped'])} file(s) skipped"]
    lines += [f"  skipped {s['file']}: {s['reason']}" for s in report["skipped"]]
    lines += [f"  warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
