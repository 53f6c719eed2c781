"""Warm start from FastComposer: its UNet under PortraitBooth training, and stage 0.

FastComposer (mit-han-lab/fastcomposer, MIT) is STEA's design with a CLIP image embedding
instead of a face recognizer: an SD1.5 UNet fine-tuned to follow a fused class token.
`python -m training import-fastcomposer` writes its parts as ComfyUI files; this module
starts a PortraitBooth run from them:

- init_unet: the imported diffusion-model file is loaded over the SD1.5 checkpoint's UNet
  before training (any mode). The file must be an SD1.5 UNet (portraitbooth_core.weights.
  family, from its header) of exactly the checkpoint UNet's keys and shapes.
- stage 0 (stage0_steps > 0): before the first training step, the PortraitBooth projector
  (class word's CLIP text output psi + face-recognizer embedding -> token) is fitted to
  reproduce FastComposer's fused token (its postfuse projector on psi and the CLIP image
  embedding of the same reference photo) for the dataset's samples. A regression in token
  space, loss MSE over the 768 channels; no UNet forward. Its inputs are computed once:
  the CLIP image embeddings with the imported CLIP vision model (FastComposer's
  preprocessing, portraitbooth_core.face.clip_image) of each sample's reference face
  crop (ref.png: the photo its face embedding came from), psi with the run's own text
  encoder. Every 10th sample is held out to report how well tokens of unseen photos
  match. So training starts from a UNet that already follows a class token and a
  projector that already speaks its language.

What was loaded and what stage 0 reached go into <output>/warm_start.json and the
exported weight file's metadata (training.warm_start, and source).
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from portraitbooth_core.weights.family import (
    FAMILY_NAMES, UNET, family_from_shapes, read_safetensors_header, safetensors_expected_size,
)

log = logging.getLogger("portraitbooth.training")

IMPORT_HINT = "`python -m training import-fastcomposer pytorch_model.bin --models <ComfyUI>/models`"
UNET_HOW = (f"Give the diffusion-model file that {IMPORT_HINT} wrote "
            f"(models/diffusion_models/fastcomposer_unet.safetensors).")
TEACHER_HOW = (f"Give the FastComposer projector file that {IMPORT_HINT} wrote "
               f"(models/portraitbooth/fastcomposer_postfuse.safetensors).")
CLIP_HOW = (f"Give the CLIP vision file that {IMPORT_HINT} wrote "
            f"(models/clip_vision/fastcomposer_clip_vit_l14.safetensors) as stage0_clip_vision.")
STATE_FILE = "warm_start.json"
STAGE0_METRICS = "stage0_metrics.jsonl"
HOLD_OUT_EVERY = 10      # every 10th sample is held out of stage 0 (its report), from 20 samples on
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


def _header(path: Path, setting: str, error: type[WarmStartError], how: str) -> tuple[dict, dict]:
    try:
        shapes, meta = read_safetensors_header(path)
        expected = safetensors_expected_size(path)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise error(f"{setting}: {path.name} is not a .safetensors file or is corrupt ({exc}). {how}") from None
    size = path.stat().st_size
    if size < expected:
        raise error(f"{setting}: {path.name} is truncated ({size:,} of {expected:,} bytes). Copy or import it again.")
    return shapes, meta


def _import_stamp(meta: dict) -> dict:
    """What import-fastcomposer recorded about a file's origin (without the bulky config)."""
    try:
        stamp = json.loads(meta.get("portraitbooth_import", "{}"))
    except json.JSONDecodeError:
        return {}
    return {k: v for k, v in stamp.items() if k != "config"} if isinstance(stamp, dict) else {}


# ---------------------------------------------------------------- init_unet


def check_unet_file(value: str, setting: str = "init_unet") -> tuple[Path, str, dict, dict]:
    """From the header alone: (path, key prefix, UNet shapes by ComfyUI key, metadata) of an
    SD1.5 UNet file, or an InitUnetError saying what the file is instead."""
    path = resolve_file(value, setting, "diffusion_models", UNET_HOW, InitUnetError)
    shapes, meta = _header(path, setting, InitUnetError, UNET_HOW)
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


