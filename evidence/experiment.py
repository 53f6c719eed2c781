"""One evidence experiment: the generated world (checkpoint, recognizer, identities,
training shards, held-out samples, pretrained base) shared by every run, and each run's
measurements. `run_all` trains the runs one after another or in worker processes."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import torch

from . import dataset, measure, world
from .runs import Plan, pretrain, train

WORLD_FIELDS = ("seed", "resolution", "identities", "train_per_identity", "held_out_per_identity")


def world_key(plan: Plan) -> str:
    fields = {k: getattr(plan, k) for k in WORLD_FIELDS}
    fields["precomputed"] = True  # worlds written before the datasets carried precomputed inputs are rebuilt
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class Experiment:
    def __init__(self, plan: Plan, work: Path):
        """Builds the world's files in `work`, or reuses them when a previous Experiment
        of the same world finished writing them (the stamp is written last)."""
        self.plan, self.work = plan, Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        stamp = self.work / "world.json"
        built = stamp.is_file() and json.loads(stamp.read_text()).get("key") == world_key(plan)
        self.checkpoint = self.work / "evidence_sd15.safetensors"
        self.recognizer_path = self.work / "evidence_recognizer.onnx"
        if not built:
            stamp.unlink(missing_ok=True)
            world.build_checkpoint(self.checkpoint, plan.seed)
            world.build_recognizer_onnx(self.recognizer_path, plan.seed)
        self.recognizer = dataset.Recognizer(self.recognizer_path)
        identities = world.make_identities(plan.identities, plan.seed)
        r = plan.resolution
        samples = dataset.make_samples(identities, plan.train_per_identity, r, plan.seed + 1, self.recognizer)
        self.samples = samples  # the warm-start evidence encodes their references with its CLIP vision model
        self.held_out = dataset.make_samples(identities, plan.held_out_per_identity, r, plan.seed + 2,
                                             self.recognizer)
        self.datasets = {"true": self.work / "data_true", "uninformative": self.work / "data_uninformative"}
        if not built:
            dataset.write_dataset(samples, self.datasets["true"], self.recognizer_path, r, checkpoint=self.checkpoint)
            dataset.write_dataset(samples, self.datasets["uninformative"], self.recognizer_path, r,
                                  dataset.uninformative_embeddings(samples, plan.seed + 3), checkpoint=self.checkpoint)
            stamp.write_text(json.dumps({"key": world_key(plan)}))
        latent = (r // 8, r // 8)
        self.stea_batch = dataset.held_out_batch(self.held_out, list(plan.stea_timesteps), plan.seed + 4, latent)
        self.dip_batch = dataset.held_out_batch(self.held_out, list(plan.dip_timesteps), plan.seed + 5, latent)
        self.shuffled = self.other_identity_embeddings().repeat(len(plan.stea_timesteps), 1)

    def other_identity_embeddings(self, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """For held-out sample i of identity k, the embedding of the same-numbered sample
        of identity k+1: always a wrong identity, never the sample's own. embeddings: one
        row per held-out sample to draw from instead of the recognizer's (the warm-start
        teacher's CLIP image embeddings)."""
        by_identity: dict[int, list] = {}
        for s in self.held_out:
            by_identity.setdefault(s.identity, []).append(s)
        count = len(by_identity)
        out, seen = [], {}
        for s in self.held_out:
            j = seen.get(s.identity, 0)
            seen[s.identity] = j + 1
            other = by_identity[(s.identity + 1) % count]
            pick = other[j % len(other)]
            out.append(torch.from_numpy(pick.embedding) if embeddings is None
                       else embeddings[next(i for i, h in enumerate(self.held_out) if h is pick)])
        return torch.stack(out)

    def base(self, progress=None) -> Path | None:
        if not hasattr(self, "_base"):
            self._base = pretrain(self.plan, self.checkpoint, self.datasets["true"], self.work, progress)
        return self._base

    def run(self, name: str, progress=None) -> dict:
        trainer = train(self.plan, name, self.checkpoint, self.datasets, self.work / "runs", progress,
                        self.base(progress))
        try:
            return self.measure(trainer)
        finally:
            trainer.close()

    def measure(self, trainer) -> dict:
        history = trainer.history
        tail = history[-max(1, len(history) // 5):]
        return {"stea": measure.stea_effect(trainer, self.stea_batch, self.shuffled),
                "ecac": measure.ecac_effect(trainer, self.stea_batch),
                "dip": measure.dip_effect(trainer, self.dip_batch, self.recognizer.net),
                "train_tail": {k: sum(h.get(k, 0.0) for h in tail) / len(tail) for k in ("noise", "loc", "id")},
                # the collapse alarm's view of training (runs._steps): its alarms, and the attention
                # health of every 10th step (the identity/expression tokens' attention in the face)
                "alarms": list(getattr(trainer, "alarms", [])),
                "health_trace": [{"step": i + 1, **{k: v for k, v in h.items() if k.startswith("attn/")}}
                                 for i, h in enumerate(history) if (i + 1) % 10 == 0 or i + 1 == len(history)]}


def _worker(plan: Plan, work: Path, name: str, verbose: bool) -> dict:
    """One run in a worker process (spawned: a fresh interpreter with ComfyUI on the path)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from headless.comfyui import find_comfyui, import_comfyui

    import_comfyui(cpu=True, path=find_comfyui())
    torch.set_num_threads(1)
    return Experiment(plan, work).run(name, progress_printer() if verbose else None)


def progress_printer(every: int = 100) -> Callable:
    def progress(name: str, step: int, total: int, values: dict) -> None:
        if step % every == 0 or step == total:
            from training.run.health import compact

            terms = " ".join(f"{k}={v:.4f}" for k, v in values.items() if k in ("noise", "loc", "id"))
            attn = compact(values)
            print(f"[{name}] step {step}/{total} {terms}{' | attn in face: ' + attn if attn else ''}",
                  file=sys.stderr, flush=True)
    return progress


def run_all(plan: Plan, names: list[str], work: Path, jobs: int = 1, verbose: bool = False) -> dict[str, dict]:
    """Every named run's metrics. The world and the base are built here first; with
    jobs > 1 the runs then train in that many processes of one thread each (the runs are
    independent and a small UNet on one thread is as fast as on two)."""
    experiment = Experiment(plan, work)
    experiment.base(progress_printer() if verbose else None)
    if jobs <= 1:
        return {name: experiment.run(name, progress_printer() if verbose else None) for name in names}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {name: pool.submit(_worker, plan, Path(work), name, verbose) for name in names}
        return {name: future.result() for name, future in futures.items()}
