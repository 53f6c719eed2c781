"""The files a FastComposer warm start loads, checked from their headers before any model
loads. FastComposer (mit-han-lab/fastcomposer, MIT) is STEA's design with a CLIP image
embedding instead of a face recognizer; `python -m training import-fastcomposer` writes
its parts as ComfyUI files (portraitbooth_core.weights.formats.fastcomposer):

- init_unet: the imported diffusion-model file, loaded over the SD1.5 checkpoint's UNet
  before training (any mode). It must be an SD1.5 UNet (portraitbooth_core.weights.
  family, from its header) of exactly the checkpoint UNet's keys and shapes.
- stage0_teacher / stage0_clip_vision: FastComposer's postfuse projector and its CLIP
  vision model, which stage 0 (training.run.stage0) fits the projector to.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from portraitbooth_core.bounded_json import load_json_bytes
from portraitbooth_core.weights.family import FAMILY_NAMES, UNET, family_from_shapes
from portraitbooth_core.weights.safetensors_header import read_header_as

log = logging.getLogger("portraitbooth.training")


IMPORT_HINT = "`python -m training import-fastcomposer pytorch_model.bin --models <ComfyUI>/models`"


UNET_HOW = (f"Give the diffusion-model file that {IMPORT_HINT} wrote "
            f"(models/diffusion_models/fastcomposer_unet.safetensors).")


TEACHER_HOW = (f"Give the FastComposer projector file that {IMPORT_HINT} wrote "
               f"(models/portraitbooth/fastcomposer_postfuse.safetensors).")


CLIP_HOW = (f"Give the CLIP vision file that {IMPORT_HINT} wrote "
            f"(models/clip_vision/fastcomposer_clip_vit_l14.safetensors) as stage0_clip_vision.")


ENCODE_CHUNK = 32        # reference crops per CLIP vision call


class WarmStartError(ValueError):
    """A warm-start setting that cannot be used; the message names the setting and the fix."""


class InitUnetError(WarmStartError):
    pass


class TeacherError(WarmStartError):
    pass


def resolve_file(value: str, setting: str, folder: str, how: str,
                 error: type[WarmStartError] = WarmStartError) -> Path:
    """A path as given (~ expanded), else a file name inside ComfyUI's `folder` models
    folder (when ComfyUI's folder_paths is importable). Raises naming the setting."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    if not path.is_absolute():
        try:
            import folder_paths

            found = folder_paths.get_full_path(folder, value)
        except (ImportError, KeyError):  # no ComfyUI folders registered (a bare CLI)
            found = None
        if found:
            return Path(found).resolve()
    what = "is a folder, not a file" if path.is_dir() else "not found"
    raise error(f"{setting}: {value} {what}. {how}")


def checked_header(path: Path, setting: str, error: type[WarmStartError], how: str) -> tuple[dict, dict]:
    """(shapes, metadata) of a warm-start file, or `error` naming the setting and the fix."""
    header = read_header_as(path, lambda text: error(f"{setting}: {text}"), "Copy or import it again.", how)
    return header.shapes, header.metadata


_MAX_STAMP = 16 << 20  # what import-fastcomposer records (a model config): bounded before parsing


def _import_stamp(meta: dict) -> dict:
    """What import-fastcomposer recorded about a file's origin (without the bulky config)."""
    try:
        stamp = load_json_bytes(meta.get("portraitbooth_import", "{}"), "portraitbooth_import", _MAX_STAMP)
    except ValueError:
        return {}
    return {k: v for k, v in stamp.items() if k != "config"} if isinstance(stamp, dict) else {}


def check_unet_file(value: str, setting: str = "init_unet") -> tuple[Path, str, dict, dict]:
    """From the header alone: (path, key prefix, UNet shapes by ComfyUI key, metadata) of an
    SD1.5 UNet file, or an InitUnetError saying what the file is instead."""
    path = resolve_file(value, setting, "diffusion_models", UNET_HOW, InitUnetError)
    shapes, meta = checked_header(path, setting, InitUnetError, UNET_HOW)
    if "portraitbooth" in meta:
        raise InitUnetError(f"{setting}: {path.name} is a PortraitBooth weight file (a projector), not a UNet. "
                            f"{UNET_HOW} A FastComposer projector file belongs in stage0_teacher.")
    prefix = UNET if any(k.startswith(UNET) for k in shapes) else ""
    if not prefix and any(k.startswith(("conv_in.", "down_blocks.", "unet.")) for k in shapes):
        raise InitUnetError(f"{setting}: {path.name} is a UNet in diffusers layout (conv_in.*, down_blocks.*), which "
                            f"ComfyUI's UNet does not read. Convert FastComposer's release with {IMPORT_HINT}.")
    family = family_from_shapes(shapes, prefix)
    if family != "sd15":
        kind = f"an {FAMILY_NAMES[family]} UNet" if family in FAMILY_NAMES else "not a Stable Diffusion UNet"
        raise InitUnetError(f"{setting}: {path.name} is {kind} (from its tensor shapes); PortraitBooth trains SD1.5 "
                            f"only, so the warm-start UNet must be SD1.5. {UNET_HOW}")
    have = {k[len(prefix):]: tuple(s) for k, s in shapes.items() if k.startswith(prefix)}
    return path, prefix, have, meta


def load_init_unet(unet: nn.Module, value: str, setting: str = "init_unet") -> dict[str, Any]:
    """Copy the UNet weights of the file `value` into `unet` (ComfyUI's UNetModel, e.g.
    the SD1.5 checkpoint's) and return what was loaded, for the run's records.

    Accepts a diffusion-model file (ComfyUI keys, what import-fastcomposer writes) or a
    full SD1.5 checkpoint (its model.diffusion_model.* part). Refused, before any
    tensor is read: not safetensors, truncated, a PortraitBooth file, a diffusers-layout
    UNet, another family than SD1.5, or any key or shape that differs from `unet`'s."""
    path, prefix, have, meta = check_unet_file(value, setting)
    target = unet.state_dict()
    want = {k: tuple(v.shape) for k, v in target.items()}
    missing = sorted(k for k in want if k not in have)
    unexpected = sorted(k for k in have if k not in want)
    wrong = [f"{k} {have[k]} (the checkpoint's UNet has {s})" for k, s in want.items() if k in have and have[k] != s]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                 f"{len(wrong)} with another shape (e.g. {'; '.join(wrong[:3])})" if wrong else ""]
        raise InitUnetError(f"{setting}: {path.name} does not fit the UNet of `checkpoint`: "
                            f"{', '.join(p for p in parts if p)}. Both must be full-size SD1.5 UNets "
                            f"(FastComposer's is). {UNET_HOW}")
    from safetensors import safe_open

    with torch.no_grad(), safe_open(str(path), framework="pt", device="cpu") as f:
        for key, tensor in target.items():
            tensor.copy_(f.get_tensor(prefix + key).to(tensor.dtype))
    info = {"file": path.name, "path": str(path), "bytes": path.stat().st_size, "tensors": len(want),
            "layout": "checkpoint (model.diffusion_model.*)" if prefix else "diffusion model",
            **({"source": _import_stamp(meta)} if _import_stamp(meta) else {})}
    log.info("init_unet: loaded %d UNet tensors from %s over the checkpoint's UNet", len(want), path)
    return info


