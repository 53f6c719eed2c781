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
                   help="face detection confidence (default: Analyze Faces', insightface's); pack metric only, "
                        "facenet uses FastComposer's MTCNN thresholds 0.6/0.7/0.7")
    g.add_argument("--clip", help="local CLIP ViT-L/14: a Hugging Face folder or a .safetensors file; enables "
                                  "CLIP-T and the expression coefficient (never downloaded)")
    g.add_argument("--clip-tokenizer", help="folder with the CLIP vocab.json + merges.txt (default: beside "
                                            "--clip, else ComfyUI's SD1.5 tokenizer, which is CLIP's)")
    g.add_argument("--device", default="cpu", help="torch device for CLIP and the facenet identity metric")
    g.add_argument("--identity-metric", choices=["pack", "facenet"], default="pack",
                   help="identity score: pack = this pack's recognizer (--recognizer/--pack); facenet = the paper's, "
                        "FastComposer's MTCNN + FaceNet (InceptionResnetV1, VGGFace2): needs --facenet-weights and "
                        "`pip install --no-deps facenet-pytorch==2.6.0`")
    g.add_argument("--facenet-weights", type=Path,
                   help="with --identity-metric facenet: InceptionResnetV1 VGGFace2 weights, "
                        "20180402-114759-vggface2.pt from facenet-pytorch's GitHub releases (.pt state dict or "
                        ".safetensors; never downloaded)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score generated images against reference subjects")
    s.add_argument("--references", required=True, type=Path, help="photos: one file or subfolder per subject")
    s.add_argument("--images", required=True, type=Path, help="generated images (see evaluation.score)")
    s.add_argument("--out", required=True, type=Path, help="folder for scores.json, scores.md, contact sheets")
    _scoring_options(s)
    r = sub.add_parser("protocol", help="FastComposer's protocol: generate through ComfyUI for every weight file, "
                                        "then score and write the paper's table")
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", action="append", metavar="URL",
                       help="URL of a running ComfyUI with this pack; repeat it to share one queue over several "
                            "servers (each needs the same models)")
    where.add_argument("--start", type=_positive, nargs="?", const=1, metavar="N",
                       help="start N ComfyUI servers of this machine for the run (default 1)")
    r.add_argument("--cpu", action="store_true", help="with --start: run ComfyUI on the CPU")
    r.add_argument("--subjects", required=True, type=Path, help="reference photos, one file or subfolder per "
                   "subject (the first photo is the reference); an optional subjects.json maps subject -> class word")
    r.add_argument("--weights", required=True, action="append",
                   help="a file in ComfyUI's models/portraitbooth; repeat it to compare methods. Its kind picks the "
                        "method and template: PortraitBooth, FastComposer (imported), PhotoMaker v1/v2 (imported)")
    r.add_argument("--checkpoint", help="SD1.5 checkpoint name in models/checkpoints (PortraitBooth, FastComposer)")
    r.add_argument("--sdxl-checkpoint", help="SDXL checkpoint name in models/checkpoints (PhotoMaker)")
    r.add_argument("--setting", choices=["single", "multi", "both"], default="single",
                   help="one subject per image, every pair of subjects per image (the paper's 105 pairs for 15 "
                        "subjects, 21 prompts), or both")
    r.add_argument("--multi", action="store_true", help="the same as --setting multi")
    r.add_argument("--pairs", type=_positive, help="multi: only the first N pairs (spread over the subjects; quick runs)")
    r.add_argument("--images-per-prompt", type=_positive, default=4)
    r.add_argument("--prompts", help="comma-separated categories (single: accessory,style,action,context, the "
                                     "default, and expression; multi: action,context,style)")
    r.add_argument("--per-category", type=_positive, help="only the first N prompts of each category (quick runs)")
    r.add_argument("--class-word", default="person", help="class word of subjects not in subjects.json")
    r.add_argument("--size", type=_positive, help="image height in pixels (default: the template's, 512 SD1.5, "
                                                  "1024 SDXL; two-subject images keep the template's aspect)")
    r.add_argument("--steps", type=_positive, default=50, help="sampling steps (the paper: 50, Euler)")
    r.add_argument("--cfg", type=float, help="guidance scale (default: the weight file's, else the template's; "
                                             "the paper: 5)")
    r.add_argument("--start-percent", type=float, help="identity from this fraction of the steps on (default: the "
                                                       "weight file's delayed start)")
    r.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    r.add_argument("--negative", help="negative prompt (default: each template's)")
    r.add_argument("--face-pack", help="the generation FaceEncoder's pack (default: the template's: zero-download "
                                       "for PortraitBooth, buffalo_l for PhotoMaker v2)")
    r.add_argument("--face-recognizer", help="the generation FaceEncoder's recognizer (default: the template's)")
    r.add_argument("--out", required=True, type=Path,
                   help="<weights>/<setting>/images, scores and report.md/report.csv go here")
    _scoring_options(r)
    return p.parse_args(argv)


