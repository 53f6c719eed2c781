"""Score a folder of generated images against a folder of reference subjects.

Layouts (the protocol runner writes exactly these):

    references/obama/*.jpg      one subfolder per subject (its photos are averaged), or
    references/obama.jpg        one file per subject (the name is the subject)

    images/obama/*.png          scored against subject "obama"
    images/obama+biden/*.png    two subjects in one image: faces matched greedily
    images/*.png                against the only subject, or, with several, against all
                                of them at once (group images)
    images/prompts.json         optional {"obama/x.png": {"prompt": ..., "category": ...}}:
                                the prompt for CLIP-T and the expression coefficient

Identity comes from the pack's recognizer (default) or FastComposer's MTCNN + FaceNet
(evaluation.facenet); result["identity_metric"] says which.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from portraitbooth_core.face import DEFAULT_DET_THRESHOLD, Identity
from portraitbooth_core.scoring.identity_score import IdentityScorer

from .facenet import FaceNetMetric  # facenet-pytorch itself is imported only when the metric is built

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MANIFEST = "prompts.json"


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.array(ImageOps.exif_transpose(im).convert("RGB"))


def find_subjects(references: Path) -> dict[str, list[Path]]:
    """subject name -> its photos."""
    if not references.is_dir():
        raise FileNotFoundError(f"references folder {references} does not exist")
    subjects = {p.stem: [p] for p in image_files(references)}
    for sub in sorted(p for p in references.iterdir() if p.is_dir()):
        if image_files(sub):
            subjects[sub.name] = image_files(sub)
    if not subjects:
        raise FileNotFoundError(f"no reference photos in {references} (expected image files or one subfolder "
                                "of photos per subject)")
    return subjects


@dataclass
class Job:
    path: Path
    rel: str  # path relative to the images folder, as in prompts.json
    subjects: list[str]
    prompt: str | None = None
    category: str | None = None
    extra: dict = field(default_factory=dict)


def plan_jobs(images: Path, subjects: list[str]) -> list[Job]:
    """Which subjects each generated image is scored against (see the module docstring)."""
    if not images.is_dir():
        raise FileNotFoundError(f"images folder {images} does not exist")
    manifest = json.loads((images / MANIFEST).read_text()) if (images / MANIFEST).is_file() else {}
    jobs = [Job(p, p.name, list(subjects)) for p in image_files(images)]
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        names = folder.name.split("+")
        unknown = [n for n in names if n not in subjects]
        if unknown:
            raise ValueError(f"images/{folder.name}/ names subject(s) {unknown} that have no reference photos "
                             f"(known: {subjects}); name image subfolders after reference subjects, "
                             "joined by '+' for multi-subject images")
        jobs += [Job(p, f"{folder.name}/{p.name}", names) for p in image_files(folder)]
    for job in jobs:
        entry = manifest.get(job.rel, {})
        job.prompt, job.category = entry.get("prompt"), entry.get("category")
        job.extra = {k: v for k, v in entry.items() if k not in ("prompt", "category")}
    if not jobs:
        raise FileNotFoundError(f"no images in {images}")
    return jobs


def facenet_references(metric: FaceNetMetric, subjects: dict[str, list[Path]],
                       log=print) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(subject -> FaceNet embedding, subject -> the photo it came from): one photo per
    subject, the first by name with a face, as FastComposer does (see evaluation.facenet)."""
    refs, used = {}, {}
    for name, photos in subjects.items():
        refs[name], photo = metric.reference(photos, read_rgb, log)
        used[name] = str(photo)
        if len(photos) > 1:
            log(f"[score] facenet: subject {name!r} is {photo.name} (FastComposer's metric uses one photo)")
    return refs, used


