"""Headless generation through ComfyUI's HTTP API: the README's "run" command.

Starts a ComfyUI with this pack (or talks to one given by --server), submits a graph,
and writes the PNGs it returns. Uses the user's SD1.5 checkpoint when one is present;
otherwise it says which file to put where and does a clearly labelled SMOKE run on a
random-weight stand-in, so the whole path is still exercised.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .client import ComfyClient
from .graphs import txt2img
from .host import comfyui_dir

STANDIN = "portraitbooth_smoke_sd15.safetensors"
# The stand-in the tests build counts as a stand-in too, never as the user's model.
STANDIN_NAMES = {STANDIN, "portraitbooth_test_sd15.safetensors"}


def find_sd15_checkpoint(checkpoints: Path) -> str | None:
    from portraitbooth_core.model_family import checkpoint_family

    for path in sorted(checkpoints.rglob("*.safetensors")):
        if path.name in STANDIN_NAMES:
            continue
        try:
            if checkpoint_family(path) == "sd15":
                return str(path.relative_to(checkpoints))
        except ValueError:
            continue
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate", description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="a portrait photo of a woman, natural light, 85mm")
    p.add_argument("--negative", default="blurry, lowres, deformed")
    p.add_argument("--checkpoint", help="file name in models/checkpoints (default: the first SD1.5 found)")
    p.add_argument("--steps", type=int, default=None, help="default 30 (4 in a smoke run)")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--size", type=int, default=None, help="width=height in pixels; default 512 (64 in a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default="out", help="folder for the PNGs")
    p.add_argument("--server", help="URL of a running ComfyUI to use instead of starting one")
    p.add_argument("--smoke", action="store_true", help="force the random-weight stand-in")
    p.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoints = comfyui_dir() / "models" / "checkpoints"
    ckpt = None if args.smoke else (args.checkpoint or find_sd15_checkpoint(checkpoints))
    smoke = ckpt is None
    if smoke:
        if not args.smoke:
            print(f"No SD1.5 checkpoint found in {checkpoints}.\n"
                  "  Put one there (for example v1-5-pruned-emaonly.safetensors) or pass "
                  "--checkpoint NAME for real images.", file=sys.stderr)
        if args.server:
            print("A smoke run needs the stand-in in the server's models folder; "
                  "run without --server.", file=sys.stderr)
            return 2
        print("SMOKE RUN: random-weight stand-in model; the images are noise, not portraits.",
              file=sys.stderr)
        from .host import import_comfyui
        import_comfyui(cpu=True)
        from .standins import build_sd15_checkpoint
        build_sd15_checkpoint(checkpoints / STANDIN)
        ckpt = STANDIN
    steps = args.steps or (4 if smoke else 30)
    size = args.size or (64 if smoke else 512)
    graph = txt2img(ckpt, args.prompt, args.negative, size, size, steps, args.cfg, args.seed,
                    batch_size=args.batch, prefix="smoke" if smoke else "portraitbooth")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.server:
        return _run(ComfyClient(args.server), graph, out)
    from .server import ComfyServer
    with ComfyServer(cpu=smoke or args.cpu) as server:
        print(f"ComfyUI started at {server.url} (log: {server.log_path})", file=sys.stderr)
        return _run(server.client, graph, out)


def _run(client: ComfyClient, graph: dict, out: Path) -> int:
    result = client.run(graph, timeout=3600)
    for i, file in enumerate(result.images()):
        path = out / f"{result.prompt_id[:8]}_{i:02d}_{file['filename']}"
        path.write_bytes(client.fetch(file))
        print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