def _check_identity_metric(args) -> None:
    """Refuse --identity-metric / --facenet-weights that contradict each other (before any work)."""
    if args.identity_metric == "facenet" and args.facenet_weights is None:
        raise ValueError("--identity-metric facenet needs --facenet-weights PATH: the InceptionResnetV1 VGGFace2 "
                         "weights (20180402-114759-vggface2.pt from https://github.com/timesler/facenet-pytorch/"
                         "releases); nothing is downloaded")
    if args.identity_metric != "facenet" and args.facenet_weights is not None:
        raise ValueError("--facenet-weights is used only with --identity-metric facenet; add that option, or drop "
                         "--facenet-weights to score with the pack's recognizer")


def _encoder(args):
    """The identity metric: the pack's FaceEncoder, or FastComposer's FaceNet (evaluation.facenet)."""
    _check_identity_metric(args)
    if args.identity_metric == "facenet":
        from .facenet import FaceNetMetric

        return FaceNetMetric(args.facenet_weights, args.device)
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


def _score(args, images: Path, out: Path | None = None, scorers: tuple | None = None) -> dict:
    """Score `images` against the references, write the report into `out` (default --out).
    scorers: (identity metric, CLIP or None) built once for several folders."""
    from .report import write_report
    from .score import score_folder, stderr_log

    refs = args.references if args.command == "score" else args.subjects
    encoder, clip = scorers or (_encoder(args), _clip(args))
    result = score_folder(refs, images, encoder, clip, args.det_threshold, log=stderr_log)
    paths = write_report(result, images, out or args.out)
    overall = result["by_category"]["all"]
    print(f"identity {overall['identity']:.3f} ({result['identity_metric']}) over {overall['images']} images "
          f"(faces found in {overall['face_rate']:.0%})"
          + (f", CLIP-T {overall['clip_text']:.3f}" if overall["clip_text"] is not None else ""))
    for key in ("json", "markdown"):
        print(paths[key])
    for sheet in paths["sheets"]:
        print(sheet)
    return result


def _protocol(args) -> int:
    from .prompts import select_prompts
    from .protocol import ProtocolSettings, run_protocol
    from .protocol_report import write_protocol_report
    from .score import stderr_log

    setting = "multi" if args.multi else args.setting
    settings = ("single", "multi") if setting == "both" else (setting,)
    categories = [c.strip() for c in args.prompts.split(",") if c.strip()] if args.prompts else None
    protocol = ProtocolSettings(
        checkpoints={k: v for k, v in (("sd15", args.checkpoint), ("sdxl", args.sdxl_checkpoint)) if v},
        weights=list(args.weights),
        prompts=select_prompts(categories, args.per_category) if "single" in settings else [],
        multi_prompts=select_prompts(categories, args.per_category, multi=True) if "multi" in settings else [],
        settings=settings, images_per_prompt=args.images_per_prompt, size=args.size, steps=args.steps, cfg=args.cfg,
        start_percent=args.start_percent, seed=args.seed, class_word=args.class_word, negative=args.negative,
        face_pack=args.face_pack, face_recognizer=args.face_recognizer, pairs=args.pairs)
    # The scorers are built before hours of generation, so a wrong --clip or metric fails now.
    scorers = (_encoder(args), _clip(args))
    if args.server:
        from headless.client import ComfyClient

        runs = run_protocol([ComfyClient(url) for url in args.server], args.subjects, args.out, protocol,
                            log=stderr_log)
    else:
        from contextlib import ExitStack

        from headless.server import ComfyServer

        with ExitStack() as stack:
            servers = [stack.enter_context(ComfyServer(cpu=args.cpu)) for _ in range(args.start)]
            for server in servers:
                stderr_log(f"[protocol] ComfyUI started at {server.url} (log: {server.log_path})")
            runs = run_protocol([server.client for server in servers], args.subjects, args.out, protocol,
                                log=stderr_log)
    scored = []
    for weights, run_setting, images in runs:
        stderr_log(f"[protocol] scoring {weights.label}, {run_setting}")
        scored.append({"method": weights.method.name, "weights": weights.name, "setting": run_setting,
                       "images_dir": images, "result": _score(args, images, images.parent, scorers)})
    paths = write_protocol_report(scored, args.out)
    print(paths["markdown"].read_text())
    for key in ("markdown", "csv"):
        print(paths[key])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "score":
        _score(args, args.images)
        return 0
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
