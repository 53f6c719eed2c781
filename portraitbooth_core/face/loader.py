"""Build a FaceEncoder from user settings (what the Load FaceEncoder node exposes)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .encoder import FaceEncoder
from .errors import FaceAnalysisError
from ..optional import MissingDependencyError
from .parsing import PARSING_WEIGHTS, FaceParser, announce_fallback, announce_unreadable

DETECTORS = ("auto", "scrfd (pack)", "retinaface (zero-download)")
RECOGNIZERS = ("auto", "arcface (pack)", "dlib (zero-download)")


def find_parsing_weights(folders: list[str | os.PathLike]) -> Path | None:
    """First parsing_bisenet.pth in these folders (or their weights/ subfolder, facexlib's layout)."""
    for folder in folders:
        for candidate in (Path(folder) / PARSING_WEIGHTS, Path(folder) / "weights" / PARSING_WEIGHTS):
            if candidate.is_file():
                return candidate
    return None


def build_encoder(pack_dir: str | os.PathLike | None = None, detector: str = "auto", recognizer: str = "auto",
                  provider: str = "auto", det_size: int = 640, parsing_weights: str | os.PathLike | None = None,
                  parsing_searched: str = "", ears: bool = False, hair: bool = False,
                  neck: bool = False, device: str | torch.device | None = None) -> FaceEncoder:
    """Detector + recognizer + mask maker. pack_dir=None means the zero-download backends.

    `provider` places the onnxruntime models; `device` the torch ones (face parsing): the
    caller's torch device (ComfyUI's, from the node), or by default CUDA when torch sees it
    and the provider is not 'cpu'. Their results come back to the CPU either way.

    With a pack, its SCRFD, ArcFace and gender/age model (when the pack has one) run through
    insightface (see insight.py); a missing or empty pack folder is a PackError."""
    det = detector.split(" ")[0]
    rec = recognizer.split(" ")[0]
    if det == "auto":
        det = "scrfd" if pack_dir else "retinaface"
    if rec == "auto":
        rec = "arcface" if pack_dir else "dlib"
    if pack_dir is None and "scrfd" in det:
        raise FaceAnalysisError("detector 'scrfd' comes from an insightface pack, but no pack was chosen. "
                                "Choose a pack in models/insightface/models/ or the RetinaFace detector.")
    if pack_dir is None and rec == "arcface":
        raise FaceAnalysisError("recognizer 'arcface' comes from an insightface pack, but no pack was chosen. "
                                "Choose a pack in models/insightface/models/ or the dlib recognizer.")
    files = None
    if pack_dir is not None and (det == "scrfd" or rec == "arcface"):
        from .packs import load_pack
        from .runtime import resolve_providers

        # insightface routes the pack's files (and any folder mistake is our PackError first).
        files = load_pack(pack_dir, need_detector=det == "scrfd", need_recognizer=rec == "arcface",
                          providers=resolve_providers(provider))

    if det == "scrfd":
        from .scrfd import SCRFDDetector

        path = files.detector
        detector_obj = SCRFDDetector(path, provider, det_size, model=files.models[path])
    elif det == "retinaface":
        from .retinaface import RetinaFaceDetector

        detector_obj = RetinaFaceDetector(provider)
    else:
        raise ValueError(f"unknown detector {detector!r}; choose one of {DETECTORS}")

    if rec == "arcface":
        from .arcface import ArcFaceRecognizer

        path = files.recognizer
        recognizer_obj = ArcFaceRecognizer(path, provider, model=files.models[path], pack=Path(pack_dir).name)
    elif rec == "dlib":
        from .dlib_recognizer import DlibRecognizer

        recognizer_obj = DlibRecognizer()
    else:
        raise ValueError(f"unknown recognizer {recognizer!r}; choose one of {RECOGNIZERS}")

    parser, note = None, ""
    if parsing_weights is not None:
        if device is None:
            device = "cuda" if provider != "cpu" and torch.cuda.is_available() else "cpu"
        try:
            parser = FaceParser(parsing_weights, device, ears=ears, hair=hair, neck=neck)
            note = f"face parsing (BiSeNet, {Path(parsing_weights).name})"
        except MissingDependencyError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
            # Masks still work without parsing: the ellipse fallback, said loudly.
            note = "fallback ellipse - " + announce_unreadable(parsing_weights, exc)
    else:
        note = "fallback ellipse - " + announce_fallback(parsing_searched or "no folder given")
    attributes = None
    if files is not None and files.genderage is not None:
        from .arcface import GenderAgeModel

        attributes = GenderAgeModel(files.genderage, model=files.models[files.genderage])
    settings = {"pack": Path(pack_dir).name if pack_dir else None, "detector": det, "recognizer": rec,
                "recognizer_kind": recognizer_obj.kind, "provider": provider, "det_size": det_size,
                "masks": "bisenet" if parser else "fallback",
                "gender_age": Path(files.genderage).name if attributes else None,
                # insightface packs see pixels as the insightface-based packs do (see images.to_uint8_rgb)
                "pixels": "truncate" if files is not None else "round"}
    return FaceEncoder(detector_obj, recognizer_obj, parser, note, settings, attributes=attributes)
