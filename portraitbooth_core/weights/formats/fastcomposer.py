"""Import FastComposer's released SD1.5 weights into files ComfyUI and this pack load.

    python -m training import-fastcomposer pytorch_model.bin --models ComfyUI/models

Everything about the format is here: the key map, the validation of every key and shape,
the conversion and the files written. The command line only calls `import_fastcomposer`.
ComfyUI's own key maps and layer shapes are the reference for the converted files, so
the conversion imports ComfyUI when it runs (never when this module is imported).

FastComposer (Xiao et al. 2023; code and weights `mit-han-lab/fastcomposer`, MIT) ships
one `pytorch_model.bin`: a plain state dict of its whole model,
  unet.*             diffusers UNet2DConditionModel, fully fine-tuned from SD1.5
  text_encoder.*     SD1.5's CLIP-L text model without the `text_model.` segment (frozen)
  image_encoder.*    `vision_model.*` + `visual_projection.weight`: OpenAI CLIP ViT-L/14
  vae.*              SD1.5's VAE (frozen)
  postfuse_module.*  the MLP that fuses the image embedding into the class word's token.
The text encoder and VAE are plain SD1.5, so the user's own SD1.5 checkpoint provides
them; they are checked, not written. Written, each atomically (temp file + os.replace):
  diffusion_models/<name>_unet.safetensors      ComfyUI (ldm) key layout, via ComfyUI's own
                                                comfy.utils.unet_to_diffusers map; Load
                                                Diffusion Model detects it as SD1.5
  clip_vision/<name>_clip_vit_l14.safetensors   transformers layout, read by Load CLIP Vision
  portraitbooth/<name>_postfuse.safetensors     a PortraitBooth file holding the postfuse
                                                projector (kind "fastcomposer_postfuse")
Reading never runs pickled code: torch.load(weights_only=True) or safetensors.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ...atomic_files import atomic_target
from ...face.clip_image import CLIP_VISION_DESCRIPTION, clip_vision_kind
from ...stea.postfuse import FastComposerPostfuse, postfuse_config
from ..file import save_portraitbooth
from ..meta import FaceEncoderSpec
from .release import ReleaseWords, read_release

log = logging.getLogger("portraitbooth.fastcomposer")

SECTIONS = ("unet.", "text_encoder.", "image_encoder.", "vae.", "postfuse_module.")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_START = 0.3      # delayed conditioning: identity from 30% of the steps on (FastComposer: 20-30%)
DEFAULT_CFG = 5.0        # FastComposer's inference guidance scale
SOURCE = {"model": "FastComposer", "repository": "https://github.com/mit-han-lab/fastcomposer",
          "weights": "https://huggingface.co/mit-han-lab/fastcomposer (pytorch_model.bin)", "license": "MIT"}
# OpenAI CLIP ViT-L/14 at 224 px; ComfyUI's CLIP vision loader recognises it by its 24 layers.
VIT_L14 = {"hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "projection_dim": 768}
# Weights do not tell the head count; SD1.5's UNet uses 8 heads everywhere and OpenAI's CLIP
# towers 64-wide heads.
SD15_UNET_HEADS = 8
CLIP_HEAD_WIDTH = 64


class FastComposerImportError(ValueError):
    """Base of every import problem; the message names the file and says what to do."""


class NotFastComposerError(FastComposerImportError):
    pass


class MissingTensorsError(FastComposerImportError):
    pass


class WrongShapeError(FastComposerImportError):
    pass


class TruncatedFileError(FastComposerImportError):
    pass


class UnsafeFileError(FastComposerImportError):
    pass


class OutputExistsError(FastComposerImportError):
    pass


# ---------------------------------------------------------------- reading


RELEASE_WORDS = ReleaseWords(TruncatedFileError, UnsafeFileError, "FastComposer's real pytorch_model.bin",
                             SOURCE["weights"], "The released pytorch_model.bin holds FastComposer's whole model (UNet, "
                             "text encoder, CLIP image encoder, VAE): about 1.37 billion parameters, 2.75 GB in "
                             "fp16, twice that in fp32")


def _wrong_shapes(source: str, what: str, wrong: list[tuple[str, tuple, object]]) -> WrongShapeError:
    """The refusal of tensors whose shapes are not the release's: the file, each tensor (up
    to five) with the shape found and the one expected, and what to do."""
    shown = "; ".join(f"{key} has shape {tuple(found)}, expected {expected}" for key, found, expected in wrong[:5])
    more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
    return WrongShapeError(f"{source}: {what}: {shown}{more}. {REDOWNLOAD}")


# What to do about a file that is FastComposer-like but not the release: its shapes come from
# the model, so only another copy of the released file helps.
REDOWNLOAD = (f"The file is not FastComposer's released SD1.5 model, or it was changed; download pytorch_model.bin "
              f"again from {SOURCE['weights']} and import that.")


def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    # Training scripts sometimes nest the weights; the release is flat, but accept both.
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and set(obj) == {key} and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise NotFastComposerError(f"{source} is not a state dict (it holds a {type(obj).__name__}); "
                                   f"FastComposer's release is a dict of tensors (pytorch_model.bin).")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise NotFastComposerError(f"{source} holds no tensors; it is not a weight file.")
    return tensors


def load_release(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The released state dict, read without running code (memory-mapped where possible)."""
    path = Path(path)
    if path.is_dir() and (path / "pytorch_model.bin").is_file():  # the downloaded model folder
        path = path / "pytorch_model.bin"
    source = str(path)
    if not path.is_file():
        raise FastComposerImportError(f"{source} not found. Download pytorch_model.bin from "
                                      f"{SOURCE['weights']} and pass its path.")
    return _unwrap(read_release(path, RELEASE_WORDS), source)


