"""The training loop: accumulation, DDP, NaN/inf guard, EMA, logging, the collapse alarm,
validation, checkpoints with exact resume, export.

Under DDP every collective is the same on every rank whatever its micro-batches drew:
DDP's gradient all-reduce (every trainable parameter gets a gradient on every rank; see
step.py), one fixed-size all-reduce per step for the logged terms, the attention health
and the NaN/inf guard, and the checkpoint barrier at steps every rank agrees on. The
collapse alarm reads the reduced numbers, so every rank stops at the same step.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from portraitbooth_core.ecac.health import CollapseAlarm, summarize
from portraitbooth_core.face.arcface_torch import TorchArcFace
from portraitbooth_core.optional import require
from portraitbooth_core.stea.projector import ProjectorConfig, STEAProjector

from . import distributed as D
from .checkpoint import load_latest, save_checkpoint
from ..config import TrainConfig
from .dip_check import check_embedding_size, identity_recognizer
from .data import BatchLoader, MicroBatchStream, micro_batch_rng
from .ema import EMA
from . import health as H
from .metrics import MetricsLog, Progress, interactive
from ..models.precision import choose_precision, grad_scaler
from ..dataset.precomputed import Precomputed
from ..models.load import Models, load_models, trainable_unet_parameters
from ..dataset.shards import ShardReader, recorded_recognizer
from .step import TERMS, TrainModule

log = logging.getLogger("portraitbooth.training")

# The loss terms a forward may return, in the fixed order of the per-step all-reduce.
LOGGED_TERMS = (*TERMS, "total")


def _same_file(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve()


class Trainer:
    def __init__(self, config: TrainConfig, dist: D.Dist | None = None, resume: bool = True,
                 models: Models | None = None, recognizer_roots=None, node_words: bool = False,
                 identity_loss: bool = True, projector: torch.nn.Module | None = None,
                 index_cache: str | Path | None = None):
        """models: already loaded models to train instead of loading config.checkpoint
        (the evidence run trains a UNet smaller than any SD1.5 checkpoint holds).
        projector: a projector to train instead of a fresh STEA MLP (the evidence run's
        FastComposer-style teacher trains a postfuse projector).
        node_words: a dataset that cannot feed L_id is refused naming the DIP Trainer
        node's inputs instead of `--set` (dip_check). identity_loss=False: no recognizer is
        checked or loaded (export, which runs no training step). index_cache: where the
        dataset's compact index is kept (ShardReader; the node's keeps input/ unwritten)."""
        self.node_words = node_words
        self.config = config.validate()
        self.recognizer_roots = recognizer_roots  # where the dataset's recognizer may be (shards.recorded_recognizer)
        self.dist = dist or D.setup()
        self.out = Path(config.output)
        self.reader = ShardReader(config.dataset, index_cache=index_cache)
        # Precomputed latents/text encodings: checked against the dataset and the checkpoint
        # before any model loads. Models handed in whose VAE and text encoder did not come
        # from `checkpoint` (Models.encoders_from) make them meaningless: encode in the step then.
        self.precomputed = None
        if config.precomputed != "off" and (models is None or _same_file(models.encoders_from, config.checkpoint)):
            self.precomputed = Precomputed.open(self.reader, config.checkpoint)
        elif config.precomputed != "off" and self.reader.location.exists("precomputed/manifest.json"):
            log.info("the dataset's precomputed inputs are not used: these models' encoders were not loaded "
                     "from `checkpoint`")
        self.loader = BatchLoader(self.reader, config, self.precomputed)
        self.resolution = int(self.reader.index["resolution"])
        face = self.reader.index["face_encoder"]
        # Before any model loads: a dataset that cannot feed L_id stops the run here.
        recognizer_path = (identity_recognizer(face, self.config, recognizer_roots, config.dataset, node_words)
                           if identity_loss else None)
        torch.manual_seed(config.seed)  # same LoRA/projector init on every rank
        self.models = models if models is not None else load_models(config, self.dist.device)
        self.projector = (projector if projector is not None else STEAProjector(ProjectorConfig(
            face_dim=int(face["dim"]), hidden_dim=config.projector_hidden))).to(self.dist.device)
        self.precision = choose_precision(config.precision, self.dist.device)
        recognizer = self._recognizer(face, recognizer_path) if identity_loss else None
        self.module = TrainModule(self.models, self.projector, config, recognizer, self.resolution, self.precision)
        self.ddp = self.module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.module, device_ids=ids)
        self.params = {**{f"unet.{n}": p for n, p in trainable_unet_parameters(self.models).items()},
                       **{f"projector.{n}": p for n, p in self.projector.named_parameters()}}
        self.optimizer = self._optimizer()
        self.scaler = grad_scaler(self.precision, self.dist.device)  # fp16 only; pass-through otherwise
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.ema = EMA(self.params, config.ema_decay) if config.ema_decay > 0 else None
        self.metrics = MetricsLog(self.out, config.tensorboard, enabled=self.dist.main)
        self.step, self.skipped_steps = 0, []
        self.collapse = H.monitor(self.config)  # the dead-token alarm (run/health.py)
        ratio = getattr(self.models.vae, "downscale_ratio", 8)
        self.latent_hw = (self.resolution // ratio, self.resolution // ratio)
        if self.precomputed is not None:
            self.precomputed.check_latent_shape(self.latent_hw)
            log.info("using the dataset's precomputed latents and text encodings (no VAE/CLIP encode per step)")
        # The step's micro-batches: DataLoader workers, pinned memory, prefetch (data.py).
        self.stream = MicroBatchStream(self.loader.dataset(self.latent_hw), config, self.dist.rank, self.dist.world,
                                       self.dist.device, end_step=config.steps)
        self.global_batch = self.dist.world * config.micro_batch * config.grad_accum
        self.resumed_from = self.resume() if resume else None

    # -- construction --------------------------------------------------------------------
    def _recognizer(self, face: dict, path: Path | None = None):
        """The torch recognizer of L_id; None with id_weight=0 or no file (the constructor has
        already refused that case: dip_check.identity_recognizer)."""
        path = path or self.config.recognizer or recorded_recognizer(face, self.recognizer_roots)
        if self.config.id_weight <= 0 or not path or not Path(path).is_file():
            return None
        recognizer = TorchArcFace(path, self.config.recognizer_feature).to(self.dist.device)
        check_embedding_size(recognizer, face, self.config, getattr(self, "node_words", False))
        return recognizer

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        lr = cfg.learning_rate  # explicit lr, else the mode's default
        groups = [{"params": [p for n, p in self.params.items() if not n.startswith("projector.")], "lr": lr},
                  {"params": list(self.projector.parameters()), "lr": cfg.projector_lr or lr}]
        groups = [g for g in groups if g["params"]]
        if cfg.optimizer == "adamw8bit":
            bnb = require("bitsandbytes", "8-bit Adam (optimizer=adamw8bit)")
            return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        # No RNG state: every draw is keyed by global sample position (data.py), which is
        # what lets a run resume on another number of ranks.
        return {"step": self.step, "params": {n: p.detach().cpu() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else {}, "scaler": self.scaler.state_dict(),
                "skipped_steps": list(self.skipped_steps), "config": self.config.to_dict(),
                "global_batch": self.global_batch, "world_size": self.dist.world}

    def save(self) -> Path | None:
        path = None
        if self.dist.main:
            path = save_checkpoint(self.out / "checkpoints", self.step, self.state(), self.config.keep_last)
        D.barrier(self.dist)  # no rank reads or prunes checkpoints before this one is complete
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
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped_steps = int(state["step"]), list(state["skipped_steps"])
        log.info("resumed from %s at step %d (written by %s rank(s), now %d)", path, self.step,
                 state.get("world_size", "?"), self.dist.world)
        return path

    # -- one optimizer step --------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step over the global batch. Returns what is logged, the same on
        every rank: each loss term averaged over the micro-batches (of all ranks) that had
        it, as one process accumulating the same global batch computes it; `id_batches`
        counts the micro-batches with an identity-loss term; with L_loc on, the attention
        health of the step's samples (attn/<token>/<group>/face and conc, attn/area/<group>:
        portraitbooth_core.ecac.health.summarize)."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        # [sum, count] per term in a fixed order, plus a non-finite flag: one all-reduce of
        # the same size on every rank, whichever terms its micro-batches produced.
        stats = torch.zeros(len(LOGGED_TERMS), 2, dtype=torch.float64)
        # The attention health's sums (portraitbooth_core.ecac.health), summed the same way;
        # empty when L_loc is off (its maps are what it reads).
        health = torch.zeros(self.module.health_size, dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            batch = self.stream.get(self.step, micro).to(self.dist.device, non_blocking=True)
            positions = batch.positions
            last = micro == cfg.grad_accum - 1
            sync = self.ddp.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with sync, micro_batch_rng(cfg.seed, positions[0], self.dist.device):
                terms = self.ddp(batch)
                self.scaler.scale(terms["total"] / cfg.grad_accum).backward()
            unknown = sorted(set(terms) - set(LOGGED_TERMS))
            if unknown:
                raise RuntimeError(f"the training step returned loss terms {unknown} that trainer.LOGGED_TERMS "
                                   f"does not list; add them there (the per-step all-reduce has a fixed layout)")
            present = [i for i, k in enumerate(LOGGED_TERMS) if k in terms]
            values = torch.stack([terms[LOGGED_TERMS[i]].detach().float() for i in present])
            attn = self.module.health if health.numel() else None
            if attn is not None:  # read with the terms: the health costs no device sync of its own
                values = torch.cat([values, attn.flatten().to(values)])
            values = values.cpu().double()
            stats[present, 0] += values[:len(present)]  # one device sync per micro-batch, not one per term
            stats[present, 1] += 1
            if attn is not None:
                health += values[len(present):]
        self.scaler.unscale_(self.optimizer)  # fp16: true gradients for the check and the clipping
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        # DDP has already averaged the gradients, so their check agrees on every rank; the
        # losses are local: a flag's sum over ranks is 0 only if every rank is finite.
        loss_ok = bool(torch.isfinite(stats[:, 0]).all())
        grads_ok = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        flags = torch.tensor([0.0 if loss_ok else 1.0, 0.0 if grads_ok else 1.0], dtype=torch.float64)
        reduced = D.all_sum(torch.cat([stats.flatten(), health, flags]), self.dist)
        totals = reduced[:stats.numel()].view(len(LOGGED_TERMS), 2)
        sums = {k: float(s / n) for k, (s, n) in zip(LOGGED_TERMS, totals.tolist()) if n > 0}
        sums["id_batches"] = int(totals[LOGGED_TERMS.index("id"), 1])
        if health.numel():
            sums.update(summarize(reduced[stats.numel():stats.numel() + health.numel()], self.module.health_groups))
        loss_ok, grads_ok = float(reduced[-2]) == 0, float(reduced[-1]) == 0
        if self.scaler.is_enabled():
            sums["loss_scale"] = float(self.scaler.get_scale())
        if loss_ok and grads_ok:
            if cfg.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
                sums["grad_norm"] = float(norm)
            self.scaler.step(self.optimizer)  # optimizer.step(); the scaler knows these gradients are finite
            if self.ema is not None:
                self.ema.update()
        elif loss_ok and self.scaler.is_enabled():
            # fp16 loss scaling overflowed: routine while the scale settles, not a bad step.
            # update() below lowers the scale; this step's data is consumed as in a skip.
            self.optimizer.zero_grad(set_to_none=True)
            log.info("step %d: fp16 loss scale %g overflowed; lowering it", self.step, sums["loss_scale"])
            sums["scale_overflow"] = 1.0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps.append({"step": self.step, "terms": {k: repr(v) for k, v in sums.items()}})
            log.warning("step %d skipped: non-finite loss or gradient %s", self.step, sums)
            sums["skipped"] = 1.0
        self.scaler.update()  # fp16: lower the scale after an overflow, raise it after a quiet run
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
        export_path or <output>/<export_name>. The progress bar runs on rank 0 of an
        interactive run without a callback (metrics.Progress)."""
        from .export import export

        cfg = self.config
        self.ddp.train()
        if cfg.init_unet or cfg.stage0_steps > 0:  # FastComposer warm start: records, stage 0 on a fresh run
            from .stage0 import before_training

            before_training(self, progress=self.dist.main and callback is None and interactive())
        bar = Progress(cfg.steps, self.step, self.global_batch,
                       enabled=self.dist.main and callback is None and interactive())
        try:
            try:
                self._run(callback, bar)
            finally:
                bar.close()
            return export(self, export_path) if self.dist.main else None
        finally:
            self.metrics.close()

    def _run(self, callback, bar: Progress) -> None:
        from .export import export
        from .validate import write_validation

        cfg = self.config
        while self.step < cfg.steps:
            start = time.perf_counter()
            values = self.train_step()  # already reduced over ranks
            values["lr"] = self.scheduler.get_last_lr()[0]
            values["step_s"] = time.perf_counter() - start
            values["images_s"] = self.global_batch / max(values["step_s"], 1e-9)
            bar.update(self.step, values)
            logged = self.step % cfg.log_every == 0 or self.step == cfg.steps
            alarms = self.watch(values) if logged else []
            if logged:
                self.metrics.log(self.step, values)
            if alarms and cfg.on_collapse == "stop":
                path = self.save()  # every rank read the same reduced numbers: all stop here
                raise H.TrainingCollapsedError(H.stop_text(alarms, cfg, path, self.step))
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
            if self.dist.main and cfg.validate_every and self.step % cfg.validate_every == 0:
                write_validation(self.out, self.step, self)
            if self.dist.main and cfg.export_every and self.step % cfg.export_every == 0:
                export(self, self.out / f"step-{self.step:08d}-{cfg.export_name}")
            if callback is not None:
                callback(self.step, cfg.steps, values)

    def watch(self, values: dict) -> list[CollapseAlarm]:
        """The collapse alarm on one logged step's values (train_step's, reduced over ranks):
        the alarms that fire now, each logged as a warning and its text put in `values`
        (metrics.jsonl's `alarm`)."""
        alarms = self.collapse.observe(self.step, values)
        if alarms:
            texts = [H.alarm_text(a, self.config) for a in alarms]
            for text in texts:
                if self.dist.main:
                    log.warning("%s", text)
            values[H.ALARM_KEY] = " ".join(texts)
        return alarms

    def close(self) -> None:
        self.stream.close()
        self.reader.close()
        if self.models.lora is not None:
            self.models.lora.detach()
