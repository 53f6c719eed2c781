"""Headless identity-conditioned generation through ComfyUI's HTTP API (the README's
"run" command).

Starts a ComfyUI with this pack (or talks to one given by --server), uploads the
reference photo, runs the shipped single-subject workflow and writes the PNGs.
It uses the user's SD1.5 checkpoint, PortraitBooth weights and the face pack those
weights were trained with. When any is missing it says which file goes where and
runs a clearly labelled SMOKE run on generated stand-ins, so the whole path is still
exercised.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .client import ComfyClient
from .comfyui import comfyui_dir, photos_dir
from .workflows import load_api_workflow, with_inputs

WORKFLOW = "portraitbooth_single_subject"
SMOKE_CHECKPOINT = "portraitbooth_smoke_sd15.safetensors"
SMOKE_WEIGHTS = "portraitbooth_smoke.safetensors"
# Files the tests and smoke runs build never count as the user's own models.
STANDINS = {SMOKE_CHECKPOINT, SMOKE_WEIGHTS, "portraitbooth_test_sd15.safetensors"}
NO_PACK = "none (zero-download RetinaFace)"
DEFAULT_PHOTO = "astronaut.png"  # public domain (NASA), from scikit-image's wheel


@dataclass
class Plan:
    checkpoint: str | None = None
    weights: str | None = None
    pack: str = NO_PACK
    recognizer: str = "auto"
    missing: list[str] = field(default_factory=list)

    @property
    def smoke(self) -> bool:
        return bool(self.missing)


def find_sd15_checkpoint(checkpoints: Path) -> str | None:
    from portraitbooth_core.weights.family import checkpoint_family

    for path in sorted(checkpoints.rglob("*.safetensors")):
        if path.name in STANDINS:
            continue
        try:
            if checkpoint_family(path) == "sd15":
                return str(path.relative_to(checkpoints))
        except ValueError:
            continue
    return None


def plan_models(models: Path, checkpoint: str | None = None, weights: str | None = None) -> Plan:
    """Which of the user's files to use, and a sentence for each one that is missing."""
    from portraitbooth_core.weights.file import read_info
    from portraitbooth_core.weights.meta import WeightFileError

    plan = Plan(checkpoint=checkpoint or find_sd15_checkpoint(models / "checkpoints"))
    if plan.checkpoint is None:
        plan.missing.append(f"an SD1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors) in {models / 'checkpoints'}")
    folder = models / "portraitbooth"
    candidates = [weights] if weights else sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*.safetensors") if p.name not in STANDINS)
    for name in candidates:
        try:
            info, _ = read_info(folder / name)
        except WeightFileError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        plan.weights = name
        family, _, model = info.face_encoder.kind.partition(":")
        if family == "arcface":
            pack = model.split("/")[0] if "/" in model else ""
            if not pack or not (models / "insightface" / "models" / pack).is_dir():
                plan.missing.append(f"the face pack {pack or '(unnamed)'} that {name} was trained with, in "
                                    f"{models / 'insightface' / 'models' / (pack or '<pack>')}/ (its *.onnx files)")
            plan.pack, plan.recognizer = pack or NO_PACK, "arcface (pack)"
        else:
            plan.recognizer = "dlib (zero-download)"
        break
    if plan.weights is None:
        plan.missing.append(f"PortraitBooth weights (*.safetensors, trained with `python -m training`) in {folder}")
    return plan


def make_smoke_models(models: Path) -> Plan:
    """Random-weight stand-ins in the real formats: an SD1.5 checkpoint and a projector."""
    from .comfyui import import_comfyui

    import_comfyui(cpu=True)
    from standins.sd15 import build_portraitbooth_file, build_sd15_checkpoint

    build_sd15_checkpoint(models / "checkpoints" / SMOKE_CHECKPOINT)
    build_portraitbooth_file(models / "portraitbooth" / SMOKE_WEIGHTS)
    return Plan(SMOKE_CHECKPOINT, SMOKE_WEIGHTS, NO_PACK, "dlib (zero-download)")


def build_graph(plan: Plan, photo_name: str, args: argparse.Namespace, smoke: bool) -> dict:
    size = args.size or (64 if smoke else 512)
    return with_inputs(load_api_workflow(WORKFLOW), {
        "1": {"ckpt_name": plan.checkpoint},
        "2": {"portraitbooth_name": plan.weights},
        "3": {"image": photo_name},
        "4": {"pack": plan.pack, "recognizer": plan.recognizer},
        "6": {"text": args.prompt},
        "7": {"text": args.negative},
        "8": {"width": size, "height": size, "batch_size": args.batch},
        "9": {"seed": args.seed, "steps": args.steps or (4 if smoke else 50), "cfg": args.cfg},
        "11": {"filename_prefix": "smoke" if smoke else "portraitbooth"},
    })


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate", description="Identity-preserving portraits, headless.")
    p.add_argument("--face", help=f"reference photo (default: the public-domain {DEFAULT_PHOTO})")
    p.add_argument("--prompt", default="a portrait photo of a woman smiling, natural light, 85mm",
                   help="must name the subject with a class word (man, woman, ...)")
    p.add_argument("--negative", default="blurry, lowres, deformed, bad anatomy")
    p.add_argument("--checkpoint", help="file in models/checkpoints (default: the first SD1.5 found)")
    p.add_argument("--weights", help="file in models/portraitbooth (default: the first valid one)")
    p.add_argument("--steps", type=int, help="default 50, as the paper (4 in a smoke run)")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--size", type=int, help="width = height in pixels; default 512 (64 in a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default="out", help="folder for the PNGs")
    p.add_argument("--server", help="URL of a running ComfyUI to use instead of starting one")
    p.add_argument("--smoke", action="store_true", help="use random-weight stand-ins even if models exist")
    p.add_argument("--no-smoke", action="store_true", help="fail instead of a smoke run when models are missing")
    p.add_argument("--cpu", action="store_true", help="run the started ComfyUI on the CPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = comfyui_dir() / "models"
    plan = Plan(missing=["--smoke was given"]) if args.smoke else plan_models(models, args.checkpoint, args.weights)
    if plan.smoke and not args.smoke:
        print("Missing for real portraits:\n" + "\n".join(f"  - {m}" for m in plan.missing), file=sys.stderr)
        if args.no_smoke:
            return 2
    smoke = plan.smoke
    if smoke:
        if args.server:
            print("A smoke run writes stand-ins into this machine's ComfyUI; run it without --server.",
                  file=sys.stderr)
            return 2
        print("SMOKE RUN: random-weight stand-in models; the images are noise, not portraits.", file=sys.stderr)
        plan = make_smoke_models(models)
    face = Path(args.face) if args.face else photos_dir() / DEFAULT_PHOTO
    if not face.is_file():
        print(f"Reference photo not found: {face}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.server:
        return _run(ComfyClient(args.server), plan, face, args, out, smoke=False)
    from .server import ComfyServer

    import torch

    with ComfyServer(cpu=smoke or args.cpu or not torch.cuda.is_available()) as server:
        print(f"ComfyUI started at {server.url} (log: {server.log_path})", file=sys.stderr)
        return _run(server.client, plan, face, args, out, smoke=smoke)


def _run(client: ComfyClient, plan: Plan, face: Path, args, out: Path, smoke: bool) -> int:
    photo = client.upload_image(face)
    result = client.run(build_graph(plan, photo, args, smoke), timeout=3600)
    for i, file in enumerate(result.images("11")):
        path = out / f"{result.prompt_id[:8]}_{i:02d}_{file['filename']}"
        path.write_bytes(client.fetch(file))
        print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