def load_teacher(value: str, setting: str = "stage0_teacher"):
    """The PortraitBooth file holding FastComposer's postfuse projector (weights.file.
    PortraitBoothModel); anything else is a TeacherError saying what it is instead."""
    from portraitbooth_core.face.clip_image import is_clip_kind
    from portraitbooth_core.stea.postfuse import POSTFUSE_KIND
    from portraitbooth_core.weights.file import load_portraitbooth
    from portraitbooth_core.weights.meta import WeightFileError

    path = resolve_file(value, setting, "portraitbooth", TEACHER_HOW, TeacherError)
    try:
        model = load_portraitbooth(path)
    except WeightFileError as exc:
        raise TeacherError(f"{setting}: {exc} {TEACHER_HOW}") from None
    kind = model.info.projector.kind
    if kind != POSTFUSE_KIND:
        raise TeacherError(f"{setting}: {path.name} holds a '{kind}' projector, not FastComposer's "
                           f"'{POSTFUSE_KIND}': stage 0 fits the PortraitBooth projector to FastComposer's fused "
                           f"class token, so the teacher must be FastComposer's postfuse projector. {TEACHER_HOW}")
    if not is_clip_kind(model.info.face_encoder.kind):
        raise TeacherError(f"{setting}: {path.name} reads '{model.info.face_encoder.kind}' embeddings, not a CLIP "
                           f"image embedding as FastComposer's projector does. {TEACHER_HOW}")
    model.path = str(path)
    return model


