"""Warm-start evidence (`python -m evidence --warm-start`): does a PortraitBooth run
started from a FastComposer-style teacher (its UNet through `init_unet`, its fused class
token through stage 0) reach the cold full run's STEA margin in at most a third of the
steps? training/models/warm_start.py and training/run/stage0.py are the code under test.

Per seed, in the ablation rows' synthetic world and from their pretrained base:
- cold: the "full" row (base UNet, fresh projector, PortraitBooth's recipe), STEA margin
  measured every plan.steps / 12 steps.
- teacher: FastComposer's recipe in this world, trained as long as the cold run from the
  same base: its postfuse projector (portraitbooth_core/stea/postfuse.py) fed the CLIP
  image embedding of the reference crop, the UNet fully fine-tuned with the noise loss and
  a localization loss on the class token's cross-attention (L_loc standing in for
  FastComposer's own localization loss), no identity loss (FastComposer has none). The
  "CLIP ViT" is a random-weight tiny one (standins' "tiny" config): like the real one a
  generic image encoder, weaker on identity than the recognizer. Written as
  import-fastcomposer writes its files (diffusion_models/, clip_vision/, portraitbooth/).
- warm: init_unet = the teacher's UNet, stage 0 (teacher projector, CLIP vision file),
  then the cold run's recipe for a third of its steps (--warm-steps).
- warm_unet_only (no stage 0) and warm_stage0_only (the base UNet with stage 0's
  projector): what each half of the warm start brings.
The teacher's own training is not counted in the warm runs' steps, as FastComposer's
training is not a PortraitBooth user's cost; the report says so beside the numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from . import measure
from .experiment import Experiment, progress_printer, world_key
from .runs import Plan

RUNS = ("cold", "teacher", "warm", "warm_unet_only", "warm_stage0_only")
LABELS = {"cold": "cold (the full row: base UNet, fresh projector)",
          "teacher": "teacher (FastComposer-style, its own CLIP embeddings)",
          "warm": "warm: teacher UNet + stage 0",
          "warm_unet_only": "warm: teacher UNet only",
          "warm_stage0_only": "warm: stage 0 only (base UNet)"}
WARM_VERSION = "2"          # bump when the teacher's recipe changes: cached teachers are rebuilt
TEACHER_SETTINGS = {"id_weight": 0.0}
TEACHER_HIDDEN = 256
STAGE0_STEPS = 500
NAME = "evidence_teacher"   # file stem, as import-fastcomposer's --name


def clip_vision_config() -> dict:
    """ComfyUI's CLIP vision config of the stand-in release's "tiny" tower (224 px, 768-d projection)."""
    from standins.fastcomposer import VISION

    return {**VISION["tiny"], "model_type": "clip_vision_model", "num_channels": 3, "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
            "torch_dtype": "float32"}


def build_clip_vision(path: Path, seed: int) -> Path:
    """A random-weight CLIP vision file in the layout and with the metadata import-fastcomposer writes."""
    from safetensors.torch import save_file

    from standins.fastcomposer import random_tensors

    from portraitbooth_core.weights.formats.fastcomposer import comfy_clip_vision_shapes

    config = clip_vision_config()
    tensors = random_tensors(comfy_clip_vision_shapes(config), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    save_file(tensors, str(tmp), metadata={"portraitbooth_import": json.dumps(
        {"part": "clip_vision", "config": config, "model": "evidence stand-in: random-weight tiny CLIP ViT"})})
    tmp.replace(path)
    return path


# The margin swings by several points from one measurement to the next while a run trains
# (lr 1e-3 on a small UNet), so runs are compared on the mean of the last WINDOW
# measurements (every plan.steps / 24 steps: a window of 50 steps at the default 600).
WINDOW = 3


def smoothed(margins: dict) -> dict[str, float]:
    """step -> mean of the measurements at that step and the WINDOW - 1 before it."""
    steps = sorted(int(s) for s in margins)
    out = {}
    for i, step in enumerate(steps):
        window = [margins[str(t)] for t in steps[max(0, i - WINDOW + 1):i + 1]]
        out[str(step)] = sum(window) / len(window)
    return out


def steps_to_reach(margins: dict, target: float) -> int | None:
    """The first measured step whose smoothed STEA margin is at or above target (None: never)."""
    hits = [int(s) for s, m in smoothed(margins).items() if m >= target]
    return min(hits) if hits else None


class WarmStart:
    """The warm-start runs of one seed: Experiment's world and base, plus the CLIP vision
    file, the teacher's dataset (CLIP embeddings) and the teacher's files."""

    def __init__(self, plan: Plan, work: Path, warm_steps: int | None = None):
        from portraitbooth_core.weights.formats.fastcomposer import output_paths

        self.plan, self.exp = plan, Experiment(plan, work)
        fields = {"world": world_key(plan), "plan": dataclasses.asdict(plan), "version": WARM_VERSION,
                  "teacher": TEACHER_SETTINGS, "hidden": TEACHER_HIDDEN}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.root = Path(work) / f"warm-{key}"
        self.files = output_paths(self.root / "models", NAME)   # unet, clip_vision, portraitbooth
        self.data_clip = self.root / "data_clip"
        self.warm_steps = warm_steps or max(1, plan.steps // 3)

    def prepare(self) -> None:
        """The CLIP vision file and the teacher's dataset, once (the stamp is written last)."""
        stamp = self.root / "prepared.json"
        if stamp.is_file():
            return
        from . import dataset
        from training.models.warm_start import clip_embeddings, load_clip_vision

        build_clip_vision(self.files["clip_vision"], self.plan.seed + 11)
        vision = load_clip_vision(self.files["clip_vision"])
        clip = clip_embeddings(vision, [s.reference for s in self.exp.samples]).numpy()
        dataset.write_dataset(self.exp.samples, self.data_clip, self.exp.recognizer_path, self.plan.resolution,
                              embeddings=list(clip),
                              face_encoder={"kind": "clip_vision:vit-l-14", "dim": int(clip.shape[1]),
                                            "feature": "image_embeds"},
                              checkpoint=self.exp.checkpoint)
        stamp.write_text(json.dumps({"clip_dim": int(clip.shape[1])}))

    def _clip_batches(self):
        """The STEA held-out batch with the teacher's inputs: CLIP embeddings of the same
        references (own and another identity's)."""
        from training.models.warm_start import clip_embeddings, load_clip_vision

        vision = load_clip_vision(self.files["clip_vision"])
        own = clip_embeddings(vision, [s.reference for s in self.exp.held_out])
        repeat = len(self.plan.stea_timesteps)
        batch = measure.with_embeddings(self.exp.stea_batch, own.repeat(repeat, 1))
        return batch, self.exp.other_identity_embeddings(own).repeat(repeat, 1)

    def _trainer(self, name: str, steps: int, overrides: dict, base, projector=None):
        from .runs import _trainer

        overrides = dict(overrides)
        data = overrides.pop("dataset", self.exp.datasets["true"])
        return _trainer(self.plan, name, self.exp.checkpoint, data, self.root / "runs", steps,
                        {**self.plan.settings, **overrides}, base, projector)

    def run(self, name: str, progress=None) -> dict:
        plan = self.plan
        if name == "teacher":
            return self.teacher(progress)
        if name == "cold":
            trainer = self._trainer("cold", plan.steps, {}, self.exp.base(progress))
        else:
            settings = {"init_unet": str(self.files["unet"])} if name in ("warm", "warm_unet_only") else {}
            if name in ("warm", "warm_stage0_only"):
                settings |= {"stage0_steps": STAGE0_STEPS, "stage0_teacher": str(self.files["portraitbooth"])}
            base = self.exp.base(progress) if name == "warm_stage0_only" else None
            trainer = self._trainer(name, self.warm_steps, settings, base)
        every = max(1, plan.steps // 24)  # the same spacing in every run: comparable windows
        try:
            from training.run.stage0 import before_training

            before_training(trainer)  # records init_unet; stage 0 when set
            margins, history = trajectory(trainer, name, trainer.config.steps, every, self.exp.stea_batch,
                                          self.exp.shuffled, progress)
            trainer.history = history
            out = {"steps": trainer.config.steps, "margins": margins, "final": self.exp.measure(trainer)}
            if getattr(trainer, "stage0", None):
                out["stage0"] = {k: trainer.stage0[k] for k in ("steps", "samples", "held_out_rows", "before", "after",
                                                                "seconds")}
            return out
        finally:
            trainer.close()

    def teacher(self, progress=None) -> dict:
        """Train (or reuse) the teacher; its files land where import-fastcomposer puts them."""
        stamp = self.root / "teacher.json"
        if stamp.is_file():
            return json.loads(stamp.read_text())
        from safetensors.torch import save_file

        from portraitbooth_core.stea.postfuse import FastComposerPostfuse, postfuse_config
        from portraitbooth_core.weights.file import save_portraitbooth

        from portraitbooth_core.weights.formats.fastcomposer import face_encoder_spec

        self.prepare()
        torch.manual_seed(self.plan.seed + 7)
        projector = FastComposerPostfuse(postfuse_config(hidden_dim=TEACHER_HIDDEN))
        trainer = self._trainer("teacher", self.plan.steps, {**TEACHER_SETTINGS, "dataset": self.data_clip},
                                self.exp.base(progress), projector)
        try:
            batch, shuffled = self._clip_batches()
            margins, _ = trajectory(trainer, "teacher", self.plan.steps, max(1, self.plan.steps // 24), batch,
                                    shuffled, progress)
            unet = {k: v.detach().contiguous() for k, v in trainer.models.unet.state_dict().items()}
            trained = trainer.projector
        finally:
            trainer.close()
        for path in self.files.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        save_file(unet, str(self.files["unet"]), metadata={"portraitbooth_import": json.dumps(
            {"part": "unet", "base": "sd15", "layout": "comfyui", "model": "evidence teacher (FastComposer-style)"})})
        save_portraitbooth(self.files["portraitbooth"], trained, face_encoder_spec(clip_vision_config()),
                           defaults={"clip_vision": self.files["clip_vision"].name, "unet": self.files["unet"].name},
                           source={"model": "evidence teacher: FastComposer's recipe in the synthetic world "
                                            "(postfuse + CLIP image embedding, L_noise + L_loc, no L_id)"})
        result = {"steps": self.plan.steps, "margins": margins}
        stamp.write_text(json.dumps(result))
        return result


@torch.no_grad()
def _margin(trainer, batch, shuffled) -> float:
    return measure.stea_effect(trainer, batch, shuffled)["margin"]


def trajectory(trainer, name: str, steps: int, every: int, batch, shuffled, progress=None):
    """Train `steps` steps, measuring the STEA margin before step 0 and every `every` steps."""
    margins, history = {}, []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            margins[str(step)] = _margin(trainer, batch, shuffled)
            print(f"[{name}] step {step}/{steps} STEA margin {100 * margins[str(step)]:+.1f} %", file=sys.stderr,
                  flush=True)
        if step < steps:
            history.append(trainer.train_step())
            if progress is not None:
                progress(name, step + 1, steps, history[-1])
    return margins, history


def _worker(plan: Plan, work: Path, name: str, verbose: bool, warm_steps: int | None) -> dict:
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    from headless.comfyui import find_comfyui, import_comfyui

    import_comfyui(cpu=True, path=find_comfyui())
    torch.set_num_threads(1)
    return WarmStart(plan, work, warm_steps).run(name, progress_printer() if verbose else None)


def run_warm_start(plan: Plan, work: Path, jobs: int = 1, verbose: bool = False,
                   warm_steps: int | None = None) -> dict[str, dict]:
    """Every run of one seed: the world, base, CLIP vision file and teacher data first; then
    cold and teacher (at once with jobs > 1), then the warm runs (they need the teacher)."""
    ws = WarmStart(plan, work, warm_steps)
    progress = progress_printer() if verbose else None
    ws.exp.base(progress)
    ws.prepare()
    results: dict[str, dict] = {}
    for phase in (("cold", "teacher"), ("warm", "warm_unet_only", "warm_stage0_only")):
        if jobs <= 1:
            results.update({name: ws.run(name, progress) for name in phase})
            continue
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {name: pool.submit(_worker, plan, Path(work), name, verbose, warm_steps) for name in phase}
            results.update({name: f.result() for name, f in futures.items()})
    return summarize(results, ws.warm_steps)


def summarize(results: dict[str, dict], warm_steps: int) -> dict[str, dict]:
    """Adds, per run, the first step at or above the cold run's final margin, and the check.

    A cold run that ends below the STEA check's margin (report.STEA_MIN_MARGIN) has not
    learned to use the identity; the target is then that margin, which the cold run never
    reaches in its steps, so the bound is a third of its whole length."""
    from .report import STEA_MIN_MARGIN

    cold = smoothed(results["cold"]["margins"])
    final = cold[str(max(int(s) for s in cold))]
    target = max(final, STEA_MIN_MARGIN)
    for name in RUNS:
        if name in results:
            results[name]["reach"] = steps_to_reach(results[name]["margins"], target)
    reach_cold, reach_warm = results["cold"]["reach"], results["warm"]["reach"]
    bound = (reach_cold if reach_cold is not None else results["cold"]["steps"]) / 3
    results["check"] = {"target_margin": target, "cold_final_margin": final, "cold_steps": reach_cold,
                        "warm_steps": reach_warm, "bound": bound, "warm_steps_run": warm_steps, "window": WINDOW,
                        "passed": reach_warm is not None and reach_warm <= bound}
    return results


def _smoothed_at(run: dict, step: int) -> float:
    m = smoothed(run["margins"])
    return m[str(max((int(s) for s in m if int(s) <= step), default=0))]


def markdown(by_seed: dict[int, dict]) -> str:
    """Per seed (the seeds can tell different stories: the check is per seed), one row per
    run: STEA margin (%, smoothed: mean of the last WINDOW measurements) at step 0, at a
    third of the cold run's steps and at the run's end, ECAC identity concentration and
    DIP cosine at the end, and the first measured step at or above the target (the cold
    run's final margin, at least the STEA check's)."""
    tables = []
    for seed, results in by_seed.items():
        third = results["cold"]["steps"] // 3
        lines = [f"Seed {seed} (target {100 * results['check']['target_margin']:+.1f} %):", "",
                 f"| run | steps | STEA margin at step 0 | at step {third} (1/3 of cold) | at its last step "
                 f"| ECAC concentration, DIP cosine at its last step | first step at or above the target |",
                 "|---|---|---|---|---|---|---|"]
        for name in RUNS:
            r = results.get(name)
            if r is None:
                continue
            final = r.get("final")
            end = (f"{final['ecac']['identity_concentration']:.2f}x, {final['dip']['similarity']:.3f}"
                   if final else "-")
            lines.append(f"| {LABELS[name]} | {r['steps']} | {100 * _smoothed_at(r, 0):+.1f} % "
                         f"| {100 * _smoothed_at(r, third):+.1f} % | {100 * _smoothed_at(r, r['steps']):+.1f} % "
                         f"| {end} | {'-' if r.get('reach') is None else r['reach']} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def checks(by_seed: dict[int, dict]) -> dict[int, str]:
    out = {}
    for seed, r in by_seed.items():
        c = r["check"]
        warm = c["warm_steps"] if c["warm_steps"] is not None else f"> {c['warm_steps_run']} (not within its run)"
        cold = c["cold_steps"] if c["cold_steps"] is not None else "never (it ends below the STEA check's margin)"
        out[seed] = (f"warm reaches the target STEA margin ({100 * c['target_margin']:+.1f} %; cold run's final "
                     f"{100 * c['cold_final_margin']:+.1f} %) at step {warm}, cold at step {cold}: needs "
                     f"<= {c['bound']:.0f} -> {'pass' if c['passed'] else 'FAIL'}")
    return out