# ---------------------------------------------------------------- stage 0: teacher and CLIP vision


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

    _, meta = _header(path, "stage0_clip_vision", TeacherError, CLIP_HOW)
    config = None
    try:
        config = json.loads(meta.get("portraitbooth_import", "{}")).get("config")
    except (json.JSONDecodeError, AttributeError):
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


# ---------------------------------------------------------------- stage 0: data and fit


@dataclass
class TokenRows:
    """One row per (sample, class-word position): the student's inputs and the teacher's token."""

    psi: torch.Tensor        # [R, 768] class word's text-encoder output
    faces: torch.Tensor      # [R, D] the dataset's face-recognizer embedding (PortraitBooth's input)
    target: torch.Tensor     # [R, 768] FastComposer's fused token for the same photo
    held_out: torch.Tensor   # [R] bool: the row's sample is held out of the fit
    samples: int             # samples read (rows can be more: several class words per caption)


def _sample_indices(count: int, limit: int) -> list[int]:
    if limit <= 0 or limit >= count:
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, limit)})


def collect_rows(reader, text, teacher_projector: nn.Module, clip_vision, limit: int = 0,
                 progress: bool = False) -> TokenRows:
    """Read the samples once: psi per class-word position (`text(caption)` -> [1, 77, C],
    the run's own cache), the face embedding, and the reference crop's CLIP embedding
    through the teacher's projector. Crops are encoded in chunks as they are read, so
    only the rows stay in memory."""
    from PIL import Image

    indices = _sample_indices(len(reader), limit)
    held = len(indices) >= 2 * HOLD_OUT_EVERY
    psi, faces, owner, out_mask, clip, pending = [], [], [], [], [], []
    samples = 0

    def encode() -> None:
        if pending:
            clip.append(clip_embeddings(clip_vision, pending))
            pending.clear()

    items = indices
    if progress:
        from tqdm import tqdm

        items = tqdm(indices, desc="stage 0: reading samples", unit="sample", leave=False)
    for n, i in enumerate(items):
        raw = reader.read(i)
        meta = json.loads(raw["json"])
        cond = text(meta["caption"]) if meta.get("identity_positions") and "ref.png" in raw else None
        # Positions past the encoded chunk cannot be spliced in training either.
        positions = [int(p) for p in meta.get("identity_positions") or []
                     if cond is not None and int(p) < cond.shape[1]]
        if not positions:
            continue
        embedding = torch.from_numpy(np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False).astype(np.float32))
        with Image.open(io.BytesIO(raw["ref.png"])) as im:
            pending.append(np.array(im.convert("RGB")))  # writable: torch warns on read-only arrays
        for p in positions:
            psi.append(cond[0, p].float())
            faces.append(embedding)
            owner.append(samples)
            out_mask.append(held and n % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1)
        samples += 1
        if len(pending) >= ENCODE_CHUNK:
            encode()
    encode()
    if not samples:
        raise WarmStartError("stage 0: no dataset sample has a class-word position and a reference face; "
                             "nothing to fit. Rebuild the dataset with captions that name the person's class word.")
    clip_t = torch.cat(clip)
    if clip_t.shape[-1] != teacher_projector.config.face_dim:
        raise TeacherError(f"stage0_clip_vision gives {clip_t.shape[-1]}-d image embeddings but the teacher's "
                           f"projector reads {teacher_projector.config.face_dim}-d: use the CLIP vision file imported "
                           f"with it. {CLIP_HOW}")
    psi_t = torch.stack(psi)
    if psi_t.shape[-1] != teacher_projector.config.text_dim:
        raise TeacherError(f"the text encoder gives {psi_t.shape[-1]}-d tokens but the teacher's projector reads "
                           f"{teacher_projector.config.text_dim}-d: the checkpoint is not SD1.5's CLIP-L.")
    index = torch.tensor(owner)
    with torch.no_grad():
        teacher = teacher_projector.float()
        target = torch.cat([teacher(psi_t[k:k + 4096], clip_t[index[k:k + 4096]]).float()
                            for k in range(0, len(psi_t), 4096)])
    return TokenRows(psi_t, torch.stack(faces), target, torch.tensor(out_mask, dtype=torch.bool), samples)


