"""Command line: `python -m training {build,train,export,import-fastcomposer} ...` (train under torchrun for DDP).

    python -m training build photos/ data/ --pack models/insightface/models/antelopev2
    python -m training train --config train.toml --set steps=2000 --set mode=full
    torchrun --nproc_per_node 8 -m training train --config train.toml
    python -m training export --config train.toml --out model.safetensors
    python -m training import-fastcomposer pytorch_model.bin --models ComfyUI/models
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _build(args) -> int:
    from portraitbooth_core.face import build_encoder

    from .build import BuildSettings, DatasetBuilder, format_report
    from .face_crops import CropSettings

    encoder = build_encoder(args.pack, detector=args.detector, recognizer=args.recognizer, provider=args.provider,
                            parsing_weights=args.parsing_weights)
    crops = CropSettings(args.resolution, args.crop_scale, args.det_threshold, args.min_face, args.several_faces)
    settings = BuildSettings(crops, args.caption_template, args.default_word, shard_size=args.shard_size)
    report = DatasetBuilder(args.source, args.output, encoder, settings).build()
    print(format_report(report))
    return 0 if report["samples"] else 1


def _config_overrides(args) -> list[str]:
    overrides = list(args.set or [])
    for name in ("checkpoint", "dataset", "output"):
        if getattr(args, name, None):
            overrides.append(f"{name}={json.dumps(getattr(args, name))}")
    return overrides


def _config(args):
    from .config import load_config

    return load_config(args.config, _config_overrides(args))


def _train(args) -> int:
    from . import distributed as D
    from .dip_check import IdentityLossError
    from .trainer import Trainer

    config = _config(args)
    dist = D.setup(args.device)
    try:
        try:
            trainer = Trainer(config, dist)
        except IdentityLossError as exc:  # the dataset cannot feed L_id: the fix, not a traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
        path = trainer.run()
        if path is not None:
            print(f"[train] exported {path}")
        trainer.close()
    finally:
        D.teardown(dist)
    return 0


def _export(args) -> int:
    from .checkpoint import load_latest
    from .config import apply_overrides
    from .export import export
    from .trainer import Trainer

    config = _config(args)
    found = load_latest(Path(config.output) / "checkpoints")
    if found is not None:  # the run's own settings (mode, EMA, ...), then what the command line says
        config = apply_overrides(apply_overrides(config, found[1]["config"]), _config_overrides(args)).validate()
    trainer = Trainer(config, identity_loss=False)  # exporting needs no recognizer
    if trainer.resumed_from is None:
        print(f"no checkpoint under {Path(trainer.config.output) / 'checkpoints'}", file=sys.stderr)
        return 1
    print(f"[export] {export(trainer, args.out)} (from {trainer.resumed_from})")
    return 0


def _import_fastcomposer(args) -> int:
    from .fastcomposer import FastComposerImportError, format_report, import_fastcomposer

    try:
        report = import_fastcomposer(args.path, args.models, overwrite=args.overwrite, dtype=args.dtype, name=args.name)
    except FastComposerImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a dataset (shards + index + report) from people folders")
    b.add_argument("source", help="folder of person folders (photos, videos, caption sidecars)")
    b.add_argument("output", help="dataset folder: shards, index.json, report.json")
    b.add_argument("--pack", help="insightface pack folder (SCRFD + ArcFace); default: zero-download backends")
    b.add_argument("--detector", default="auto", help="auto, scrfd (pack) or retinaface (zero-download)")
    b.add_argument("--recognizer", default="auto", help="auto, arcface (pack) or dlib (zero-download)")
    b.add_argument("--provider", default="auto", help="onnxruntime device: auto, cpu, cuda")
    b.add_argument("--parsing-weights", help="parsing_bisenet.pth; default: ellipse masks")
    b.add_argument("--resolution", type=int, default=512, help="side of the square training crops")
    b.add_argument("--crop-scale", type=float, default=3.0, help="crop side as a multiple of the face box")
    b.add_argument("--det-threshold", type=float, default=0.6, help="face detection confidence")
    b.add_argument("--min-face", type=int, default=32, help="skip faces smaller than this (pixels)")
    b.add_argument("--several-faces", choices=("skip", "largest"), default="skip",
                   help="photos with several faces: skip them, or use the largest face")
    b.add_argument("--caption-template", default="", help='e.g. "a photo of a {word}" for photos without sidecar')
    b.add_argument("--default-word", default="", help="class word for the template (or class.txt per person)")
    b.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    for name in ("train", "export"):
        t = sub.add_parser(name)
        t.add_argument("--config", help="JSON or TOML file with TrainConfig fields")
        t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
        t.add_argument("--checkpoint", help="SD1.5 checkpoint (.safetensors) to start from")
        t.add_argument("--dataset", help="folder written by `python -m training build`")
        t.add_argument("--output", help="run folder: checkpoints, logs, validation images")
        t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
        if name == "export":
            t.add_argument("--out", help="weight file path (default <output>/<export_name>)")
    f = sub.add_parser("import-fastcomposer", help="convert FastComposer's pytorch_model.bin into ComfyUI model files")
    f.add_argument("path", help="FastComposer's released pytorch_model.bin (or a .safetensors of the same dict)")
    f.add_argument("--models", required=True, help="ComfyUI's models folder: writes diffusion_models/, "
                   "clip_vision/ and portraitbooth/ under it")
    f.add_argument("--overwrite", action="store_true", help="replace files an earlier import wrote")
    f.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), default="fp16", help="UNet and CLIP vision precision")
    f.add_argument("--name", default="fastcomposer", help="file name stem of the written files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .comfy_env import import_comfyui

    import_comfyui(cpu=True if getattr(args, "device", "auto") == "cpu" else None)
    return {"build": _build, "train": _train, "export": _export,
            "import-fastcomposer": _import_fastcomposer}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
