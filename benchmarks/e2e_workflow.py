"""End-to-end cost of the single-subject workflow against plain txt2img, through a real ComfyUI.

Both graphs run on one ComfyUI server (headless.server.ComfyServer, on the GPU when there
is one) through its HTTP API, with the same sampler, steps, CFG, size, negative prompt and
seed, interleaved A B A B after a warm-up:
  baseline   headless.graphs.txt2img: checkpoint -> CLIPTextEncode -> KSampler -> decode -> save
  candidate  workflows/api/portraitbooth_single_subject.json as shipped, filled in with
             headless.workflows.with_inputs: + Load PortraitBooth Model (UNet patch),
             reference photo -> face analysis -> Apply STEA Conditioning
Two figures:
  e2e_single_subject_vs_txt2img             a new prompt and seed each pair, same photo
                                            (ComfyUI caches the face analysis, as it does
                                            for a user generating several images); target <= 1.05
  e2e_single_subject_new_photo_vs_txt2img   also a new reference photo upload each pair,
                                            so detection + embedding run every time
Times are ComfyUI's own (execution_start -> execution_success in the prompt's history), so
HTTP polling is not counted. The two sides load the checkpoint under two names: two
independent models, so switching sides never re-patches weights.

Quick mode (default): the tiny one-level stand-in checkpoint (TAESD decoder), 64 px,
4 Euler steps, on the CPU. --full: a full-size random SD1.5 (UNet, CLIP-L, KL VAE) at 512 px,
50 Euler steps (the workflow's settings), an R50-sized ArcFace stand-in, a rank-64 UNet patch.

    OMP_NUM_THREADS=1 python benchmarks/e2e_workflow.py [--full] [--pairs N] [--steps N]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:  # appended: ComfyUI's `nodes` must win over the pack's nodes/
        sys.path.append(str(extra))

WORKFLOW = "portraitbooth_single_subject"
PACK = "standin_r50"  # insightface-style pack folder holding the ArcFace stand-in
RECOGNIZER = "w600k_r50.onnx"
WEIGHTS = "portraitbooth_e2e.safetensors"
CKPT_PLAIN = "e2e_plain.safetensors"
CKPT_PB = "e2e_portraitbooth.safetensors"
# Same positive text on both sides; the workflow's class word ("woman") is in it.
PROMPT = "a portrait photo of a woman smiling, natural light, 85mm, take {k}"


def cache_dir() -> Path:
    from headless.comfyui import host_dir

    path = host_dir() / "cache" / "bench_e2e"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_checkpoint(full: bool) -> Path:
    """A random SD1.5 checkpoint in ComfyUI's format, built once into the host cache."""
    if full:  # full UNet + CLIP-L + the full KL VAE, shared with the training benchmark
        from benchmarks.train_standins import build_checkpoint as build_full

        return build_full(True)
    from standins.sd15 import build_sd15_checkpoint

    return build_sd15_checkpoint(cache_dir() / "sd15_tiny.safetensors")


def unet_shapes(checkpoint: Path) -> dict:
    """The UNet's weights as meta tensors (shapes only), to shape a LoRA without loading it."""
    import torch
    from safetensors import safe_open

    prefix = "model.diffusion_model."
    shapes = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefix):
                shapes[key[len(prefix):]] = torch.empty(f.get_slice(key).get_shape(), device="meta")
    return shapes


