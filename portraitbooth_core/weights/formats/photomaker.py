"""Import PhotoMaker's released SDXL weights (v1 and v2) into files ComfyUI and this pack load.

    python -m training import-photomaker photomaker-v2.bin --models ComfyUI/models

Everything about the format is here: reading, version detection, the validation of every
key and shape, the LoRA key map, the conversion and the files written. The command line
only calls `import_photomaker`. ComfyUI's own key maps and layer shapes are the reference
for the converted files, so the conversion imports ComfyUI when it runs (never when this
module is imported).

PhotoMaker (Li et al. 2023; code TencentARC/PhotoMaker, Apache-2.0) ships
`photomaker-v1.bin` / `photomaker-v2.bin`, each a torch.save dict with two entries:
  id_encoder     a CLIP ViT-L/14 vision tower (`vision_model.*`, `visual_projection.weight`)
                 plus `visual_projection_2.weight` and `fuse_module.*` (v1), or plus
                 `qformer_perceiver.*` and `fuse_module.*` (v2; its `visual_projection_2` is
                 in the file but unused)
  lora_weights   a rank-64 LoRA on the SDXL UNet's attention layers, in diffusers' attention-
                 processor form (`unet.<module>.processor.to_q_lora.down.weight`); the PEFT
                 form (`<module>.to_q.lora_A.weight`) is accepted too.
A safetensors variant holds the same with flat `id_encoder.` / `lora_weights.` prefixes.
Written, each atomically and only once everything is valid:
  clip_vision/<name>_clip_vit_l14.safetensors   the tower, transformers layout (Load CLIP Vision)
  portraitbooth/<name>.safetensors              the head (projector kind photomaker_v1/_v2), the
                                                LoRA in kohya keys ComfyUI maps
                                                (`lora_unet_<ComfyUI module>.lora_up/down.weight`,
                                                `.alpha` = rank: scale 1, as diffusers applies it)
                                                and metadata (base sdxl, defaults, source)
Reading never runs pickled code: torch.load(weights_only=True) or safetensors.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ...atomic_files import atomic_target
from ...face.photomaker_photos import PHOTOMAKER_V1_KIND, PHOTOMAKER_V2_KIND
from ...stea.photomaker import (RESAMPLER_HEAD_WIDTH, build_photomaker_head,
                                photomaker_v1_config, photomaker_v2_config)
from ..file import save_portraitbooth
from ..meta import FaceEncoderSpec
from .release import ReleaseWords, read_release

log = logging.getLogger("portraitbooth.photomaker")

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
VERSIONS = ("v1", "v2")
DEFAULT_START = 0.2    # upstream's start_merge_step 10 of 50 steps: identity from 20% of the steps on
DEFAULT_CFG = 5.0      # upstream's demos and inference scripts
SDXL_TEXT_DIM = 2048   # CLIP-L 768 || bigG 1280
TRIGGER_WORD = "img"
WEIGHTS = {"v1": "https://huggingface.co/TencentARC/PhotoMaker (photomaker-v1.bin)",
           "v2": "https://huggingface.co/TencentARC/PhotoMaker-V2 (photomaker-v2.bin)"}
SOURCE = {"repository": "https://github.com/TencentARC/PhotoMaker", "license": "Apache-2.0"}
V2_FACE_NOTE = ("v2's face embeddings come from insightface's buffalo_l, whose pretrained models are for "
                "non-commercial research only")
# ComfyUI's SDXL UNet (supported_models.SDXL as model_detection fills it in).
SDXL_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
    num_heads=-1, num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
    context_dim=2048, legacy=False, adm_in_channels=2816, num_classes="sequential", use_temporal_attention=False,
)
V1_KIND, V2_KIND = PHOTOMAKER_V1_KIND, PHOTOMAKER_V2_KIND  # what CLIP Vision Identity's PhotoMaker modes make
VIT_L14 = {"hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "projection_dim": 768}


class PhotoMakerImportError(ValueError):
    """Base of every import problem; the message names the file and says what to do."""


class NotPhotoMakerError(PhotoMakerImportError):
    pass


class WrongVersionError(PhotoMakerImportError):
    pass


class MissingTensorsError(PhotoMakerImportError):
    pass


class WrongShapeError(PhotoMakerImportError):
    pass


class UnmatchedLoraKeysError(PhotoMakerImportError):
    pass


class TruncatedFileError(PhotoMakerImportError):
    pass


class UnsafeFileError(PhotoMakerImportError):
    pass


class OutputExistsError(PhotoMakerImportError):
    pass


RELEASE_WORDS = ReleaseWords(TruncatedFileError, UnsafeFileError, "PhotoMaker's real photomaker-v1.bin/-v2.bin",
                             f"{WEIGHTS['v1']} or {WEIGHTS['v2']}",
                             "photomaker-v1.bin is about 0.9 GB, photomaker-v2.bin about 1.8 GB")


# ---------------------------------------------------------------- reading


@dataclass
class Release:
    id_encoder: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor]
    layout: str  # "nested" (the .bin), "flat"


def _describe(keys: Iterable[str]) -> str:
    keys = list(keys)
    has = lambda *p: any(k.startswith(p) for k in keys)  # noqa: E731
    if has("model.diffusion_model."):
        return "a Stable Diffusion checkpoint (Load Checkpoint, models/checkpoints)"
    if has("stea."):
        return "a PortraitBooth weight file (Load PortraitBooth Model, models/portraitbooth)"
    if has("postfuse_module.", "unet.conv_in."):
        return "FastComposer's release (python -m training import-fastcomposer)"
    if any(k.endswith((".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "a plain LoRA (a LoRA loader node, models/loras)"
    if has("vision_model.", "visual."):
        return "a CLIP vision model (models/clip_vision)"
    return f"an unknown file (first keys: {', '.join(sorted(keys)[:4]) or 'none'})"


def _split(obj, source: str) -> Release:
    if isinstance(obj, dict) and "id_encoder" in obj and isinstance(obj["id_encoder"], dict):
        if not isinstance(obj.get("lora_weights"), dict):
            raise MissingTensorsError(f"{source} has an id_encoder but no lora_weights; the file is incomplete. "
                                      f"Download it again.")
        extra = sorted(str(k) for k in obj if k not in ("id_encoder", "lora_weights"))
        if extra:
            raise NotPhotoMakerError(f"{source} holds entries besides id_encoder and lora_weights ({', '.join(extra[:4])});"
                                     f" PhotoMaker's release holds exactly those two.")
        parts = [{str(k): v for k, v in obj[p].items() if isinstance(v, torch.Tensor)} for p in ("id_encoder", "lora_weights")]
        return Release(parts[0], parts[1], "nested")
    if not isinstance(obj, dict):
        raise NotPhotoMakerError(f"{source} is not a state dict (it holds a {type(obj).__name__}); PhotoMaker's "
                                 f"release is a dict with id_encoder and lora_weights.")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith("id_encoder.") for k in tensors):
        raise NotPhotoMakerError(f"{source} is not a PhotoMaker file: it looks like {_describe(tensors)}. Use "
                                 f"photomaker-v1.bin ({WEIGHTS['v1']}) or photomaker-v2.bin ({WEIGHTS['v2']}).")
    if not any(k.startswith("lora_weights.") for k in tensors):
        raise MissingTensorsError(f"{source} has id_encoder.* but no lora_weights.*; the file is incomplete. "
                                  f"Download it again.")
    other = sorted(k for k in tensors if not k.startswith(("id_encoder.", "lora_weights.")))
    if other:
        raise NotPhotoMakerError(f"{source} holds tensors outside id_encoder.* and lora_weights.* "
                                 f"({', '.join(other[:4])}); it is not PhotoMaker's file.")
    return Release({k[len("id_encoder."):]: v for k, v in tensors.items() if k.startswith("id_encoder.")},
                   {k[len("lora_weights."):]: v for k, v in tensors.items() if k.startswith("lora_weights.")}, "flat")


def load_release(path: str | os.PathLike) -> Release:
    """The release's two parts, read without running code (memory-mapped where possible)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise PhotoMakerImportError(f"{source} not found. Download photomaker-v1.bin ({WEIGHTS['v1']}) or "
                                    f"photomaker-v2.bin ({WEIGHTS['v2']}) and pass its path.")
    return _split(read_release(path, RELEASE_WORDS), source)


