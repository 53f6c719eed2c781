"""One evidence experiment: the generated world (checkpoint, recognizer, identities,
training shards, held-out samples) shared by every run, and each run's measurements."""
from __future__ import annotations

from pathlib import Path

import torch

from . import dataset, measure, world
from .runs import Plan, train


class Experiment:
    def __init__(self, plan: Plan, work: Path):
        self.plan, self.work = plan, Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.checkpoint = world.build_checkpoint(self.work / "evidence_sd15.safetensors", plan.seed)
        self.recognizer_path = world.build_recognizer_onnx(self.work / "evidence_recognizer.onnx", plan.seed)
        self.recognizer = dataset.Recognizer(self.recognizer_path)
        identities = world.make_identities(plan.identities, plan.seed)
        r = plan.resolution
        samples = dataset.make_samples(identities, plan.train_per_identity, r, plan.seed + 1, self.recognizer)
        self.held_out = dataset.make_samples(identities, plan.held_out_per_identity, r, plan.seed + 2,
                                             self.recognizer)
        self.datasets = {
            "true": dataset.write_dataset(samples, self.work / "data_true", self.recognizer_path, r),
            "uninformative": dataset.write_dataset(samples, self.work / "data_uninformative", self.recognizer_path,
                                                   r, dataset.uninformative_embeddings(samples, plan.seed + 3)),
        }
        latent = (r // 8, r // 8)
        self.stea_batch = dataset.held_out_batch(self.held_out, list(plan.stea_timesteps), plan.seed + 4, latent)
        self.dip_batch = dataset.held_out_batch(self.held_out, list(plan.dip_timesteps), plan.seed + 5, latent)
        self.shuffled = self.other_identity_embeddings().repeat(len(plan.stea_timesteps), 1)

    def other_identity_embeddings(self) -> torch.Tensor:
        """For held-out sample i of identity k, the embedding of the same-numbered sample
        of identity k+1: always a wrong identity, never the sample's own."""
        by_identity: dict[int, list] = {}
        for s in self.held_out:
            by_identity.setdefault(s.identity, []).append(s)
        count = len(by_identity)
        out, seen = [], {}
        for s in self.held_out:
            j = seen.get(s.identity, 0)
            seen[s.identity] = j + 1
            other = by_identity[(s.identity + 1) % count]
            out.append(torch.from_numpy(other[j % len(other)].embedding))
        return torch.stack(out)

    def run(self, name: str, progress=None) -> dict:
        trainer = train(self.plan, name, self.checkpoint, self.datasets, self.work / "runs", progress)
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
                "train_tail": {k: sum(h.get(k, 0.0) for h in tail) / len(tail) for k in ("noise", "loc", "id")}}
