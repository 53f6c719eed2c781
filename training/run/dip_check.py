"""Before training: can this dataset feed DIP's identity loss?

L_id runs the frozen ArcFace recognizer the dataset was built with, as torch, on the
decoded one-step estimate. A dataset built with the dlib recognizer (128-d, no torch
twin), a recorded recognizer that is not found, or a recognizer whose embeddings are not
the dataset's would silently train without L_id (or against the wrong identity space),
so each of these stops the run before any model is loaded, with the fix spelled out.
Only an explicit id_weight=0 trains without L_id, and says so once.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch

from ..config import TrainConfig
from ..dataset.shards import INDEX, RECOGNIZER_DIRS_ENV, default_recognizer_roots, recorded_recognizer

log = logging.getLogger("portraitbooth.training")

BUILD_FIX = ("rebuild the dataset with a face pack (SCRFD + ArcFace ONNX): `python -m training build <people folder> "
             "<new dataset folder> --pack models/insightface/models/antelopev2`")


class IdentityLossError(ValueError):
    """The dataset cannot feed the identity loss with these settings; the message says how to fix it."""


def _fixes(node: bool, file: str = "<recognizer>.onnx") -> tuple[str, str]:
    """(how to name a recognizer file, how to turn L_id off) in the words of the caller's UI."""
    if node:
        return (f"set the node input `recognizer` to that ONNX file ({file}, under ComfyUI's models or input folder)",
                "or train without the identity loss: put `id_weight=0` in extra_settings")
    return (f"pass it with `--set recognizer=/path/to/{file}`",
            "or train without the identity loss: `--set id_weight=0`")


def identity_recognizer(face: dict, config: TrainConfig, roots: Iterable[str | Path] | None = None,
                        dataset: str | Path = "", node: bool = False) -> Path | None:
    """The recognizer ONNX for L_id, or None when config.id_weight is 0 (logged once).

    face: the dataset's index.json `face_encoder`; roots: where packs are looked up
    (shards.recorded_recognizer; None: the command line's defaults); node: word the fixes
    for the DIP Trainer node's inputs instead of `--set`. Raises IdentityLossError."""
    if config.id_weight <= 0:
        log.info("id_weight=0: training without the identity loss (DIP)")
        return None
    where = f"the dataset {dataset}" if dataset else "the dataset"
    kind, dim = str(face.get("kind", "?")), face.get("dim")
    rec = face.get("recognizer") if isinstance(face.get("recognizer"), dict) else {}
    file = str(rec.get("file") or Path(str(face.get("recognizer_path") or "<recognizer>.onnx")).name)
    name_it, off = _fixes(node, file)
    if not kind.startswith("arcface"):
        raise IdentityLossError(
            f"{where} was built with the {kind} face encoder ({dim}-d embeddings), which has no differentiable "
            f"recognizer, so the identity loss (DIP, id_weight={config.id_weight:g}) cannot run. Fix: {BUILD_FIX} "
            f"(or `--recognizer arcface` with the pack you have); {off}.")
    if config.recognizer:
        path = Path(config.recognizer)
        if not path.is_file():
            raise IdentityLossError(f"recognizer {config.recognizer!r} is not a file. Fix: {name_it}; {off}.")
        return path
    path = recorded_recognizer(face, None if roots is None else list(roots))
    if path is None or not path.is_file():
        searched = default_recognizer_roots() if roots is None else list(roots)
        pack = rec.get("pack") or Path(str(face.get("recognizer_path") or "?")).parent.name
        look = ", ".join(str(r) for r in searched) or "no folder"
        extra = "" if node else f" (or list the folder holding it in {RECOGNIZER_DIRS_ENV})"
        raise IdentityLossError(
            f"{where} was built with the recognizer {pack}/{file} ({kind}, {dim}-d), and it is not found under "
            f"{look}, so the identity loss (DIP) cannot run. Fix: put the face pack folder '{pack}' under "
            f"models/insightface/models{extra}; or {name_it}; {off}.")
    return path


def check_embedding_size(recognizer: torch.nn.Module, face: dict, config: TrainConfig, node: bool = False) -> None:
    """The recognizer's final embedding must have the dataset's size: another network
    (e.g. a 512-d ArcFace for a 128-d dlib build) scores identity in another space."""
    size = int(getattr(recognizer, "input_size", 112))
    param = next(iter(recognizer.buffers()), None)
    probe = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
    with torch.no_grad():
        final = recognizer.forward_all(probe)[0] if hasattr(recognizer, "forward_all") else recognizer(probe)
    got, want = int(final.shape[-1]), face.get("dim")
    if want is not None and got != int(want):
        name_it, off = _fixes(node, str((face.get("recognizer") or {}).get("file", "<recognizer>.onnx")))
        raise IdentityLossError(
            f"recognizer {getattr(recognizer, 'path', '?')} gives {got}-d embeddings, but the dataset's {INDEX} "
            f"records {want}-d ones from {face.get('kind', '?')}: it is not the recognizer the dataset was built "
            f"with. Fix: use the recognizer of {face.get('kind', '?')} ({name_it}), or {BUILD_FIX} using this "
            f"recognizer's pack; {off}.")