def describe_foreign(keys: Iterable[str]) -> str:
    """What a state dict that is not FastComposer's looks like, for the error message."""
    keys = list(keys)
    has = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    if has("model.diffusion_model."):
        return "a Stable Diffusion checkpoint (load it with Load Checkpoint from models/checkpoints)"
    if has("stea."):
        return "a PortraitBooth weight file (load it with Load PortraitBooth Model from models/portraitbooth)"
    if any(k.endswith((".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "a LoRA (load it with a LoRA loader node from models/loras)"
    if has("conv_in.", "down_blocks.", "input_blocks."):
        return ("a bare UNet (diffusion_pytorch_model), not FastComposer's whole-model pytorch_model.bin; "
                "FastComposer's file has unet.*, image_encoder.* and postfuse_module.* together")
    if has("vision_model.", "visual."):
        return "a CLIP vision model (models/clip_vision)"
    if has("text_model.", "transformer.text_model."):
        return "a CLIP text encoder"
    if has("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks."):
        return "a VAE"
    if has("unet.") and not has("postfuse_module."):
        return "a diffusers-style whole model with a UNet but no FastComposer postfuse module"
    return f"an unknown state dict (first keys: {', '.join(sorted(keys)[:4])})"


# ---------------------------------------------------------------- UNet


def _count(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def unet_config_from_diffusers(unet: Mapping[str, torch.Tensor]) -> dict:
    """ComfyUI UNetModel arguments for a diffusers SD1.x-style UNet state dict (no prefix)."""
    keys = list(unet)
    model_channels = int(unet["conv_in.weight"].shape[0])
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    num_res, channel_mult, depth = [], [], []
    for i in range(levels):
        res = _count(keys, rf"down_blocks\.{i}\.resnets\.(\d+)\.")
        num_res.append(res)
        channel_mult.append(int(unet[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) // model_channels)
        for j in range(res):
            depth.append(_count(keys, rf"down_blocks\.{i}\.attentions\.{j}\.transformer_blocks\.(\d+)\."))
    out_depth = []
    for x in range(levels):  # up_blocks.0 is the lowest resolution; ComfyUI pops from the end
        for i in range(num_res[levels - 1 - x] + 1):
            out_depth.append(_count(keys, rf"up_blocks\.{x}\.attentions\.{i}\.transformer_blocks\.(\d+)\."))
    proj_in = next((unet[k] for k in keys if k.endswith("attentions.0.proj_in.weight")), None)
    to_k = next((unet[k] for k in keys if k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise NotFastComposerError("the UNet has no cross-attention (attn2.to_k) weights; it is not a text-to-image UNet")
    return dict(
        image_size=32, in_channels=int(unet["conv_in.weight"].shape[1]),
        out_channels=int(unet["conv_out.weight"].shape[0]), model_channels=model_channels,
        num_res_blocks=num_res, channel_mult=channel_mult, transformer_depth=depth,
        transformer_depth_output=list(reversed(out_depth)),
        transformer_depth_middle=_count(keys, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."),
        num_heads=SD15_UNET_HEADS, num_head_channels=-1, use_spatial_transformer=True,
        use_linear_in_transformer=bool(proj_in is not None and proj_in.ndim == 2),
        context_dim=int(to_k.shape[1]), legacy=False, adm_in_channels=None,
    )


def comfy_unet_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ComfyUI's own UNetModel for `config`, built on the meta device."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model = UNetModel(**config, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def unet_key_map(unet_shapes: Mapping[str, tuple[int, ...]],
                 source: str = "the file") -> tuple[dict, dict[str, str], dict]:
    """(config, diffusers key -> ComfyUI key, ComfyUI shapes) for a diffusers UNet; raises
    when a source key is left over, a ComfyUI key has no source, or a shape differs
    (`source` names the file in the message)."""
    import comfy.utils

    probe = {k: torch.empty(s, device="meta") for k, s in unet_shapes.items()}
    config = unet_config_from_diffusers(probe)
    target = comfy_unet_shapes(config)
    full = comfy.utils.unet_to_diffusers(config)
    mapping = {d: c for d, c in full.items() if d in unet_shapes}
    leftover = sorted(k for k in unet_shapes if k not in mapping)
    mapped_targets = set(mapping.values())
    missing = sorted(next((d for d, c in full.items() if c == t), t) for t in target if t not in mapped_targets)
    if leftover or missing:
        raise MissingTensorsError(f"{source}: {_listing('the UNet (unet.*)', missing, leftover)}")
    wrong = [(f"unet.{d}", unet_shapes[d], f"{target[c]} (SD1.5's layout)")
             for d, c in mapping.items() if tuple(unet_shapes[d]) != target[c]]
    if wrong:
        raise _wrong_shapes(source, "UNet tensors with the wrong shape", wrong)
    return config, mapping, target


def _listing(what: str, missing: list[str], leftover: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
    if leftover:
        parts.append(f"{len(leftover)} unexpected (e.g. {', '.join(leftover[:4])})")
    return (f"{what} does not have SD1.5's layout: {'; '.join(parts)}. The file is incomplete or another model; "
            f"download pytorch_model.bin again from {SOURCE['weights']}.")


# ---------------------------------------------------------------- CLIP vision


def _patch_grid(positions: int) -> int | None:
    """The side of a ViT's patch grid from its position table's rows (one class token + a
    square grid), or None when the rows are no such number."""
    grid = math.isqrt(max(positions - 1, 0))
    return grid if positions > 1 and grid * grid == positions - 1 else None


def clip_vision_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """A ComfyUI/transformers CLIP vision config from `vision_model.*` tensor shapes."""
    patch = shapes["vision_model.embeddings.patch_embedding.weight"]
    positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
    grid = _patch_grid(positions)
    if grid is None:  # PhotoMaker's importer words this for its own file
        raise WrongShapeError(f"image_encoder position embedding has {positions} rows; a ViT needs 1 + a square")
    hidden = int(patch[0])
    return {
        "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": hidden,
        "image_size": int(patch[2]) * grid, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": int(shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0]),
        "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
        "num_attention_heads": max(1, hidden // CLIP_HEAD_WIDTH), "num_channels": int(patch[1]),
        "num_hidden_layers": _count(shapes, r"vision_model\.encoder\.layers\.(\d+)\."),
        "patch_size": int(patch[2]), "projection_dim": int(shapes["visual_projection.weight"][0]),
        "torch_dtype": "float32",
    }


def comfy_clip_vision_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    import comfy.clip_model
    import comfy.ops

    model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.manual_cast)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def is_vit_l14(config: dict) -> bool:
    return all(config[k] == v for k, v in VIT_L14.items())


def clip_vision_key_check(shapes: Mapping[str, tuple[int, ...]], source: str = "the file") -> tuple[dict, list[str]]:
    """(config, keys to write) for `vision_model.*` + `visual_projection.weight` shapes
    (`source` names the file in the messages)."""
    for need in ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
                 "vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight"):
        if need not in shapes:
            raise MissingTensorsError(f"{source}: the image encoder lacks image_encoder.{need}; the file is "
                                      f"incomplete or not FastComposer's. Download it again.")
    table = shapes["vision_model.embeddings.position_embedding.weight"]
    if _patch_grid(table[0]) is None:
        raise _wrong_shapes(source, "the image encoder's position table is not a ViT's", [(
            "image_encoder.vision_model.embeddings.position_embedding.weight", table,
            f"(1 + a square number of patches, {table[-1]}), e.g. (257, 1024) for CLIP ViT-L/14 at 224 px")])
    config = clip_vision_config(shapes)
    target = comfy_clip_vision_shapes(config)
    # position_ids is a buffer older transformers saved; it is derived, not learned.
    keys = [k for k in shapes if not k.endswith("position_ids")]
    leftover = sorted(k for k in keys if k not in target)
    missing = sorted(k for k in target if k not in shapes)
    if leftover or missing:
        raise MissingTensorsError(f"{source}: " + _listing("the image encoder (image_encoder.*)", missing, leftover)
                                  .replace("SD1.5's layout", "a CLIP vision layout"))
    wrong = [(f"image_encoder.{k}", shapes[k], target[k]) for k in keys if tuple(shapes[k]) != target[k]]
    if wrong:
        raise _wrong_shapes(source, "image encoder tensors with the wrong shape", wrong)
    return config, sorted(keys)


def _not_sd15(unet: Mapping[str, tuple[int, ...]], config: dict) -> list[tuple[str, tuple, tuple]]:
    """The tensors that tell a UNet of another base (SD2: 1024-d text context and linear
    projections) from SD1.5's: (key, found, SD1.5's shape) for each that differs."""
    wrong = []
    conv_in = unet["conv_in.weight"]
    if conv_in[0] != 320:
        wrong.append(("unet.conv_in.weight", conv_in, (320, *conv_in[1:])))
    to_k = next(k for k in unet if k.endswith("attn2.to_k.weight"))
    if unet[to_k][1] != 768:
        wrong.append((f"unet.{to_k}", unet[to_k], (unet[to_k][0], 768)))
    proj_in = next((k for k in unet if k.endswith("attentions.0.proj_in.weight")), None)
    if config["use_linear_in_transformer"] and proj_in is not None:  # SD1.5's are 1x1 convolutions
        wrong.append((f"unet.{proj_in}", unet[proj_in], (*unet[proj_in], 1, 1)))
    return wrong


# ---------------------------------------------------------------- validation


@dataclass
class Plan:
    """What a validated release holds and how it maps to the output files."""

    unet_config: dict
    unet_map: dict[str, str]
    clip_config: dict
    clip_keys: list[str]
    postfuse_config: object
    text_dim: int
    text_layers: int
    warnings: list[str] = field(default_factory=list)


def _sections(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}


def validate_release(sd: Mapping[str, torch.Tensor], source: str = "the file") -> Plan:
    """Check a state dict is FastComposer's release, complete, with consistent shapes."""

    present = [p for p in SECTIONS if any(k.startswith(p) for k in sd)]
    if "postfuse_module." not in present or "unet." not in present:
        raise NotFastComposerError(f"{source} is not a FastComposer checkpoint: it looks like {describe_foreign(sd)}. "
                                   f"Use FastComposer's pytorch_model.bin ({SOURCE['weights']}).")
    absent = [p + "*" for p in SECTIONS if p not in present]
    if absent:
        raise MissingTensorsError(f"{source} lacks whole parts of FastComposer's model: {', '.join(absent)}. "
                                  f"The file is incomplete; download it again.")
    other = sorted(k for k in sd if not k.startswith(SECTIONS))
    warnings = [f"ignored {len(other)} tensors outside FastComposer's parts (e.g. {', '.join(other[:3])})"] if other else []

    # postfuse: its own shapes tell its dims; they must agree with the reference module
    pf = _sections(sd, "postfuse_module.")
    for need in ("layer_norm.weight", "mlp1.layernorm.weight", "mlp1.fc1.weight"):
        if need not in pf:
            raise MissingTensorsError(f"{source} lacks postfuse_module.{need}; the file is incomplete. Download it again.")
    text_dim = pf["layer_norm.weight"][0]
    config = postfuse_config(text_dim=text_dim, face_dim=pf["mlp1.layernorm.weight"][0] - text_dim,
                             hidden_dim=pf["mlp1.fc1.weight"][0])
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in FastComposerPostfuse(config).state_dict().items()}
    missing = sorted(f"postfuse_module.{k}" for k in want if k not in pf)
    extra = sorted(f"postfuse_module.{k}" for k in pf if k not in want)
    if missing or extra:
        raise MissingTensorsError(f"{source}: the postfuse module does not have FastComposer's layout: "
                                  f"missing {missing[:4] or 'none'}, unexpected {extra[:4] or 'none'}.")
    wrong = [(f"postfuse_module.{k}", pf[k], s) for k, s in want.items() if pf[k] != s]
    if wrong:
        raise _wrong_shapes(source, "postfuse tensors with the wrong shape", wrong)

    unet = _sections(sd, "unet.")
    unet_config, unet_map, _ = unet_key_map(unet, source)
    not_sd15 = _not_sd15(unet, unet_config)
    if not_sd15:
        raise _wrong_shapes(source, "the UNet is not SD1.5's (FastComposer's release is SD1.5)", not_sd15)
    clip_shapes = _sections(sd, "image_encoder.")
    clip_config, clip_keys = clip_vision_key_check(clip_shapes, source)
    if not is_vit_l14(clip_config):
        warnings.append(f"the image encoder is not CLIP ViT-L/14 at 224 px ({clip_config['num_hidden_layers']} layers, "
                        f"width {clip_config['hidden_size']}); ComfyUI's Load CLIP Vision recognises ViT-L/14 only")

    te = _sections(sd, "text_encoder.")
    for need in ("embeddings.token_embedding.weight", "final_layer_norm.weight"):
        if need not in te:
            raise MissingTensorsError(f"{source} lacks text_encoder.{need}; the file is incomplete. Download it again.")
    vae = _sections(sd, "vae.")
    if not any(k.startswith("encoder.") for k in vae) or not any(k.startswith("decoder.") for k in vae):
        raise MissingTensorsError(f"{source}: vae.* has no encoder or no decoder; the file is incomplete. Download it again.")

    # The UNet reads SD1.5's 768-d text (checked above): the text encoder and the postfuse module must too.
    text = [("text_encoder.final_layer_norm.weight", te["final_layer_norm.weight"]),
            ("postfuse_module.layer_norm.weight", pf["layer_norm.weight"])]
    wrong = [(key, shape, (unet_config["context_dim"],)) for key, shape in text
             if shape[0] != unet_config["context_dim"]]
    if wrong:
        raise _wrong_shapes(source, f"text widths disagree with the UNet's {unet_config['context_dim']}-d text "
                                    f"context", wrong)
    if config.face_dim != clip_config["projection_dim"]:
        projection = clip_shapes["visual_projection.weight"]
        raise _wrong_shapes(source, f"the postfuse module reads {config.face_dim}-d image embeddings (postfuse_module."
                                    f"mlp1.layernorm.weight {pf['mlp1.layernorm.weight']} = {text_dim} text + "
                                    f"{config.face_dim} image) but the image encoder projects to {projection[0]}",
                            [("image_encoder.visual_projection.weight", projection,
                              (config.face_dim, *projection[1:]))])
    return Plan(unet_config, unet_map, clip_config, clip_keys, config, text_dim,
                _count(te, r"encoder\.layers\.(\d+)\."), warnings)


# ---------------------------------------------------------------- writing


@dataclass
class ImportReport:
    unet: Path
    clip_vision: Path
    portraitbooth: Path
    warnings: list[str]
    clip_is_vit_l14: bool


def output_paths(models_dir: str | os.PathLike, name: str = "fastcomposer") -> dict[str, Path]:
    root = Path(models_dir)
    return {"unet": root / "diffusion_models" / f"{name}_unet.safetensors",
            "clip_vision": root / "clip_vision" / f"{name}_clip_vit_l14.safetensors",
            "portraitbooth": root / "portraitbooth" / f"{name}_postfuse.safetensors"}


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_target(path) as tmp:  # the umask's mode, not save_file's 0600
        save_file(tensors, str(tmp), metadata=metadata)


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False)


def convert_unet(sd: Mapping[str, torch.Tensor], mapping: Mapping[str, str], dtype: torch.dtype,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """unet.<diffusers key> -> <ComfyUI key>, cast to dtype."""
    return {c: sd["unet." + d].to(dtype).contiguous() for d, c in _progress(list(mapping.items()), "UNet", progress)}


def convert_clip_vision(sd: Mapping[str, torch.Tensor], keys: Iterable[str], dtype: torch.dtype,
                        progress: bool = False) -> dict[str, torch.Tensor]:
    return {k: sd["image_encoder." + k].to(dtype).contiguous() for k in _progress(list(keys), "CLIP vision", progress)}


def postfuse_from_release(sd: Mapping[str, torch.Tensor], config) -> torch.nn.Module:

    module = FastComposerPostfuse(config)
    module.load_state_dict({k[len("postfuse_module."):]: v.float() for k, v in sd.items()
                            if k.startswith("postfuse_module.")})
    return module.eval().requires_grad_(False)


def face_encoder_spec(clip_config: dict) -> FaceEncoderSpec:
    """The weight file's face-encoder entry for a CLIP vision config: the kind follows the
    embedding width (what an Identity can tell), the description the tower."""

    dim = int(clip_config["projection_dim"])
    description = (CLIP_VISION_DESCRIPTION if is_vit_l14(clip_config) else
                   f"CLIP image embedding ({clip_config['num_hidden_layers']} layers, width "
                   f"{clip_config['hidden_size']}, {dim}-d projection)")
    return FaceEncoderSpec(clip_vision_kind(dim), dim, feature="image_embeds", description=description)


def import_fastcomposer(path: str | os.PathLike, models_dir: str | os.PathLike, overwrite: bool = False,
                        dtype: str = "fp16", name: str = "fastcomposer",
                        progress: bool = True) -> ImportReport:
    """Validate FastComposer's release and write the three files (see the module docstring)."""

    if dtype not in DTYPES:
        raise FastComposerImportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not re.fullmatch(r"[\w.-]+", name):
        raise FastComposerImportError(f"--name {name!r}: use letters, digits, '_', '-' or '.' only")
    outputs = output_paths(models_dir, name)
    exists = [str(p) for p in outputs.values() if p.exists()]
    if exists and not overwrite:
        raise OutputExistsError(f"already imported: {', '.join(exists)} exist. Pass --overwrite to replace them, "
                                f"or --name to write a second copy.")
    source = Path(path)
    if source.is_dir() and (source / "pytorch_model.bin").is_file():
        source = source / "pytorch_model.bin"
    log.info("[import] reading %s", source)
    sd = load_release(source)
    plan = validate_release(sd, str(source))
    target = DTYPES[dtype]
    stamp = {"source_file": source.name, "source_bytes": source.stat().st_size, **SOURCE}

    # Everything goes to hidden temp files first and is renamed into place only when all
    # three are written: an error or Ctrl-C never leaves a partial import behind.
    temps = {k: p.with_name(f".{p.name}.{os.getpid()}.part") for k, p in outputs.items()}
    try:
        unet = convert_unet(sd, plan.unet_map, target, progress)
        _save_atomic(unet, temps["unet"], {"portraitbooth_import": json.dumps(
            {"part": "unet", "base": "sd15", "layout": "comfyui", "dtype": dtype, **stamp})})
        del unet

        clip = convert_clip_vision(sd, plan.clip_keys, target, progress)
        _save_atomic(clip, temps["clip_vision"], {"portraitbooth_import": json.dumps(
            {"part": "clip_vision", "config": plan.clip_config, "dtype": dtype, **stamp})})
        del clip

        projector = postfuse_from_release(sd, plan.postfuse_config)
        # FastComposer's prompts name the subject with an ordinary noun ("a man <|image|>"), so the
        # pack's default class words apply.
        save_portraitbooth(temps["portraitbooth"], projector, face_encoder_spec(plan.clip_config),
                           defaults={"start_percent": DEFAULT_START, "cfg": DEFAULT_CFG,
                                     "clip_vision": outputs["clip_vision"].name, "unet": outputs["unet"].name,
                                     "preprocess": "fastcomposer"},
                           source={**stamp, "imported_parts": ["postfuse_module"]})
        for key, path in outputs.items():
            os.replace(temps[key], path)
            log.info("[import] wrote %s", path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return ImportReport(outputs["unet"], outputs["clip_vision"], outputs["portraitbooth"], plan.warnings,
                        is_vit_l14(plan.clip_config))


def format_report(report: ImportReport) -> str:
    lines = ["FastComposer imported:",
             f"  UNet (SD1.5, ComfyUI layout)  {report.unet}",
             f"  {'CLIP vision (ViT-L/14)' if report.clip_is_vit_l14 else 'CLIP vision (not ViT-L/14)':<30}"
             f"{report.clip_vision}",
             f"  PortraitBooth projector       {report.portraitbooth}",
             "Use in ComfyUI:",
             "  Load Checkpoint               any SD1.5 checkpoint: its CLIP and VAE (FastComposer keeps both frozen)",
             f"  Load Diffusion Model          {report.unet.name} (weight_dtype default) -> MODEL for the sampler",
             f"  Load CLIP Vision              {report.clip_vision.name}",
             f"  Load PortraitBooth Model      {report.portraitbooth.name} (projector kind fastcomposer_postfuse)",
             "  Apply STEA Conditioning       identity from the CLIP vision image embedding of the subject photo,",
             f"                                class word e.g. 'man'/'woman'; leave start_percent at -1 (from the "
             f"file: {DEFAULT_START}, delayed identity); sampler CFG {DEFAULT_CFG:g}",
             "  Text encoder: CLIP last layer (no clip skip): the projector reads CLIP's final-LayerNorm output."]
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)


__all__ = ["FastComposerImportError", "ImportReport", "MissingTensorsError", "NotFastComposerError",
           "OutputExistsError", "Plan", "TruncatedFileError", "UnsafeFileError", "WrongShapeError",
           "clip_vision_config", "clip_vision_key_check", "comfy_clip_vision_shapes", "comfy_unet_shapes",
           "convert_clip_vision", "convert_unet", "describe_foreign", "format_report", "import_fastcomposer",
           "load_release", "output_paths", "postfuse_from_release", "unet_config_from_diffusers", "unet_key_map",
           "validate_release"]