def build_models(work: Path, full: bool, rank: int) -> dict:
    """Checkpoint (two names), PortraitBooth file and face pack in folders the server is given."""
    import torch

    from benchmarks.stea_cost import random_lora
    from portraitbooth_core.stea.projector import ProjectorConfig, STEAProjector
    from portraitbooth_core.weights.file import save_portraitbooth
    from portraitbooth_core.weights.meta import FaceEncoderSpec
    from standins_face import build_arcface_onnx

    checkpoint = build_checkpoint(full)
    ckpts = work / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    for name in (CKPT_PLAIN, CKPT_PB):
        (ckpts / name).symlink_to(checkpoint)

    # Built once into the cache, laid out like models/insightface/models/<pack>/ (no links:
    # the recognizer's kind is read off its folder and file names).
    insightface = cache_dir() / ("insightface_full" if full else "insightface_quick")
    recognizer = insightface / "models" / PACK / RECOGNIZER
    if not recognizer.is_file():
        layout = {"widths": (64, 128, 256, 512), "blocks": (3, 4, 14, 3)} if full else {}  # w600k_r50's layout
        part = recognizer.with_name(recognizer.name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        build_arcface_onnx(part, **layout)
        os.replace(part, recognizer)

    weights = work / "portraitbooth"
    weights.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    projector = STEAProjector(ProjectorConfig(face_dim=512))
    torch.nn.init.normal_(projector.fc2.weight, std=0.02)  # a fresh fc2 is zero: no identity at all
    save_portraitbooth(weights / WEIGHTS, projector, FaceEncoderSpec(f"arcface:{PACK}/{RECOGNIZER}", 512),
                       random_lora(unet_shapes(checkpoint), rank),
                       training={"standin": "random weights for the end-to-end benchmark"})
    return {"checkpoints": str(ckpts), "insightface": str(insightface), "portraitbooth": str(weights)}


def graphs(size: int, steps: int, seed: int, text: str, photo: str, prefix: str) -> tuple[dict, dict]:
    """(txt2img, single-subject workflow) with the same sampling settings, read off the workflow."""
    from headless.graphs import txt2img
    from headless.workflows import load_api_workflow, with_inputs

    shipped = load_api_workflow(WORKFLOW)
    sampler = shipped["9"]["inputs"]
    negative = shipped["7"]["inputs"]["text"]
    plain = txt2img(CKPT_PLAIN, text, negative, width=size, height=size, steps=steps, cfg=sampler["cfg"],
                    seed=seed, sampler=sampler["sampler_name"], scheduler=sampler["scheduler"],
                    prefix=f"{prefix}_plain")
    portrait = with_inputs(shipped, {
        "1": {"ckpt_name": CKPT_PB},
        "2": {"portraitbooth_name": WEIGHTS},
        "3": {"image": photo},
        "4": {"pack": PACK, "detector": "retinaface (zero-download)", "recognizer": "arcface (pack)"},
        "6": {"text": text},
        "8": {"width": size, "height": size},
        "9": {"seed": seed, "steps": steps},
        "11": {"filename_prefix": f"{prefix}_portraitbooth"},
    })
    return plain, portrait


def run_timed(client, graph: dict, must_run: tuple[str, ...]) -> float:
    """Seconds ComfyUI spent executing `graph` (its own timestamps); checks that the nodes
    in `must_run` really ran (not served from ComfyUI's cache)."""
    result = client.wait(client.submit(graph), timeout=900, poll=0.02)
    stamps, cached = {}, []
    for kind, data in result.messages:
        stamps[kind] = data.get("timestamp")
        if kind == "execution_cached":
            cached = [str(n) for n in data.get("nodes", [])]
    stale = [n for n in must_run if n in cached]
    if stale:
        raise RuntimeError(f"nodes {stale} came from ComfyUI's cache: the timing would not include them")
    if stamps.get("execution_start") is None or stamps.get("execution_success") is None:
        raise RuntimeError(f"no execution timestamps in the prompt's history: {result.messages}")
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 at 512 px, 50 Euler steps")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None, help="rank of the PortraitBooth UNet patch")
    parser.add_argument("--photo", default=None, help="reference photo (default: the host's obama.jpg)")
    parser.add_argument("--cpu", action="store_true", help="run the server on the CPU even with a GPU")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (server log, images)")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    # A SIGTERM (run_all's time limit) must still stop the server: it runs in its own session.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from headless import comfyui as host

    host.import_comfyui(cpu=True)  # this process only builds files; the server does the work
    import torch

    from headless.server import ComfyServer
    from headless.workflows import load_api_workflow

    cuda = torch.cuda.is_available() and not args.cpu
    size = args.size or (512 if args.full else 64)
    steps = args.steps or (50 if args.full else 4)
    rank = args.rank or (64 if args.full else 8)
    photo = Path(args.photo) if args.photo else host.photos_dir() / "obama.jpg"
    if not photo.is_file():
        raise SystemExit(f"e2e_workflow: no reference photo at {photo}; run scripts/setup_host.sh or pass --photo")
    threads = os.environ["OMP_NUM_THREADS"]
    work = Path(tempfile.mkdtemp(prefix="pb_e2e_"))
    start = time.perf_counter()
    paths = build_models(work, args.full, rank)
    built_s = time.perf_counter() - start
    extra_args = []
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        # No web UI package (the GPU machine carries none): an empty front end lets the API start.
        (work / "frontend").mkdir()
        extra_args += ["--front-end-root", str(work / "frontend")]
    server = ComfyServer(work / "server", python=sys.executable, extra_model_paths=paths, cpu=not cuda,
                         extra_args=extra_args)
    try:
        client = server.start(timeout=300)
        stats = client.get_json("/system_stats")
        sampler = load_api_workflow(WORKFLOW)["9"]["inputs"]  # what graphs() gives both sides
        # Named as the other benchmarks name it (torch's device name), the server's own beside it.
        device = torch.cuda.get_device_name(0) if cuda else \
            f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        config = {"mode": "full" if args.full else "quick", "unet": "sd15-full" if args.full else "tiny-1-level",
                  "vae": "kl (full SD VAE)" if args.full else "taesd", "px": size, "steps": steps,
                  **{k: sampler[k] for k in ("sampler_name", "scheduler", "cfg")}, "unet_patch_rank": rank,
                  "recognizer": "arcface r50-sized stand-in" if args.full else "arcface small stand-in",
                  "detector": "retinaface (zero-download)", "server_threads": threads,
                  "server_device": stats["devices"][0].get("name"),
                  "torch": stats.get("system", {}).get("pytorch_version"), "timing": "comfyui execution_start->success"}
        print("# end-to-end: single-subject workflow vs txt2img through ComfyUI's HTTP API", file=sys.stderr)
        print(f"# device={device} " + " ".join(f"{k}={v}" for k, v in config.items())
              + f" build_s={built_s:.1f}", file=sys.stderr)
        client.upload_image(photo, name="e2e_ref.jpg")
        # Warm-up: loads both models and the face encoder (and, on a GPU, settles kernels and clocks).
        for k in range(2 if args.full else 1):
            plain, portrait = graphs(size, steps, 1000 + k, PROMPT.format(k=f"w{k}"), "e2e_ref.jpg", "warm")
            run_timed(client, plain, ())
            run_timed(client, portrait, ())
        figures = (("e2e_single_subject_vs_txt2img", False, 1.05),
                   ("e2e_single_subject_new_photo_vs_txt2img", True, None))
        for fig, (name, new_photo, target) in enumerate(figures):
            ratios, base, cand = [], [], []
            for k in range(args.pairs):
                image = "e2e_ref.jpg"
                if new_photo:  # same bytes under a new name: LoadImage and face analysis run again
                    image = client.upload_image(photo, name=f"e2e_ref_{k}.jpg")
                # A prompt never used before (on both sides): ComfyUI must encode and sample again.
                plain, portrait = graphs(size, steps, k, PROMPT.format(k=f"f{fig}p{k}"), image, name)
                b = run_timed(client, plain, ("2", "5"))
                c = run_timed(client, portrait, ("6", "9") + (("3", "5") if new_photo else ()))
                base.append(b)
                cand.append(c)
                ratios.append(c / b)
            record = {"name": name, "ratio": round(statistics.median(ratios), 4),
                      "spread": [round(min(ratios), 4), round(max(ratios), 4)], "target": target,
                      "device": device,
                      "config": {**config, "new_photo_each_pair": new_photo, "pairs": args.pairs,
                                 "baseline_s": round(statistics.median(base), 4),
                                 "candidate_s": round(statistics.median(cand), 4)}}
            if target is not None:
                record["meets_target"] = record["ratio"] <= target
            print(json.dumps(record), flush=True)
        if cuda:
            vram = client.get_json("/system_stats")["devices"][0]
            print(json.dumps({"name": "e2e_server_vram_in_use_mb", "value": round(
                (vram.get("torch_vram_total", 0) - vram.get("torch_vram_free", 0)) / 2**20, 1),
                "device": device, "config": {**config, "what": "CUDA memory allocated in the server after "
                                                              "both workflows (both models loaded)"}}), flush=True)
    except Exception:
        print(f"--- server log tail ---\n{server.log_tail(40)}", file=sys.stderr)
        raise
    finally:
        server.stop()
        if not args.keep:  # links, uploads and outputs only: the stand-ins stay in the cache
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