@torch.no_grad()
def token_errors(projector: nn.Module, psi: torch.Tensor, faces: torch.Tensor, target: torch.Tensor) -> dict:
    """MSE (the stage-0 loss) and mean cosine of the projector's tokens against the teacher's."""
    if len(psi) == 0:
        return {}
    pred = projector(psi, faces).float()
    return {"mse": float(F.mse_loss(pred, target)), "cosine": float(F.cosine_similarity(pred, target, dim=-1).mean())}


def fit_projector(projector: nn.Module, rows: TokenRows, steps: int, lr: float, batch: int, seed: int,
                  device: torch.device, on_step=None, progress: bool = False) -> dict:
    """AdamW on the MSE between projector(psi, face) and the teacher's token, on the rows
    not held out; returns train and held-out errors before and after."""
    from .data import generator

    train = ~rows.held_out
    psi, faces, target = (t.to(device) for t in (rows.psi, rows.faces, rows.target))
    tr, ho = train.to(device), (~train).to(device)
    before = {"train": token_errors(projector, psi[tr], faces[tr], target[tr]),
              "held_out": token_errors(projector, psi[ho], faces[ho], target[ho]),
              # the class word alone (no identity): what an untouched token is off by
              "class_word_only_held_out_mse": float(F.mse_loss(psi[ho], target[ho])) if bool(ho.any()) else None}
    params = [p for p in projector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = generator(seed, 17)
    train_idx = train.nonzero().flatten()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="stage 0: projector -> FastComposer tokens", unit="step", leave=False)
    projector.train()
    for step in range(steps):
        pick = train_idx[torch.randint(len(train_idx), (min(batch, len(train_idx)),), generator=g)].to(device)
        loss = F.mse_loss(projector(psi[pick], faces[pick]).float(), target[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(mse=f"{value:.4g}", refresh=False)
        if on_step is not None:
            on_step(step + 1, steps, value)
    if bar is not None:
        bar.close()
    after = {"train": token_errors(projector, psi[tr], faces[tr], target[tr]),
             "held_out": token_errors(projector, psi[ho], faces[ho], target[ho])}
    return {"before": before, "after": after}


def sync_parameters(module: nn.Module, dist) -> None:
    """Average a module's parameters over ranks (they agree already up to kernel
    nondeterminism: every rank fits the same rows from the same seed)."""
    from . import distributed as D

    if not dist.enabled:
        return
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((D.all_sum(p.detach().double().cpu(), dist) / dist.world).to(p))


def run_stage0(trainer, progress: bool = False) -> dict:
    """Stage 0 on a Trainer before its first step: fit trainer.projector to the teacher's
    tokens; records the outcome in <output>/warm_start.json. Returns that summary."""
    cfg = trainer.config
    start = time.perf_counter()
    teacher = load_teacher(cfg.stage0_teacher)
    if teacher.info.projector.text_dim != trainer.projector.config.text_dim:
        raise TeacherError(f"stage0_teacher: its projector writes {teacher.info.projector.text_dim}-d tokens, "
                           f"this run's {trainer.projector.config.text_dim}-d. {TEACHER_HOW}")
    clip_path = teacher_clip_vision_path(cfg, teacher)
    clip_vision = load_clip_vision(clip_path)
    log.info("stage 0: teacher %s, CLIP vision %s", teacher.path, clip_path)
    from .step import TextCache

    # The step's cache of the frozen text encoder (the captions are encoded once for both),
    # or a cache of its own when the step reads precomputed encodings instead.
    text = getattr(trainer.module, "text", None)
    text = text if isinstance(text, TextCache) else TextCache(trainer.models.clip)
    rows = collect_rows(trainer.reader, text, teacher.projector, clip_vision, cfg.stage0_samples, progress)
    del clip_vision
    records: list[dict] = []
    every = max(1, cfg.stage0_steps // 20)

    def on_step(step: int, total: int, value: float) -> None:
        if step % every == 0 or step == total:
            records.append({"step": step, "mse": round(value, 8)})
            if not progress:
                log.info("stage 0 step %d/%d mse=%.5g", step, total, value)

    result = fit_projector(trainer.projector, rows, cfg.stage0_steps, cfg.stage0_lr, cfg.stage0_batch, cfg.seed,
                           trainer.dist.device, on_step, progress)
    sync_parameters(trainer.projector, trainer.dist)
    if trainer.ema is not None:  # the average starts from the fitted projector, not the fresh one
        for name, p in trainer.params.items():
            if name.startswith("projector."):
                trainer.ema.shadow[name].copy_(p.detach().float())
    summary = {"steps": cfg.stage0_steps, "loss": "mse", "lr": cfg.stage0_lr, "batch": cfg.stage0_batch,
               "samples": rows.samples, "rows": len(rows.psi), "held_out_rows": int(rows.held_out.sum()),
               "teacher": Path(teacher.path).name, "teacher_source": teacher.info.source,
               "clip_vision": clip_path.name, "reference_image": "ref.png (the reference face crop)",
               **result, "seconds": round(time.perf_counter() - start, 2)}
    before, after = result["before"], result["after"]
    held = (f"held-out {before['held_out']['mse']:.4g} -> {after['held_out']['mse']:.4g}, "
            f"cosine {after['held_out']['cosine']:.3f}" if after["held_out"] else "no held-out rows (< 20 samples)")
    log.info("stage 0: token MSE %.4g -> %.4g (train), %s", before["train"]["mse"], after["train"]["mse"], held)
    if trainer.dist.main:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / STAGE0_METRICS, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        record_state(out, {"stage0": summary})
    return summary


def check_settings(config) -> None:
    """Before any model loads (minutes for SD1.5): the warm-start files exist and are what
    their settings need, from headers and the small projector file. Raises WarmStartError."""
    if config.init_unet:
        check_unet_file(config.init_unet)
    if config.stage0_steps > 0:
        teacher = load_teacher(config.stage0_teacher)
        path = teacher_clip_vision_path(config, teacher)
        _header(path, "stage0_clip_vision", TeacherError, CLIP_HOW)


def before_training(trainer, progress: bool = False) -> None:
    """What Trainer.run does before its first step: record init_unet in the run folder, and
    run stage 0 on a fresh run (a resumed run's projector comes from its checkpoint)."""
    cfg = trainer.config
    if trainer.dist.main and getattr(trainer.models, "warm_start", None):
        record_state(cfg.output, {"init_unet": trainer.models.warm_start})
    if cfg.stage0_steps > 0 and trainer.step == 0 and trainer.resumed_from is None \
            and getattr(trainer, "stage0", None) is None:  # not twice (the evidence run calls this itself)
        trainer.stage0 = run_stage0(trainer, progress)


# ---------------------------------------------------------------- records


def record_state(output: str | os.PathLike, update: dict) -> dict:
    """Merge `update` into <output>/warm_start.json (atomically); returns the whole record."""
    from .shards import write_json_atomic

    path = Path(output) / STATE_FILE
    state = read_state(output)
    state.update(update)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, state)
    return state


def read_state(output: str | os.PathLike) -> dict:
    path = Path(output) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def export_metadata(trainer) -> dict:
    """training.warm_start of the exported file: the UNet it started from and stage 0's
    outcome (read back from the run folder: a resumed run did stage 0 in an earlier process)."""
    cfg = trainer.config
    out: dict = {}
    unet = getattr(trainer.models, "warm_start", None)
    if unet:
        out["unet"] = {k: v for k, v in unet.items() if k != "path"}
    if cfg.stage0_steps > 0:
        stage0 = read_state(cfg.output).get("stage0")
        keys = ("steps", "loss", "samples", "held_out_rows", "teacher", "teacher_source", "clip_vision", "before",
                "after")
        out["stage0"] = ({k: stage0[k] for k in keys if k in stage0} if isinstance(stage0, dict)
                         else {"steps": cfg.stage0_steps, "teacher": Path(cfg.stage0_teacher).name})
    return out


__all__ = ["InitUnetError", "TeacherError", "TokenRows", "WarmStartError", "before_training", "check_settings",
           "check_unet_file", "clip_embeddings", "collect_rows", "export_metadata", "fit_projector",
           "load_clip_vision", "load_init_unet", "load_teacher", "read_state", "record_state", "resolve_file",
           "run_stage0", "teacher_clip_vision_path", "token_errors"]
