"""The training loop: accumulation, DDP, NaN/inf guard, EMA, logging, validation,
checkpoints with exact resume, export."""
from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from portraitbooth_core.face.arcface_torch import TorchArcFace
from portraitbooth_core.optional import require
from portraitbooth_core.stea.projector import ProjectorConfig, STEAProjector

from . import distributed as D
from .checkpoint import load_latest, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import BatchLoader, micro_positions
from .ema import EMA
from .metrics import MetricsLog
from .models import Models, load_models, trainable_unet_parameters
from .shards import ShardReader
from .step import TrainModule

log = logging.getLogger("portraitbooth.training")


class Trainer:
    def __init__(self, config: TrainConfig, dist: D.Dist | None = None, resume: bool = True,
                 models: Models | None = None):
        """models: already loaded models to train instead of loading config.checkpoint
        (the evidence run trains a UNet smaller than any SD1.5 checkpoint holds)."""
        self.config = config.validate()
        self.dist = dist or D.setup()
        self.out = Path(config.output)
        self.reader = ShardReader(config.dataset)
        self.loader = BatchLoader(self.reader, config)
        self.resolution = int(self.reader.index["resolution"])
        torch.manual_seed(config.seed)  # same LoRA/projector init on every rank
        self.models = models if models is not None else load_models(config, self.dist.device)
        face = self.reader.index["face_encoder"]
        self.projector = STEAProjector(ProjectorConfig(face_dim=int(face["dim"]),
                                                       hidden_dim=config.projector_hidden)).to(self.dist.device)
        self.module = TrainModule(self.models, self.projector, config, self._recognizer(face), self.resolution)
        self.ddp = self.module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.module, device_ids=ids)
        self.params = {**{f"unet.{n}": p for n, p in trainable_unet_parameters(self.models).items()},
                       **{f"projector.{n}": p for n, p in self.projector.named_parameters()}}
        self.optimizer = self._optimizer()
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.ema = EMA(self.params, config.ema_decay) if config.ema_decay > 0 else None
        self.metrics = MetricsLog(self.out, config.tensorboard, enabled=self.dist.main)
        self.step, self.skipped_steps = 0, []
        ratio = getattr(self.models.vae, "downscale_ratio", 8)
        self.latent_hw = (self.resolution // ratio, self.resolution // ratio)
        self.global_batch = self.dist.world * config.micro_batch * config.grad_accum
        self.resumed_from = self.resume() if resume else None

    # -- construction --------------------------------------------------------------------
    def _recognizer(self, face: dict):
        path = self.config.recognizer or face.get("recognizer_path")
        if self.config.id_weight <= 0:
            return None
        if not path or not Path(path).is_file():
            log.warning("no differentiable recognizer (ArcFace ONNX) available (%s): L_id is off. Set "
                        "`recognizer` to the ONNX file of the dataset's face encoder.", path)
            return None
        return TorchArcFace(path, self.config.recognizer_feature).to(self.dist.device)

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups = [{"params": [p for n, p in self.params.items() if not n.startswith("projector.")], "lr": cfg.lr},
                  {"params": list(self.projector.parameters()), "lr": cfg.projector_lr or cfg.lr}]
        groups = [g for g in groups if g["params"]]
        if cfg.optimizer == "adamw8bit":
            bnb = require("bitsandbytes", "8-bit Adam (optimizer=adamw8bit)")
            return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    # -- checkpoints ---------------------------------------------------------------------
    def state(self, rng: list) -> dict:
        return {"step": self.step, "params": {n: p.detach().cpu() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else {}, "rng": rng,
                "skipped_steps": list(self.skipped_steps), "config": self.config.to_dict(),
                "global_batch": self.global_batch, "world_size": self.dist.world}

    def save(self) -> Path | None:
        rng = D.gather_objects(rng_state(), self.dist)  # collective: every rank calls it
        path = None
        if self.dist.main:
            path = save_checkpoint(self.out / "checkpoints", self.step, self.state(rng), self.config.keep_last)
        D.barrier(self.dist)
        return path

    def resume(self) -> Path | None:
        found = load_latest(self.out / "checkpoints")
        if found is None:
            return None
        path, state = found
        if state.get("global_batch", self.global_batch) != self.global_batch:
            # Data positions are step * global batch: another batch size resumes fine but
            # not exactly (samples are seen in another grouping).
            log.warning("resuming %s with global batch %d (the run used %d): not an exact resume",
                        path, self.global_batch, state["global_batch"])
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n].to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        self.step, self.skipped_steps = int(state["step"]), list(state["skipped_steps"])
        set_rng_state(state["rng"][self.dist.rank % len(state["rng"])])
        log.info("resumed from %s at step %d", path, self.step)
        return path

    # -- one optimizer step --------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            positions = micro_positions(self.step, micro, self.dist.rank, cfg, self.dist.world)
            batch = self.loader.batch(positions, self.latent_hw).to(self.dist.device)
            last = micro == cfg.grad_accum - 1
            sync = self.ddp.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with sync:
                terms = self.ddp(batch)
                (terms["total"] / cfg.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        # One device sync for all gradients, not one per tensor.
        finite = all(math.isfinite(v) for v in sums.values()) and (
            not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()))
        if D.all_true(finite, self.dist):
            if cfg.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
                sums["grad_norm"] = float(norm)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps.append({"step": self.step, "terms": {k: repr(v) for k, v in sums.items()}})
            log.warning("step %d skipped: non-finite loss or gradient %s", self.step, sums)
            sums["skipped"] = 1.0
        with warnings.catch_warnings():
            # A skipped step still advances the schedule (it consumed its data); torch warns
            # when that happens before the first optimizer step.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.step += 1
        return sums

    # -- the run -------------------------------------------------------------------------
    def run(self, callback: Callable[[int, int, dict], None] | None = None,
            export_path: str | Path | None = None) -> Path | None:
        """Train to config.steps; returns the exported weight file (on rank 0), written to
        export_path or <output>/<export_name>."""
        from .export import export
        from .validate import write_validation

        cfg = self.config
        self.ddp.train()
        while self.step < cfg.steps:
            start = time.perf_counter()
            values = self.train_step()
            values = D.mean_across(values, self.dist)
            values["lr"] = self.scheduler.get_last_lr()[0]
            values["step_s"] = time.perf_counter() - start
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.metrics.log(self.step, values)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
            if self.dist.main and cfg.validate_every and self.step % cfg.validate_every == 0:
                write_validation(self.out, self.step, self)
            if self.dist.main and cfg.export_every and self.step % cfg.export_every == 0:
                export(self, self.out / f"step-{self.step:08d}-{cfg.export_name}")
            if callback is not None:
                callback(self.step, cfg.steps, values)
        path = export(self, export_path) if self.dist.main else None
        self.metrics.close()
        return path

    def close(self) -> None:
        self.reader.close()
        if self.models.lora is not None:
            self.models.lora.detach()
