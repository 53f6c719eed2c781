"""The PortraitBooth weight file: one .safetensors with the STEA projector, an optional
UNet patch and JSON metadata (see meta.py).

Layout:
  stea.*                      projector tensors (state_dict of the kind the metadata names)
  everything else             the UNet patch, in key forms ComfyUI's own LoRA loader maps
                              through comfy.lora.model_lora_keys_unet: kohya
                              `lora_unet_<module>.lora_up/lora_down.weight` + `.alpha`, or
                              full-weight differences `diffusion_model.<module>.diff`/`.diff_b`.
                              So the file also works (UNet part only) in a stock LoraLoader.
  __metadata__["portraitbooth"]  format version, base, face encoder, projector dims,
                              class/emotion words, patch summary, training settings.
safetensors only: loading never unpickles anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic_files import atomic_target
from .family import CONTEXT_FAMILIES
from .finite import NonFiniteWeightsError, describe_names, non_finite_names
from .safetensors_header import read_header_as
from torch import nn

from ..stea.projector import build_projector
from ..stea.projector_config import PROJECTOR_BASES
from .meta import (
    FORMAT_VERSION, METADATA_KEY, PROJECTOR_PREFIX, CorruptWeightFileError, FaceEncoderSpec,
    MissingKeysError, NotPortraitBoothFileError, PortraitBoothInfo, WeightFileError,
    WrongBaseModelError, check_embedding,
)

LORA_PAIRS = ((".lora_up.weight", ".lora_down.weight"),)
PATCH_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha",
                  ".dora_scale", ".diff", ".diff_b")
# Cross-attention key/value input size = text context size: tells SD1.5 from the rest.


@dataclass
class PortraitBoothModel:
    """A loaded file: metadata, a ready projector (eval mode, CPU) and the UNet patch.

    projector: STEAProjector or FastComposerPostfuse, as info.projector.kind says."""

    info: PortraitBoothInfo
    projector: nn.Module
    unet_patch: dict[str, torch.Tensor] = field(default_factory=dict)
    path: str | None = None


def _patch_format(keys) -> str:
    lora = any(k.endswith(".lora_up.weight") for k in keys)
    diff = any(k.endswith((".diff", ".diff_b")) for k in keys)
    return {(False, False): "none", (True, False): "lora", (False, True): "diff"}.get((lora, diff), "lora+diff")


def patch_family(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """'sd15', 'sd2', 'sdxl' or None (no cross-attention tensor) from a UNet patch's shapes."""
    if any("label_emb" in k for k in shapes):
        return "sdxl"
    for name, shape in shapes.items():
        low = name.replace(".", "_")
        if "attn2_to_k" in low or "attn2_to_v" in low:
            if name.endswith((".lora_down.weight", ".diff")) and len(shape) == 2:
                return CONTEXT_FAMILIES.get(shape[1], f"unknown (text context {shape[1]})")
    return None


def save_portraitbooth(path: str | os.PathLike, projector: nn.Module, face_encoder: FaceEncoderSpec,
                       unet_patch: Mapping[str, torch.Tensor] | None = None,
                       class_words=None, emotion_words=None, training: dict | None = None,
                       class_synonyms: Mapping[str, Sequence[str]] | None = None,
                       defaults: dict | None = None, source: dict | None = None) -> Path:
    """Write a PortraitBooth file atomically (atomic_files.atomic_target): a crash never
    leaves a half-written file under the real name for ComfyUI to list, and the file gets
    the umask's mode. Non-finite weights are refused (NonFiniteWeightsError), nothing written.

    class_synonyms: class word -> other words its captions used for it; the model then
    accepts those words in prompts as well."""
    path = Path(path)
    patch = dict(unet_patch or {})
    bad = [k for k in patch if k.startswith(PROJECTOR_PREFIX) or not k.endswith(PATCH_SUFFIXES)]
    if bad:
        raise ValueError(f"UNet patch keys must be ComfyUI LoRA/diff keys ({', '.join(PATCH_SUFFIXES)}); "
                         f"got {bad[:5]}")
    if face_encoder.dim != projector.config.face_dim:
        raise ValueError(f"face encoder gives {face_encoder.dim}-d embeddings, projector takes "
                         f"{projector.config.face_dim}-d")
    info = PortraitBoothInfo(projector=projector.config, face_encoder=face_encoder,
                             base=PROJECTOR_BASES.get(projector.config.kind, "sd15"),
                             training=dict(training or {}),
                             unet_patch={"format": _patch_format(patch), "tensors": len(patch)},
                             defaults=dict(defaults or {}), source=dict(source or {}))
    if class_words is not None:
        info = replace(info, class_words=tuple(class_words))
    if emotion_words is not None:
        info = replace(info, emotion_words=tuple(emotion_words))
    if class_synonyms:
        info = replace(info, class_synonyms={str(k): tuple(map(str, v)) for k, v in class_synonyms.items()})
    tensors = {PROJECTOR_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in projector.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in patch.items()})
    bad = non_finite_names(tensors)
    if bad:  # such a file would load and give black images; refuse before anything is written
        raise NonFiniteWeightsError(
            f"{path.name}: not written: {len(bad)} tensor(s) hold non-finite values (NaN or infinity): "
            f"{describe_names(bad)}. The weights diverged; write them from a healthy run or checkpoint.")
    with atomic_target(path) as tmp:  # the umask's mode, not save_file's 0600
        save_file(tensors, str(tmp), metadata={METADATA_KEY: info.to_json()})
    return path


