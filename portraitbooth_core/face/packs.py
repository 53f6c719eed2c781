"""insightface model packs: find them, and route each ONNX file to its job.

Layout (as insightface and other ComfyUI packs expect): <models>/insightface/models/<pack>/
with *.onnx files, e.g. antelopev2 (scrfd_10g_bnkps.onnx, glintr100.onnx, ...) or
buffalo_l (det_10g.onnx, w600k_r50.onnx, ...). Files are routed by their input/output
shapes, not their names, so renamed or third-party packs work too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PackError

KNOWN_PACKS = ("antelopev2", "buffalo_l", "buffalo_m", "buffalo_s", "buffalo_sc")


@dataclass
class PackFiles:
    """What one pack folder holds, after opening every ONNX file in it."""

    folder: Path
    detector: Path | None = None
    recognizer: Path | None = None
    unused: dict[str, str] = field(default_factory=dict)  # file name -> role
    corrupt: dict[str, str] = field(default_factory=dict)  # file name -> error
    sessions: dict[Path, object] = field(default_factory=dict)  # CPU sessions opened for routing


def _pack_dir(folder: Path) -> Path:
    # Zips of antelopev2 often unpack to antelopev2/antelopev2/*.onnx: look one level down.
    if not any(folder.glob("*.onnx")):
        subs = [d for d in folder.iterdir() if d.is_dir() and any(d.glob("*.onnx"))]
        if len(subs) == 1:
            return subs[0]
    return folder


def find_packs(roots: list[str | os.PathLike]) -> dict[str, Path]:
    """Pack name -> folder, for every <root>/models/<pack>/ holding *.onnx files."""
    packs: dict[str, Path] = {}
    for root in roots:
        base = Path(root) / "models"
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            real = _pack_dir(folder)
            if any(real.glob("*.onnx")):
                packs.setdefault(folder.name, real)
    return packs


def classify(session) -> str:
    """'detector' | 'recognizer' | another role, from an onnxruntime session's signature."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape
    if len(outputs) >= 5:
        return "detector"
    if len(inputs) == 2:
        return "face swapper (not used)"
    h, w = (shape[2], shape[3]) if len(shape) == 4 else (None, None)
    if h == 192 and w == 192:
        return "landmark model (not used)"
    if h == 96 and w == 96:
        return "gender/age model (not used)"
    if isinstance(h, int) and h == w and h >= 112 and h % 16 == 0 and len(outputs) == 1:
        return "recognizer"
    return "unknown model (not used)"


def inspect_pack(folder: str | os.PathLike) -> PackFiles:
    """Open every *.onnx in the folder (CPU) and sort them into roles; never raises on files."""
    from .runtime import make_session

    folder = Path(folder)
    info = PackFiles(folder=folder)
    if not folder.is_dir():
        return info
    real = _pack_dir(folder)
    info.folder = real
    for path in sorted(real.glob("*.onnx")):
        try:
            session = make_session(path, "cpu")
        except Exception as exc:  # onnxruntime raises its own types for bad protobufs
            info.corrupt[path.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        role = classify(session)
        if role in ("detector", "recognizer") and getattr(info, role) is None:
            setattr(info, role, path)
            info.sessions[path] = session
        else:
            info.unused[path.name] = role if role not in ("detector", "recognizer") else f"second {role} (not used)"
    return info


def load_pack(folder: str | os.PathLike, need_detector: bool = True, need_recognizer: bool = True) -> PackFiles:
    """inspect_pack, raising PackError that lists what is missing or corrupt and where we looked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PackError(
            f"Face model pack folder not found: {folder.resolve()}\n"
            f"Put the pack's *.onnx files in models/insightface/models/<pack>/ (e.g. {', '.join(KNOWN_PACKS[:2])}) "
            "or choose the zero-download RetinaFace detector.")
    info = inspect_pack(folder)
    missing = []
    if need_detector and info.detector is None:
        missing.append("a face detector (SCRFD, e.g. det_10g.onnx or scrfd_10g_bnkps.onnx)")
    if need_recognizer and info.recognizer is None:
        missing.append("a face recognizer (ArcFace, e.g. w600k_r50.onnx or glintr100.onnx)")
    if missing:
        lines = [f"The face model pack in {info.folder.resolve()} is incomplete: missing " + " and ".join(missing) + "."]
        found = sorted(p.name for p in info.folder.glob("*.onnx")) if info.folder.is_dir() else []
        lines.append(f"Files found there: {', '.join(found) if found else 'no *.onnx files'}.")
        for name, err in info.corrupt.items():
            lines.append(f"  {name} could not be opened (corrupt or partly downloaded?): {err}")
        for name, role in info.unused.items():
            lines.append(f"  {name}: {role}")
        lines.append("Download the complete pack again and unpack it so that the *.onnx files sit directly "
                     "in that folder.")
        raise PackError("\n".join(lines))
    return info