def teacher_clip_vision_path(config, teacher) -> Path:
    """stage0_clip_vision, else the CLIP vision file the teacher names (import-fastcomposer
    records it) in the clip_vision/ folder beside the teacher's folder."""
    if config.stage0_clip_vision:
        return resolve_file(config.stage0_clip_vision, "stage0_clip_vision", "clip_vision", CLIP_HOW, TeacherError)
    name = teacher.info.defaults.get("clip_vision")
    if not name:
        raise TeacherError(f"stage0_teacher {Path(teacher.path).name} does not name its CLIP vision file. {CLIP_HOW}")
    # A name read from a file: one plain file name, looked up only inside clip_vision folders
    # (never a path as written: the teacher file may come from anyone).
    from portraitbooth_core.paths import PathNotAllowedError, check_file_name, inside

    what = f"the CLIP vision file named by stage0_teacher {Path(teacher.path).name}"
    try:
        name = check_file_name(str(name), what)
        beside = inside(Path(teacher.path).parent.parent / "clip_vision", name, what)
    except (PathNotAllowedError, ValueError) as exc:
        raise TeacherError(f"{exc} {CLIP_HOW}") from None
    if beside.is_file():
        return beside
    try:
        import folder_paths

        found = folder_paths.get_full_path("clip_vision", name)
    except (ImportError, KeyError):  # no ComfyUI folders registered (a bare CLI)
        found = None
    if found:
        return Path(found).resolve()
    raise TeacherError(f"stage0_clip_vision (named by stage0_teacher): {name} not found in clip_vision/. {CLIP_HOW}")


def load_clip_vision(path: Path):
    """ComfyUI's ClipVisionModel on an imported CLIP vision file: built from the config
    import-fastcomposer recorded (any tower size), else by ComfyUI's own detection."""
    import comfy.clip_vision

    _, meta = checked_header(path, "stage0_clip_vision", TeacherError, CLIP_HOW)
    config = None
    try:
        stamp = load_json_bytes(meta.get("portraitbooth_import", "{}"), "portraitbooth_import", _MAX_STAMP)
        config = stamp.get("config")
    except (ValueError, AttributeError):
        config = None
    if isinstance(config, dict):
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory() as tmp:  # ClipVisionModel reads its config from a JSON file
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            model = comfy.clip_vision.ClipVisionModel(str(Path(tmp) / "config.json"))
        missing, unexpected = model.load_sd(load_file(str(path)))
        if missing or unexpected:
            raise TeacherError(f"stage0_clip_vision: {path.name} does not match the config it records "
                               f"({len(missing)} missing, {len(unexpected)} unexpected tensors). {CLIP_HOW}")
        return model
    model = comfy.clip_vision.load(str(path))
    if model is None:
        raise TeacherError(f"stage0_clip_vision: ComfyUI does not recognise {path.name} as a CLIP vision model. "
                           f"{CLIP_HOW}")
    return model


def clip_embeddings(clip_vision, references: list[np.ndarray]) -> torch.Tensor:
    """[N, D] FastComposer subject embeddings of uint8 HWC photos (clip_image's preprocessing)."""
    from portraitbooth_core.face.clip_image import encode_clip_images, fastcomposer_pixels

    chunks = [encode_clip_images(clip_vision, fastcomposer_pixels(references[i:i + ENCODE_CHUNK]))
              for i in range(0, len(references), ENCODE_CHUNK)]
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)