def _describe_foreign(shapes: Mapping[str, tuple]) -> str:
    if any(k.endswith((".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight"))
           for k in shapes):
        return "it looks like a plain LoRA (load it with a LoRA loader node, from models/loras)"
    if any(k.startswith("model.diffusion_model.") for k in shapes):
        return "it looks like a full checkpoint (load it with Load Checkpoint, from models/checkpoints)"
    if any(k.startswith(PROJECTOR_PREFIX) for k in shapes):
        return "it has projector tensors but no PortraitBooth metadata (re-export it with the training CLI)"
    return "it has no PortraitBooth metadata and no STEA projector tensors"


def read_info(path: str | os.PathLike) -> tuple[PortraitBoothInfo, dict[str, tuple[int, ...]]]:
    """Validate a file from its header alone: (metadata, tensor shapes)."""
    source = os.path.basename(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"PortraitBooth file not found: {path}")
    file_header = read_header_as(path, CorruptWeightFileError,
                                 "The download or copy was cut off; fetch the file again.", "Download it again.")
    shapes, metadata = file_header.shapes, file_header.metadata
    if METADATA_KEY not in metadata:
        raise NotPortraitBoothFileError(f"{source} is not a PortraitBooth file: {_describe_foreign(shapes)}.")
    info = PortraitBoothInfo.from_json(metadata[METADATA_KEY], source)
    family = patch_family({k: v for k, v in shapes.items() if not k.startswith(PROJECTOR_PREFIX)})
    if family not in (None, info.base) and info.base != "sd15":
        raise WrongBaseModelError(f"{source} patches a {family} UNet (from its tensor shapes), but its "
                                  f"'{info.projector.kind}' projector is made for {info.base}. The file is damaged "
                                  f"or was edited; import it again.")
    if family not in (None, info.base):
        raise WrongBaseModelError(f"{source} patches a {family} UNet (from its tensor shapes), but PortraitBooth "
                                  f"works with Stable Diffusion 1.5 only. Use a PortraitBooth file trained on SD1.5.")
    _check_keys(info, shapes, source)
    return info, shapes


def _check_keys(info: PortraitBoothInfo, shapes: Mapping[str, tuple], source: str) -> None:
    with torch.device("meta"):  # shapes only
        reference = build_projector(info.projector)
    want = {PROJECTOR_PREFIX + k: tuple(v.shape) for k, v in reference.state_dict().items()}
    missing = sorted(k for k in want if k not in shapes)
    patch = [k for k in shapes if not k.startswith(PROJECTOR_PREFIX)]
    for up, down in LORA_PAIRS:
        for k in patch:
            for have, need in ((up, down), (down, up)):
                if k.endswith(have) and k[:-len(have)] + need not in shapes:
                    missing.append(k[:-len(have)] + need)
    if missing:
        raise MissingKeysError(f"{source} is incomplete; missing tensors: {', '.join(sorted(missing))}. "
                               f"Re-export or download the file again.")
    declared = int(info.unet_patch.get("tensors", len(patch)))
    if declared != len(patch):
        raise MissingKeysError(f"{source} declares {declared} UNet patch tensors but holds {len(patch)}; "
                               f"the file is incomplete. Re-export or download it again.")
    extra = sorted(k for k in shapes if k.startswith(PROJECTOR_PREFIX) and k not in want)
    if extra:
        raise CorruptWeightFileError(f"{source}: projector tensors its metadata does not describe: {', '.join(extra)}.")
    wrong = [f"{k} {shapes[k]} (expected {s})" for k, s in want.items() if tuple(shapes[k]) != s]
    if wrong:
        raise CorruptWeightFileError(f"{source}: projector tensors do not match its metadata: {'; '.join(wrong)}.")


def load_portraitbooth(path: str | os.PathLike, expected_embedding_kind: str | None = None,
                       expected_embedding_dim: int | None = None) -> PortraitBoothModel:
    """Load and validate a PortraitBooth file; each problem raises its own WeightFileError
    subclass with a message that says what to do."""
    info, _ = read_info(path)
    check_embedding(info, expected_embedding_kind, expected_embedding_dim)
    source = os.path.basename(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as exc:
        # The error's type only: a parser's message can quote bytes or offsets of the file.
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CorruptWeightFileError(f"{source} could not be read ({why}). Download it again.") from None
    bad = non_finite_names(tensors)
    if bad:
        raise CorruptWeightFileError(
            f"{source} holds non-finite values (NaN or infinity) in {len(bad)} tensor(s): {describe_names(bad)}. "
            f"It would give black or noise images. It was probably exported from a training run that diverged "
            f"(a setting such as lr or ema_decay out of range): train or export it again, or download it again.")
    projector = build_projector(info.projector)
    projector.load_state_dict({k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items()
                               if k.startswith(PROJECTOR_PREFIX)})
    projector.eval().requires_grad_(False)
    patch = {k: v for k, v in tensors.items() if not k.startswith(PROJECTOR_PREFIX)}
    return PortraitBoothModel(info, projector, patch, str(path))


__all__ = ["FORMAT_VERSION", "PortraitBoothModel", "load_portraitbooth", "read_info", "save_portraitbooth",
           "patch_family"]
