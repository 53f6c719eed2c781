"""insightface model packs: find them on disk, and load their models through insightface.

Layout (as insightface and other ComfyUI packs expect): <models>/insightface/models/<pack>/
with *.onnx files, e.g. antelopev2 (scrfd_10g_bnkps.onnx, glintr100.onnx, genderage.onnx,
...) or buffalo_l (det_10g.onnx, w600k_r50.onnx, genderage.onnx, ...). Which file does what
is decided by insightface's model zoo (by the files' input/output shapes, not their
names), so renamed or third-party packs work as they do in FaceAnalysis.

Finding the folder is ours, and strict: a pack unpacked one level too deep
(antelopev2/antelopev2/*.onnx, the usual result of unzipping) is found; a missing or empty
folder is a PackError naming the folder searched. insightface is never asked to find a pack
by name, which is when it downloads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import IncompletePackError, PackError

KNOWN_PACKS = ("antelopev2", "buffalo_l", "buffalo_m", "buffalo_s", "buffalo_sc")
# insightface task name -> what the report calls it, and whether the pack uses it.
ROLES = {"detection": "detector", "recognition": "recognizer", "genderage": "gender/age model"}
OTHER_TASKS = {"landmark_3d_68": "3-D landmark model (not used)", "landmark_2d_106": "106-point landmark model "
               "(not used)", "inswapper": "face swapper (not used)"}


@dataclass
class PackFiles:
    """What one pack folder holds, after insightface routed every ONNX file in it."""

    folder: Path
    detector: Path | None = None
    recognizer: Path | None = None
    genderage: Path | None = None
    unused: dict[str, str] = field(default_factory=dict)  # file name -> role
    corrupt: dict[str, str] = field(default_factory=dict)  # file name -> error
    models: dict[Path, object] = field(default_factory=dict)  # insightface model objects of the used files


def _onnx_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.onnx") if p.is_file())


def _pack_dir(folder: Path) -> Path:
    # Zips of antelopev2 often unpack to antelopev2/antelopev2/*.onnx: look one level down.
    if not _onnx_files(folder):
        subs = [d for d in sorted(folder.iterdir()) if d.is_dir() and _onnx_files(d)]
        if len(subs) == 1:
            return subs[0]
    return folder


def pack_onnx_files(folder: str | os.PathLike) -> list[Path]:
    """The *.onnx files inspect_pack(folder) opens (itself or its one nested folder), so a
    caller can check each of them (e.g. where its symlinks lead) before they are loaded."""
    folder = Path(folder)
    return _onnx_files(_pack_dir(folder)) if folder.is_dir() else []


def find_packs(roots: list[str | os.PathLike]) -> dict[str, Path]:
    """Pack name -> folder, for every <root>/models/<pack>/ holding *.onnx files."""
    packs: dict[str, Path] = {}
    for root in roots:
        base = Path(root) / "models"
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            real = _pack_dir(folder)
            if _onnx_files(real):
                packs.setdefault(folder.name, real)
    return packs


def pack_folder(folder: str | os.PathLike) -> Path:
    """The folder holding the pack's *.onnx files (itself or its one nested folder), or PackError."""
    folder = Path(folder)
    where = folder.resolve()
    if not folder.is_dir():
        raise PackError(
            f"Face model pack folder not found: {where}\n"
            f"Put the pack's *.onnx files in models/insightface/models/<pack>/ (e.g. {', '.join(KNOWN_PACKS[:2])}) "
            "or choose the zero-download RetinaFace detector. Packs are never downloaded automatically.")
    real = _pack_dir(folder)
    if not _onnx_files(real):
        subs = sorted(d.name for d in folder.iterdir() if d.is_dir())
        inside = (f"its subfolders ({', '.join(subs[:8])}{', ...' if len(subs) > 8 else ''}) hold no single pack"
                  if subs else "it has no subfolders either")
        raise PackError(
            f"The face model pack folder {where} is empty: no *.onnx files in it, and {inside}.\n"
            "Unpack the pack (e.g. antelopev2.zip) so that its *.onnx files sit directly in that folder, or "
            "choose the zero-download RetinaFace detector. Packs are never downloaded automatically.")
    return real


def inspect_pack(folder: str | os.PathLike, providers: list[str] | None = None) -> PackFiles:
    """Route every *.onnx of a pack folder with insightface's model zoo; never raises on a file.

    The models of the first detector, recognizer and gender/age model are kept (on the
    CPU unless `providers` says otherwise); other files are listed with their role.
    """
    from .insight import cpu, load_model, use_providers

    folder = Path(folder)
    info = PackFiles(folder=folder)
    if not folder.is_dir():
        return info
    real = _pack_dir(folder)
    info.folder = real
    for path in _onnx_files(real):
        try:
            model = load_model(path, cpu())
        except (ImportError, PackError):
            raise
        except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime raise their own types for bad files
            info.corrupt[path.name] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            continue
        task = getattr(model, "taskname", None) if model is not None else None
        if task is None and model is not None and type(model).__name__ == "INSwapper":
            task = "inswapper"
        if task in ROLES and getattr(info, _attr(task)) is None:
            setattr(info, _attr(task), path)
            info.models[path] = model
        elif task in ROLES:
            info.unused[path.name] = f"second {ROLES[task]} (not used)"
        else:
            info.unused[path.name] = OTHER_TASKS.get(task, "unknown model (not used)")
    if providers is not None:
        for model in info.models.values():
            use_providers(model, providers)
    return info


def _attr(task: str) -> str:
    return {"detection": "detector", "recognition": "recognizer", "genderage": "genderage"}[task]


def load_pack(folder: str | os.PathLike, need_detector: bool = True, need_recognizer: bool = True,
              providers: list[str] | None = None) -> PackFiles:
    """inspect_pack, raising PackError that lists what is missing or corrupt and where we looked."""
    real = pack_folder(folder)
    info = inspect_pack(real, providers)
    missing = {}
    if need_detector and info.detector is None:
        missing["detector"] = "a face detector (SCRFD, e.g. det_10g.onnx or scrfd_10g_bnkps.onnx)"
    if need_recognizer and info.recognizer is None:
        missing["recognizer"] = "a face recognizer (ArcFace, e.g. w600k_r50.onnx or glintr100.onnx)"
    if missing:
        lines = [f"The face model pack in {info.folder.resolve()} is incomplete: missing "
                 + " and ".join(missing.values()) + "."]
        found = [p.name for p in _onnx_files(info.folder)]
        lines.append(f"Files found there: {', '.join(found) if found else 'no *.onnx files'}.")
        for name, err in info.corrupt.items():
            lines.append(f"  {name} could not be opened (corrupt or partly downloaded?): {err}")
        for name, role in info.unused.items():
            lines.append(f"  {name}: {role}")
        lines.append("Download the complete pack again and unpack it so that the *.onnx files sit directly "
                     "in that folder.")
        raise IncompletePackError("\n".join(lines), tuple(missing))
    return info
