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

from .captions import DEFAULT_SYNONYMS, CaptionError, TokenFinder, caption_info, read_caption
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
    synonyms: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_SYNONYMS.items()})
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
                    "box": crop.box.tolist(), "landmarks": crop.landmarks.tolist()}
            samples.append({"jpg": encode_image(crop.image, "JPEG", quality=95),
                            "mask.png": encode_image(crop.mask), "ref.png": encode_image(ref.aligned),
                            "emb.npy": _npy(ref.embedding), "json": json.dumps(meta).encode()})
        return samples

    # -- the whole build ---------------------------------------------------------------
    def _load_state(self) -> None:
        path = self.output / STATE
        fresh = {"fingerprint": self.settings.fingerprint(), "shards": [], "people_done": [], "skipped": [],
                 "warnings": [], "next_key": 0, "embedding_dim": None}
        if path.is_file():
            state = json.loads(path.read_text())
            if state.get("fingerprint") != fresh["fingerprint"]:
                raise ValueError(f"{self.output} holds a dataset built with other settings; use a new output "
                                 f"folder (or delete {STATE} there to start over)")
            self.state = state
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
        self.skipped, self.warnings = [], []
        write_json_atomic(self.output / STATE, s)

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
        self.skipped, self.warnings = [], []
        write_json_atomic(self.output / STATE, s)

    def _finish(self) -> dict:
        s = self.state
        enc = self.encoder
        recognizer = getattr(enc, "recognizer", None)
        index = {"format": FORMAT, "resolution": self.settings.crops.resolution,
                 "samples": sum(sh["count"] for sh in s["shards"]), "shards": s["shards"],
                 "face_encoder": {"kind": enc.kind, "dim": s["embedding_dim"], "feature": "final",
                                  "recognizer_path": getattr(recognizer, "path", None),
                                  "settings": getattr(enc, "settings", {})},
                 "identity_words": sorted(self.settings.synonyms), "build": asdict(self.settings)}
        write_json_atomic(self.output / INDEX, index)
        report = {"samples": index["samples"], "shards": len(s["shards"]), "people": len(s["people_done"]),
                  "skipped": s["skipped"], "warnings": s["warnings"]}
        write_json_atomic(self.output / REPORT, report)
        return report


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