def build_identities(encoder, subjects: dict[str, list[Path]], det_threshold: float) -> dict[str, Identity]:
    out = {}
    for name, photos in subjects.items():
        analysis = encoder.analyze([read_rgb(p) for p in photos], on_no_face="skip", det_threshold=det_threshold,
                                   names=[str(p) for p in photos])
        out[name] = analysis.identity
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(records: list[dict], key: str) -> dict[str, dict]:
    """Means of the scores grouped by a record field ('category', 'group')."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r.get(key) or "-", []).append(r)
    groups["all"] = records
    return {name: {"images": len(rs), "identity": _mean(r["identity"] for r in rs),
                   "face_rate": _mean(float(r["face_found"]) for r in rs),
                   "clip_text": _mean(r.get("clip_text") for r in rs),
                   "expression": _mean(r.get("expression") for r in rs)}
            for name, rs in groups.items()}


def identity_metric(encoder) -> str:
    """What made the identity numbers: 'facenet (...)' or 'pack (<recognizer>)'."""
    return encoder.description if isinstance(encoder, FaceNetMetric) else f"pack ({encoder.kind})"


def score_folder(references: Path, images: Path, encoder, clip=None, det_threshold: float = DEFAULT_DET_THRESHOLD,
                 log=print) -> dict:
    """Everything the report needs, as plain JSON-able data.

    `encoder` is the identity metric: a pack FaceEncoder, or evaluation.facenet.FaceNetMetric
    (FastComposer's MTCNN + FaceNet; it ignores `det_threshold`, MTCNN has its own)."""
    subjects = find_subjects(references)
    facenet = isinstance(encoder, FaceNetMetric)
    if facenet:
        identities, reference_photos = facenet_references(encoder, subjects, log)
    else:
        identities, reference_photos = build_identities(encoder, subjects, det_threshold), None
    jobs = plan_jobs(images, list(subjects))
    scorers: dict[tuple, IdentityScorer] = {}
    records = []
    for i, job in enumerate(jobs):
        key = tuple(job.subjects)
        if key not in scorers:
            scorers[key] = IdentityScorer(encoder, [identities[s] for s in key], det_threshold)
        result = scorers[key].score_image(read_rgb(job.path), i)
        records.append({"file": job.rel, "group": "+".join(job.subjects), "subjects": job.subjects,
                        "prompt": job.prompt, "category": job.category, "identity": result.score,
                        "faces": result.faces, "face_found": result.face_found,
                        "per_subject": [{"subject": job.subjects[s.subject], "score": s.score, "cosine": s.cosine,
                                         "face": s.face} for s in result.subjects],
                        "boxes": result.boxes, **job.extra})
        log(f"[score] {i + 1}/{len(jobs)} {job.rel}: identity {result.score:.3f}"
            + ("" if result.faces else " (no face)"))
    if clip is not None:
        _add_clip(records, jobs, clip, log)
    out = {"identity_metric": identity_metric(encoder), "recognizer": encoder.kind,
           "encoder": f"detector {encoder.detector_name if facenet else encoder.detector.name}, "
                      f"recognizer {encoder.recognizer.name}",
           # MTCNN's three stage thresholds replace the pack detector's one
           "det_threshold": encoder.settings["thresholds"] if facenet else det_threshold,
           "subjects": {k: [str(p) for p in v] for k, v in subjects.items()}, "images": records,
           "by_category": summarize(records, "category"), "by_subjects": summarize(records, "group")}
    if facenet:
        out["reference_photos"] = reference_photos  # FastComposer's metric uses one photo per subject
        out["facenet"] = encoder.settings
    return out


def _add_clip(records: list[dict], jobs: list[Job], clip, log, batch: int = 16) -> None:
    todo = [i for i, j in enumerate(jobs) if j.prompt]
    if not todo:
        log("[score] CLIP: no prompts known (no prompts.json), CLIP-T and expression skipped")
    for start in range(0, len(todo), batch):
        part = todo[start:start + batch]
        pics = [read_rgb(jobs[i].path) for i in part]
        prompts = [jobs[i].prompt for i in part]
        for i, t, e in zip(part, clip.text_image(pics, prompts), clip.expression(pics, prompts)):
            records[i]["clip_text"], records[i]["expression"] = t, e
        log(f"[score] CLIP {min(start + batch, len(todo))}/{len(todo)}")


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
