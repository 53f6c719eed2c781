"""Stage 0 of a FastComposer warm start (stage0_steps > 0): before the first training
step, the PortraitBooth projector (class word's CLIP text output psi + face-recognizer
embedding -> token) is fitted to reproduce FastComposer's fused token (its postfuse
projector on psi and the CLIP image embedding of the same reference photo) for the
dataset's samples.

A regression in token space, loss MSE over the 768 channels; no UNet forward. Its inputs
are computed once: the CLIP image embeddings with the imported CLIP vision model
(FastComposer's preprocessing, portraitbooth_core.face.clip_image) of each sample's
reference face crop (ref.png: the photo its face embedding came from), psi with the
run's own text encoder. Every 10th sample is held out to report how well tokens of
unseen photos match. So training starts from a UNet that already follows a class token
(models.warm_start loads it) and a projector that already speaks its language.

What was loaded and what stage 0 reached go into <output>/warm_start.json and the
exported weight file's metadata (training.warm_start, and source).
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from portraitbooth_core.bounded_json import read_json_file

from ..dataset.samples import sample_meta
from ..models.warm_start import (CLIP_HOW, ENCODE_CHUNK, TEACHER_HOW, TeacherError, WarmStartError, check_unet_file,
                                 checked_header, clip_embeddings, load_clip_vision, load_teacher,
                                 teacher_clip_vision_path)

log = logging.getLogger("portraitbooth.training")


STATE_FILE = "warm_start.json"


STAGE0_METRICS = "stage0_metrics.jsonl"


HOLD_OUT_EVERY = 10      # every 10th sample is held out of stage 0 (its report), from 20 samples on


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
        meta = sample_meta(raw)
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
    from ..models.text_cache import TextCache

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
        checked_header(path, "stage0_clip_vision", TeacherError, CLIP_HOW)


def before_training(trainer, progress: bool = False) -> None:
    """What Trainer.run does before its first step: record init_unet in the run folder, and
    run stage 0 on a fresh run (a resumed run's projector comes from its checkpoint)."""
    cfg = trainer.config
    if trainer.dist.main and getattr(trainer.models, "warm_start", None):
        record_state(cfg.output, {"init_unet": trainer.models.warm_start})
    if cfg.stage0_steps > 0 and trainer.step == 0 and trainer.resumed_from is None \
            and getattr(trainer, "stage0", None) is None:  # not twice (the evidence run calls this itself)
        trainer.stage0 = run_stage0(trainer, progress)


def record_state(output: str | os.PathLike, update: dict) -> dict:
    """Merge `update` into <output>/warm_start.json (atomically); returns the whole record."""
    from ..dataset.shards import write_json_atomic

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
        data = read_json_file(path, str(path), max_bytes=1 << 20)
    except (OSError, ValueError):  # unreadable: no stage 0 recorded
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