def detect_version(id_encoder: Mapping[str, object]) -> str:
    return "v2" if any(k.startswith("qformer_perceiver.") for k in id_encoder) else "v1"


# ---------------------------------------------------------------- the ID encoder


def _count(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _need(shapes: Mapping[str, tuple], keys: Iterable[str], source: str) -> None:
    missing = [f"id_encoder.{k}" for k in keys if k not in shapes]
    if missing:
        raise MissingTensorsError(f"{source} lacks {', '.join(missing[:4])}"
                                  f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}; the file is "
                                  f"incomplete or not PhotoMaker's. Download it again.")


def head_config(shapes: Mapping[str, tuple[int, ...]], version: str, source: str = "the file"):
    """The head's ProjectorConfig from the id_encoder's shapes."""
    _need(shapes, ("fuse_module.layer_norm.weight", "fuse_module.mlp1.fc1.weight", "visual_projection.weight"), source)
    text_dim = shapes["fuse_module.layer_norm.weight"][0]
    hidden = shapes["fuse_module.mlp1.fc1.weight"][0]
    if version == "v1":
        projection = shapes["visual_projection.weight"]
        if not 0 < projection[0] < text_dim:
            raise WrongShapeError(f"{source}: visual_projection gives {projection[0]}-d, but the fuse module is "
                                  f"{text_dim} wide; PhotoMaker v1 concatenates 768 + 1280 = 2048.")
        return photomaker_v1_config(text_dim=text_dim, clip_dim=projection[1], projection_dim=projection[0],
                                    hidden_dim=hidden)
    q = "qformer_perceiver."
    r = q + "perceiver_resampler."
    _need(shapes, (q + "token_proj.0.weight", q + "token_proj.2.weight", r + "proj_in.weight",
                   r + "layers.0.0.to_q.weight", r + "layers.0.1.1.weight"), source)
    id_dim = shapes[q + "token_proj.0.weight"][1]
    inner = shapes[r + "layers.0.0.to_q.weight"][0]
    if inner % RESAMPLER_HEAD_WIDTH:
        raise WrongShapeError(f"{source}: the resampler's attention is {inner} wide, not a multiple of PhotoMaker's "
                              f"{RESAMPLER_HEAD_WIDTH}-wide heads.")
    return photomaker_v2_config(
        text_dim=text_dim, id_dim=id_dim, clip_dim=shapes[r + "proj_in.weight"][1],
        num_tokens=max(1, shapes[q + "token_proj.2.weight"][0] // text_dim),
        depth=_count(shapes, rf"{re.escape(r)}layers\.(\d+)\."), heads=inner // RESAMPLER_HEAD_WIDTH,
        dim_head=RESAMPLER_HEAD_WIDTH, ff_mult=max(1, shapes[r + "layers.0.1.1.weight"][0] // text_dim),
        token_ratio=max(1, shapes[q + "token_proj.0.weight"][0] // id_dim), hidden_dim=hidden)


def _compare(what: str, want: Mapping[str, tuple], have: Mapping[str, tuple], source: str) -> None:
    missing = sorted(k for k in want if k not in have)
    if missing:
        raise MissingTensorsError(f"{source}: {what} lacks {len(missing)} tensors (e.g. "
                                  f"{', '.join('id_encoder.' + k for k in missing[:4])}); the file is incomplete. "
                                  f"Download it again.")
    wrong = [f"id_encoder.{k} {tuple(have[k])} (expected {want[k]})" for k in want if tuple(have[k]) != tuple(want[k])]
    if wrong:
        raise WrongShapeError(f"{source}: {what} tensors with the wrong shape: {'; '.join(wrong[:5])}"
                              f"{f' and {len(wrong) - 5} more' if len(wrong) > 5 else ''}.")


def tower_config(shapes: Mapping[str, tuple[int, ...]], source: str = "the file") -> tuple[dict, list[str]]:
    """(transformers CLIP vision config, keys to write) for the tower part of the id_encoder."""
    from .fastcomposer import FastComposerImportError, clip_vision_config, comfy_clip_vision_shapes

    _need(shapes, ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
                   "vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight"), source)
    try:
        config = clip_vision_config(shapes)
    except FastComposerImportError as exc:
        raise WrongShapeError(f"{source}: {str(exc).replace('image_encoder', 'the CLIP tower')}") from None
    target = comfy_clip_vision_shapes(config)
    keys = sorted(k for k in shapes if (k.startswith("vision_model.") or k == "visual_projection.weight")
                  and not k.endswith("position_ids"))
    extra = [k for k in keys if k not in target]
    if extra:
        raise NotPhotoMakerError(f"{source}: the CLIP tower has tensors a CLIP vision model does not "
                                 f"({', '.join('id_encoder.' + k for k in extra[:4])}); it is not PhotoMaker's.")
    _compare("the CLIP tower", target, shapes, source)
    return config, keys


def is_vit_l14(config: Mapping) -> bool:
    return all(config.get(k) == v for k, v in VIT_L14.items())


# ---------------------------------------------------------------- the LoRA


_PROCESSOR = re.compile(r"(?:unet\.)?(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>up|down)\.weight")
_PEFT = re.compile(r"(?:unet\.)?(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.default)?\.weight")


def _lora_module(key: str) -> tuple[str, str] | None:
    """(diffusers module path, "up"/"down") for a LoRA key in either accepted form."""
    if m := _PROCESSOR.fullmatch(key):
        proj = m["proj"] + (".0" if m["proj"] == "to_out" else "")
        return f"{m['module']}.{proj}", m["part"]
    if m := _PEFT.fullmatch(key):
        return m["module"], {"A": "down", "B": "up"}[m["part"]]
    return None


@functools.lru_cache(maxsize=4)
def _unet_layout(config_json: str) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(diffusers weight key -> ComfyUI key, ComfyUI key -> shape) for a UNet config."""
    import comfy.utils

    from .fastcomposer import comfy_unet_shapes

    config = json.loads(config_json)
    return comfy.utils.unet_to_diffusers(config), comfy_unet_shapes(config)


def lora_key_map(shapes: Mapping[str, tuple[int, ...]], unet_config: Mapping | None = None,
                 source: str = "the file") -> tuple[dict[str, str], dict[str, int]]:
    """(release key -> written key, kohya module -> rank) for the lora_weights part; every key
    must map onto a linear layer of the UNet (default SDXL's) with matching shapes."""
    diffusers_map, target = _unet_layout(json.dumps(dict(unet_config or SDXL_UNET_CONFIG), sort_keys=True))
    mapping, unmatched, parts = {}, [], {}
    for key in sorted(shapes):
        found = _lora_module(key)
        comfy_key = diffusers_map.get(f"{found[0]}.weight") if found else None
        if comfy_key is None or len(target.get(comfy_key, ())) != 2:
            unmatched.append(key)
            continue
        module = "lora_unet_" + comfy_key[:-len(".weight")].replace(".", "_")
        if found[1] in parts.get(module, {}):
            raise UnmatchedLoraKeysError(f"{source}: lora_weights.{key} and lora_weights.{parts[module][found[1]][0]} "
                                         f"are the same LoRA half of one layer (two key forms mixed); the file is "
                                         f"not PhotoMaker's as released.")
        mapping[key] = f"{module}.lora_{found[1]}.weight"
        parts.setdefault(module, {})[found[1]] = (key, comfy_key)
    if unmatched:
        raise UnmatchedLoraKeysError(
            f"{source}: {len(unmatched)} LoRA keys match no attention layer of the SDXL UNet: "
            f"{', '.join('lora_weights.' + k for k in unmatched[:6])}{' ...' if len(unmatched) > 6 else ''}. "
            f"PhotoMaker's LoRA uses diffusers' attention-processor keys (unet.<module>.processor.to_q_lora."
            f"down.weight) or PEFT keys (<module>.to_q.lora_A.weight); this file is not PhotoMaker's or not for SDXL.")
    ranks, wrong = {}, []
    for module, pair in parts.items():
        if set(pair) != {"up", "down"}:
            have = next(iter(pair.values()))[0]
            raise MissingTensorsError(f"{source}: lora_weights.{have} has no {'up' if 'down' in pair else 'down'} "
                                      f"half; the file is incomplete. Download it again.")
        (down_key, comfy_key), (up_key, _) = pair["down"], pair["up"]
        out_dim, in_dim = target[comfy_key]
        down, up = tuple(shapes[down_key]), tuple(shapes[up_key])
        if len(down) != 2 or len(up) != 2 or down[1] != in_dim or up[0] != out_dim or up[1] != down[0]:
            wrong.append(f"lora_weights.{down_key} {down} / {up} (the layer is {out_dim}x{in_dim})")
        ranks[module] = down[0]
    if wrong:
        raise WrongShapeError(f"{source}: LoRA tensors that do not fit SDXL's layers: {'; '.join(wrong[:4])}"
                              f"{f' and {len(wrong) - 4} more' if len(wrong) > 4 else ''}.")
    return mapping, ranks


# ---------------------------------------------------------------- validation


@dataclass
class Plan:
    version: str
    clip_config: dict
    clip_keys: list[str]
    head_config: object
    lora_map: dict[str, str]
    lora_ranks: dict[str, int]
    warnings: list[str] = field(default_factory=list)


def validate_release(release: Release, version: str = "auto", source: str = "the file",
                     unet_config: Mapping | None = None) -> Plan:
    """Check the release is PhotoMaker's (the version asked for), complete, with consistent shapes."""
    shapes = {k: tuple(v.shape) for k, v in release.id_encoder.items()}
    found = detect_version(shapes)
    if version not in ("auto", *VERSIONS):
        raise PhotoMakerImportError(f"--version must be auto, v1 or v2, got {version!r}")
    if version != "auto" and version != found:
        why = ("it has the v2 resampler (id_encoder.qformer_perceiver.*)" if found == "v2"
               else "it has no v2 resampler (id_encoder.qformer_perceiver.*)")
        raise WrongVersionError(f"{source} is PhotoMaker {found}, not {version}: {why}. Pass --version {found} "
                                f"(or leave --version auto), or download photomaker-{version}.bin ({WEIGHTS[version]}).")
    warnings = []
    named = re.search(r"v([12])\b", Path(source).stem.lower())
    if named and f"v{named.group(1)}" != found:
        warnings.append(f"the file name says v{named.group(1)} but its tensors are PhotoMaker {found}'s; "
                        f"imported as {found}")
    clip_config, clip_keys = tower_config(shapes, source)
    config = head_config(shapes, found, source)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build_photomaker_head(config).state_dict().items()}
    _compare(f"the PhotoMaker {found} head", want, shapes, source)
    reads = config.face_dim if found == "v1" else config.option("clip_dim")
    if reads != clip_config["hidden_size"]:
        raise WrongShapeError(f"{source}: the head reads {reads}-wide CLIP features but the tower is "
                              f"{clip_config['hidden_size']} wide.")
    used = set(clip_keys) | set(want) | {"visual_projection_2.weight"}
    leftover = sorted(k for k in shapes if k not in used and not k.endswith("position_ids"))
    if leftover:
        raise NotPhotoMakerError(f"{source}: id_encoder tensors PhotoMaker {found} does not have: "
                                 f"{', '.join('id_encoder.' + k for k in leftover[:6])}"
                                 f"{' ...' if len(leftover) > 6 else ''}. The file is another model.")
    if not release.lora:
        raise MissingTensorsError(f"{source}: lora_weights is empty; the file is incomplete. Download it again.")
    lora_map, ranks = lora_key_map({k: tuple(v.shape) for k, v in release.lora.items()}, unet_config, source)
    if config.text_dim != SDXL_TEXT_DIM:
        warnings.append(f"the head is {config.text_dim} wide, not SDXL's {SDXL_TEXT_DIM} (CLIP-L 768 + bigG 1280): "
                        f"it will not fit SDXL's text conditioning")
    if not is_vit_l14(clip_config):
        warnings.append(f"the CLIP tower is not ViT-L/14 at 224 px ({clip_config['num_hidden_layers']} layers, width "
                        f"{clip_config['hidden_size']}); ComfyUI's Load CLIP Vision recognises ViT-L/14 only")
    return Plan(found, clip_config, clip_keys, config, lora_map, ranks, warnings)


# ---------------------------------------------------------------- writing


@dataclass
class ImportReport:
    version: str
    clip_vision: Path
    portraitbooth: Path
    lora_modules: int
    lora_rank: int
    warnings: list[str]


def output_paths(models_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    root = Path(models_dir)
    return {"clip_vision": root / "clip_vision" / f"{name}_clip_vit_l14.safetensors",
            "portraitbooth": root / "portraitbooth" / f"{name}.safetensors"}


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False)


def convert_lora(lora: Mapping[str, torch.Tensor], plan: Plan, dtype: torch.dtype,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """kohya keys ComfyUI maps; `.alpha` = rank, so ComfyUI's scale alpha/rank is 1, the
    scale diffusers gives a LoRA saved without network alphas."""
    out = {plan.lora_map[k]: v.to(dtype).contiguous() for k, v in _progress(list(lora.items()), "LoRA", progress)}
    out.update({f"{module}.alpha": torch.tensor(float(rank)) for module, rank in plan.lora_ranks.items()})
    return out


def head_from_release(release: Release, config) -> torch.nn.Module:
    head = build_photomaker_head(config)
    wanted = head.state_dict()
    head.load_state_dict({k: release.id_encoder[k].float() for k in wanted})
    return head.eval().requires_grad_(False)


def face_encoder_spec(version: str, head, clip_config: dict) -> FaceEncoderSpec:
    tower = "CLIP ViT-L/14" if is_vit_l14(clip_config) else \
        f"CLIP vision ({clip_config['num_hidden_layers']} layers, width {clip_config['hidden_size']})"
    if version == "v1":
        kind = V1_KIND if is_vit_l14(clip_config) else f"clip_vision:{clip_config['hidden_size']}w"
        return FaceEncoderSpec(kind, head.config.face_dim, feature="pooled_output", normalized=False,
                               description=f"{tower} pooled output of the whole photo (before projection)")
    return FaceEncoderSpec(V2_KIND, head.config.face_dim, feature="embedding+last_hidden_state", normalized=False,
                           description=f"insightface buffalo_l ArcFace embedding (raw, 512-d) + {tower} "
                                       f"last_hidden_state of the whole photo")


def import_photomaker(path: str | os.PathLike, models_dir: str | os.PathLike, overwrite: bool = False,
                      name: str | None = None, version: str = "auto", dtype: str = "fp16",
                      progress: bool = True, unet_config: Mapping | None = None) -> ImportReport:
    """Validate PhotoMaker's release and write the two files (see the module docstring).
    unet_config: the ComfyUI UNet config the LoRA must fit (default SDXL's; tests use small ones)."""
    if dtype not in DTYPES:
        raise PhotoMakerImportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if name is not None and not re.fullmatch(r"[\w.-]+", name):
        raise PhotoMakerImportError(f"--name {name!r}: use letters, digits, '_', '-' or '.' only")
    def refuse_existing(outputs: dict[str, Path]) -> None:
        exists = [str(p) for p in outputs.values() if p.exists()]
        if exists and not overwrite:
            raise OutputExistsError(f"already imported: {', '.join(exists)} exist. Pass --overwrite to replace "
                                    f"them, or --name to write a second copy.")

    if name is not None or version in VERSIONS:  # known before reading a 1-2 GB file
        refuse_existing(output_paths(models_dir, name or f"photomaker_{version}"))
    source = Path(path)
    log.info("[import] reading %s", source)
    release = load_release(source)
    plan = validate_release(release, version, str(source), unet_config)
    name = name or f"photomaker_{plan.version}"
    outputs = output_paths(models_dir, name)
    refuse_existing(outputs)
    target = DTYPES[dtype]
    stamp = {"model": f"PhotoMaker {plan.version}", "weights": WEIGHTS[plan.version], **SOURCE,
             "source_file": source.name, "source_bytes": source.stat().st_size}
    if plan.version == "v2":
        stamp["note"] = V2_FACE_NOTE
    temps = {k: p.with_name(f".{p.name}.{os.getpid()}.part") for k, p in outputs.items()}
    try:
        from safetensors.torch import save_file

        clip = {k: release.id_encoder[k].to(target).contiguous()
                for k in _progress(plan.clip_keys, "CLIP vision", progress)}
        with atomic_target(temps["clip_vision"]) as tmp:  # the umask's mode, not save_file's 0600
            save_file(clip, str(tmp), metadata={"portraitbooth_import": json.dumps(
                {"part": "clip_vision", "config": plan.clip_config, "dtype": dtype, **stamp})})
        del clip
        head = head_from_release(release, plan.head_config)
        lora = convert_lora(release.lora, plan, target, progress)
        save_portraitbooth(
            temps["portraitbooth"], head, face_encoder_spec(plan.version, head, plan.clip_config), unet_patch=lora,
            defaults={"start_percent": DEFAULT_START, "cfg": DEFAULT_CFG, "clip_vision": outputs["clip_vision"].name,
                      "preprocess": "clip_center_crop", "tokens_per_photo": head.tokens_per_photo,
                      "trigger_word": TRIGGER_WORD, "text": "sdxl_penultimate", "lora_strength": 1.0},
            source={**stamp, "imported_parts": ["id_encoder (head)", "lora_weights"]})
        for key, out in outputs.items():
            os.replace(temps[key], out)
            log.info("[import] wrote %s", out)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return ImportReport(plan.version, outputs["clip_vision"], outputs["portraitbooth"], len(plan.lora_ranks),
                        max(plan.lora_ranks.values()), plan.warnings)


def format_report(report: ImportReport) -> str:
    lines = [f"PhotoMaker {report.version} imported:",
             f"  CLIP vision (the ID encoder's tower)  {report.clip_vision}",
             f"  PortraitBooth file (head + LoRA)      {report.portraitbooth}",
             f"    projector kind photomaker_{report.version}; LoRA on {report.lora_modules} SDXL attention layers "
             f"(rank {report.lora_rank}), in keys ComfyUI's LoRA loader maps",
             "Use in ComfyUI: an SDXL checkpoint (Load Checkpoint); Load CLIP Vision "
             f"{report.clip_vision.name}; Load PortraitBooth Model {report.portraitbooth.name}.",
             f"  Defaults stored in the file: identity from {DEFAULT_START:g} of the steps on, CFG {DEFAULT_CFG:g}."]
    if report.version == "v2":
        lines.append(f"  v2 also needs a face embedding per photo (insightface buffalo_l); {V2_FACE_NOTE}.")
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)


__all__ = ["DEFAULT_CFG", "DEFAULT_START", "ImportReport", "MissingTensorsError", "NotPhotoMakerError",
           "OutputExistsError", "PhotoMakerImportError", "Plan", "Release", "SDXL_UNET_CONFIG", "TruncatedFileError",
           "UnmatchedLoraKeysError", "UnsafeFileError", "WrongShapeError", "WrongVersionError", "detect_version",
           "format_report", "head_config", "import_photomaker", "load_release", "lora_key_map", "output_paths",
           "tower_config", "validate_release"]
