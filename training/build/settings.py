"""What a build is made with and what it records about that: its settings, the face
encoder (spec, identity, model files), parts (`--part i/N`) and the state file a rerun
must match (a difference is named with the option that sets it)."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from portraitbooth_core.vocabulary import CLASS_WORDS

from .face_crops import CropSettings

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
    # emotions, build.celebv_text), then "blip:FOLDER" (a local captioner, build.captioner).
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


def record_digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def legacy_record(state: dict) -> dict:
    return {"legacy": True, "shards": state.get("shards", []),
            "people": [{"name": n} for n in state.get("people_done", [])],
            "skipped": state.get("skipped", []), "warnings": state.get("warnings", []),
            "words": state.get("subject_words", {}), "embedding_dim": state.get("embedding_dim")}


def upgraded_record(old: dict, new: dict) -> dict:
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


def state_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'name: recorded -> now' for each leaf that differs between two identities, with the
    command-line option that sets it."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += state_differences(a, b, f"{prefix}{k}.")
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
