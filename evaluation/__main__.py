"""Command line: `python -m evaluation {score,protocol} ...` (see evaluation/__init__.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

RECOGNIZER_CHOICES = {"auto": "auto", "dlib": "dlib (zero-download)", "arcface": "arcface (pack)"}


def _scoring_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--recognizer", choices=list(RECOGNIZER_CHOICES), default="auto",
                   help="face recognizer for the identity score: arcface (needs --pack), dlib (zero-download); "
                        "auto: arcface when --pack is given, else dlib")
    g.add_argument("--pack", help="insightface pack folder (e.g. models/insightface/models/antelopev2)")
    g.add_argument("--provider", default="auto", help="onnxruntime device: auto, cpu, cuda")
    from portraitbooth_core.face.types import DEFAULT_DET_THRESHOLD  # here: importing the CLI stays light

    g.add_argument("--det-threshold", type=float, default=DEFAULT_DET_THRESHOLD,
                   help="face detection confidence (default: Analyze Faces', insightface's)")
    g.add_argument("--clip", help="local CLIP ViT-L/14: a Hugging Face folder or a .safetensors file; enables "
                                  "CLIP-T and the expression coefficient (never downloaded)")
    g.add_argument("--clip-tokenizer", help="folder with the CLIP vocab.json + merges.txt (default: beside "
                                            "--clip, else ComfyUI's SD1.5 tokenizer, which is CLIP's)")
    g.add_argument("--device", default="cpu", help="torch device for CLIP")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score generated images against reference subjects")
    s.add_argument("--references", required=True, type=Path, help="photos: one file or subfolder per subject")
    s.add_argument("--images", required=True, type=Path, help="generated images (see evaluation.score)")
    s.add_argument("--out", required=True, type=Path, help="folder for scores.json, scores.md, contact sheets")
    _scoring_options(s)
    r = sub.add_parser("protocol", help="FastComposer's protocol: generate through ComfyUI, then score")
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="URL of a running ComfyUI with this pack")
    where.add_argument("--start", action="store_true", help="start this machine's ComfyUI for the run")
    r.add_argument("--cpu", action="store_true", help="with --start: run ComfyUI on the CPU")
    r.add_argument("--subjects", required=True, type=Path, help="reference photos, one file or subfolder per "
                   "subject; an optional subjects.json maps subject -> class word")
    r.add_argument("--checkpoint", required=True, help="SD1.5 checkpoint name in ComfyUI's models/checkpoints")
    r.add_argument("--weights", required=True, help="PortraitBooth file name in models/portraitbooth")
    r.add_argument("--images-per-prompt", type=int, default=4)
    r.add_argument("--prompts", default="accessory,style,action,context", help="comma-separated categories")
    r.add_argument("--per-category", type=int, help="only the first N prompts of each category (quick runs)")
    r.add_argument("--multi", action="store_true", help="two subjects per image (the two-subject workflow)")
    r.add_argument("--class-word", default="person", help="class word of subjects not in subjects.json")
    r.add_argument("--size", type=int, default=512)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--cfg", type=float, default=5.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--face-pack", default="none (zero-download RetinaFace)",
                   help="the generation FaceEncoder's pack (the one the weights were trained with)")
    r.add_argument("--face-recognizer", default="auto", help="the generation FaceEncoder's recognizer")
    r.add_argument("--out", required=True, type=Path, help="images/ and the report go here")
    _scoring_options(r)
    return p.parse_args(argv)


def _encoder(args):
    from portraitbooth_core.face import build_encoder

    return build_encoder(args.pack, recognizer=RECOGNIZER_CHOICES[args.recognizer], provider=args.provider)


def _clip(args):
    if not args.clip:
        return None
    from .clip_score import TOKENIZER_FILES, load_clip

    tokenizer = args.clip_tokenizer
    weights = Path(args.clip)
    folder = weights if weights.is_dir() else weights.parent
    if tokenizer is None and not all((folder / f).is_file() for f in TOKENIZER_FILES):
        try:
            from headless.comfyui import comfyui_dir

            tokenizer = comfyui_dir() / "comfy" / "sd1_tokenizer"
        except RuntimeError:
            pass  # load_clip names the folder it searched
    return load_clip(args.clip, tokenizer, args.device)


def _score(args, images: Path) -> int:
    from .report import write_report
    from .score import score_folder, stderr_log

    refs = args.references if args.command == "score" else args.subjects
    result = score_folder(refs, images, _encoder(args), _clip(args), args.det_threshold, log=stderr_log)
    paths = write_report(result, images, args.out)
    overall = result["by_category"]["all"]
    print(f"identity {overall['identity']:.3f} over {overall['images']} images "
          f"(faces found in {overall['face_rate']:.0%})"
          + (f", CLIP-T {overall['clip_text']:.3f}" if overall["clip_text"] is not None else ""))
    for key in ("json", "markdown"):
        print(paths[key])
    for sheet in paths["sheets"]:
        print(sheet)
    return 0


def _protocol(args) -> int:
    from .prompts import select_prompts
    from .protocol import ProtocolSettings, run_protocol
    from .score import stderr_log

    settings = ProtocolSettings(
        checkpoint=args.checkpoint, weights=args.weights,
        prompts=select_prompts([c.strip() for c in args.prompts.split(",") if c.strip()], args.per_category),
        images_per_prompt=args.images_per_prompt, multi=args.multi, size=args.size, steps=args.steps,
        cfg=args.cfg, seed=args.seed, class_word=args.class_word, face_pack=args.face_pack,
        face_recognizer=args.face_recognizer)
    if args.clip and not Path(args.clip).exists():  # fail before hours of generation, not after
        raise FileNotFoundError(f"No CLIP weights at {args.clip}; nothing is downloaded. Fix --clip or leave it out.")
    images = args.out / "images"
    if args.server:
        from headless.client import ComfyClient

        run_protocol(ComfyClient(args.server), args.subjects, images, settings, log=stderr_log)
    else:
        from headless.server import ComfyServer

        with ComfyServer(cpu=args.cpu) as server:
            stderr_log(f"[protocol] ComfyUI started at {server.url} (log: {server.log_path})")
            run_protocol(server.client, args.subjects, images, settings, log=stderr_log)
    return _score(args, images)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "score":
        return _score(args, args.images)
    return _protocol(args)


def cli() -> int:
    """main() for the console: the user's mistakes as one line, not a traceback."""
    from portraitbooth_core.face import FaceAnalysisError

    try:
        return main()
    except (FileNotFoundError, ValueError, FaceAnalysisError) as exc:  # ClipWeightsError is a FileNotFoundError
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
