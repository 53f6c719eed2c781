"""End-to-end cost of the PhotoMaker v2 template against plain SDXL txt2img, through a real ComfyUI.

Both graphs run on one ComfyUI server (headless.server.ComfyServer, on the GPU when there is
one, with --cache-lru as in e2e_workflow.py) through its HTTP API, with the same size, steps,
CFG (5), sampler (Euler), scheduler, seed and negative prompt, interleaved A B A B after a
warm-up, a prompt and seed never used before in each pair and the same photos throughout:
  baseline   headless.graphs.txt2img: SDXL checkpoint -> CLIPTextEncode x2 -> KSampler ->
             VAEDecode -> SaveImage, prompted with the template's text minus the trigger word
             "img" (what a user writes without PhotoMaker)
  candidate  workflows/api/portraitbooth_photomaker_v2_single_subject.json as shipped, filled in
             by standins.templates.standin_graph: Load PortraitBooth Model (PhotoMaker v2 head +
             LoRA), 3 photos batched -> CLIP Vision Identity in mode PhotoMaker v2 with Load
             FaceEncoder buffalo_l -> Apply STEA with the file's start (0.2)
Each side loads the checkpoint under its own name, so each keeps its own loaded model (the
candidate's carries the merged LoRA). With --cache-lru and the same photos, the photos, their
identity and the negative prompts come from ComfyUI's cache after the warm-up, as for a user
generating several images; the nodes that get the new prompt and seed must run each time.
Times are ComfyUI's own (execution_start -> execution_success in the prompt's history).

Records (one JSON line each):
  e2e_photomaker_v2_vs_sdxl_txt2img   median per-pair ratio, min-max spread; target <= 1.10.
        Why not 1.05 as for the SD1.5 workflow: PhotoMaker's own pipeline also encodes a
        text-only prompt (the class word without the stacked identity tokens) for the steps
        before its start (20% here), so the template runs SDXL's two text encoders twice per
        prompt where txt2img runs them once, plus the ID head's fuse; the LoRA is merged into
        the weights at load and the sampler evaluates one conditioning per step on either
        side, so the steps themselves should cost the same.
  e2e_photomaker_v2_nodes             per-node breakdown of the same pairs (e2e_workflow.py's
        method: websocket stamps, sampler split, model loads per run from the server log).
  e2e_photomaker_run_seconds          this script's phases, to size its budget in run_all.py.

The stand-in SDXL (standins/sdxl.py) has a small UNet (KOALA-like, 95M parameters against
SDXL's 2.6B) but full-size text encoders (CLIP-L + OpenCLIP bigG, 818M): the ratio here
over-weights text encoding, and so the template's second encode, compared with a real SDXL,
where the 50 UNet steps dominate. Quick mode (the CPU's 64 px, 4 steps) over-weights it most.

Quick mode (default, a CPU): 64 px, 4 steps. --full (a GPU): 1024 px, 50 steps (the
template's), same stand-in checkpoint; --budget-s stops taking pairs when the next one
would end past that many seconds from the start (run_all.py gives full mode a fixed budget).

No diffusers is needed (the GPU machine has none): standins.photomaker lists the LoRA's
layers with a diffusers UNet, which this script replaces by ComfyUI's own map
(comfy.utils.unet_to_diffusers) of the same UNet, in diffusers' module order, so the
release is the one the tests build (same keys, shapes and random values). The PhotoMaker
release is cached with the tests' stand-ins, its import, the stand-in buffalo_l pack
(tests/standins_face.py builders) and the SDXL checkpoint in the host's cache; the server's
input, output, temp and user folders live in a temp folder removed at the end.
The template's Load FaceEncoder buffalo_l does need the package insightface (the pack runs
insightface packs through it): where it is missing (the GPU image has none, and
make_carry.sh carries none) the script stops at once with that reason, before any build.
Photos: the template's (obama.jpg, obama2.jpg, obama3.jpg from headless.comfyui.photos_dir());
a missing one is replaced by another photo of standins.templates' (the carry has obama.jpg
and biden.jpg only), which the config's "photos" records.

    OMP_NUM_THREADS=1 python benchmarks/e2e_photomaker.py [--full] [--pairs N] [--steps N]
                                                          [--size PX] [--budget-s S]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

from benchmarks.e2e_workflow import (MessageClock, LogTail, Run, cache_dir, nodes_record,  # noqa: E402
                                     ratio_record, run_timed, server_args)

WORKFLOW = "portraitbooth_photomaker_v2_single_subject"
CKPT_PLAIN = "e2e_sdxl_plain.safetensors"
CKPT_PM = "e2e_sdxl_photomaker.safetensors"
TRIGGER = re.compile(r"\s+img\b")  # PhotoMaker's trigger word, dropped from the baseline's prompt
TARGET = 1.10


def attention_layers_from_comfy() -> dict[str, tuple[int, int]]:
    """{diffusers module: (out, in)} of every attention projection of the SDXL stand-in's UNet,
    from ComfyUI's diffusers map and shapes, ordered as diffusers' named_modules lists them
    (down blocks, up blocks, mid block; q, k, v, out): standins.photomaker's listing, without
    diffusers. Checked equal (keys, shapes, order) on a host with diffusers 0.42.1."""
    import comfy.utils

    from portraitbooth_core.weights.formats.fastcomposer import comfy_unet_shapes
    from standins.photomaker import ATTENTION
    from standins.sdxl import sdxl_unet_config

    config = sdxl_unet_config()
    shapes = comfy_unet_shapes(config)
    layers = {key[:-len(".weight")]: tuple(shapes[comfy_key])
              for key, comfy_key in comfy.utils.unet_to_diffusers(config).items()
              if key.endswith(".weight") and ATTENTION.fullmatch(key[:-len(".weight")])}
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # diffusers registers them in this order
    proj = {"to_q": 0, "to_k": 1, "to_v": 2, "to_out": 3}

    def order(name: str) -> list:
        head, *rest = name.split(".")
        return [group[head]] + [(0, int(p), "") if p.isdigit() else (1, proj.get(p, 0), p) for p in rest]

    return {name: layers[name] for name in sorted(layers, key=order)}


def build_photomaker_v2(folder: Path) -> dict[str, str]:
    """The PhotoMaker v2 stand-in (standins.sdxl's recipe, v2 only) imported with the pack's
    importer into folder/<release>/ (built once); returns {kind: folder}."""
    import torch

    import standins.photomaker as standin_pm
    from headless.comfyui import host_dir
    from portraitbooth_core.weights.formats.photomaker import import_photomaker, output_paths
    from standins.sdxl import (PHOTOMAKER_MODEL_KINDS, PHOTOMAKER_NAMES, PHOTOMAKER_RANK, PHOTOMAKER_RELEASES,
                               sdxl_diffusers_unet_config, sdxl_unet_config, with_identity_gain)

    # The tests' release cache: a release built there by either is the same file.
    release = host_dir() / "cache" / "standins" / PHOTOMAKER_RELEASES["v2"]
    if not release.is_file():
        wanted = sdxl_diffusers_unet_config()

        def layers(items: tuple) -> dict[str, tuple[int, int]]:
            if dict(items) != {k: tuple(v) if isinstance(v, list) else v for k, v in wanted.items()}:
                raise ValueError("e2e_photomaker lists the LoRA layers of the SDXL stand-in's UNet only")
            return attention_layers_from_comfy()

        with mock.patch.object(standin_pm, "_attention_layers", layers):
            # seed 13: build_sdxl_photomaker_models' for v2
            sd = standin_pm.release_state_dict("v2", vision="vit-l", head="full", unet=wanted,
                                               rank=PHOTOMAKER_RANK, seed=13, dtype=torch.float16)
        standin_pm.save_release(with_identity_gain(sd), release)
        del sd
    # One import per release file name (they are versioned): a new recipe gets a new folder.
    target = folder / release.stem
    if not all(p.is_file() for p in output_paths(target, PHOTOMAKER_NAMES["v2"]).values()):
        import_photomaker(release, target, name=PHOTOMAKER_NAMES["v2"], version="v2", dtype="fp16",
                          progress=False, unet_config=sdxl_unet_config())
    return {kind: str(target / kind) for kind in PHOTOMAKER_MODEL_KINDS}


def build_insightface(root: Path, pack: str) -> Path:
    """`root` laid out like models/insightface/ with a stand-in `pack` in buffalo_l's layout
    (det_10g, w600k_r50, genderage: tests/conftest.py's build_insightface_pack), built once."""
    from standins_face import build_arcface_onnx, build_genderage_onnx, build_scrfd_onnx

    files = ("det_10g.onnx", "w600k_r50.onnx", "genderage.onnx")
    if all((root / "models" / pack / f).is_file() for f in files):
        return root
    part = root.with_name(f"{root.name}.{os.getpid()}.part")  # whole or absent: a stopped build leaves no pack
    shutil.rmtree(part, ignore_errors=True)
    folder = part / "models" / pack
    build_scrfd_onnx(folder / "det_10g.onnx", layout="det_10g")
    build_arcface_onnx(folder / "w600k_r50.onnx", seed=2)
    build_genderage_onnx(folder / "genderage.onnx")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(part, root)
    return root


def build_models(work: Path) -> dict[str, str]:
    """SDXL stand-in (two names), PhotoMaker v2 stand-in and buffalo_l stand-in, for the server."""
    from headless.comfyui import host_dir
    from standins.sdxl import CHECKPOINT_NAME, build_sdxl_checkpoint
    from standins.templates import INSIGHTFACE_PACK

    checkpoint = build_sdxl_checkpoint(host_dir() / "cache" / "standins" / CHECKPOINT_NAME)
    ckpts = work / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    for name in (CKPT_PLAIN, CKPT_PM):
        (ckpts / name).symlink_to(checkpoint)
    insightface = build_insightface(cache_dir() / "insightface_buffalo_l", INSIGHTFACE_PACK)
    return {"checkpoints": str(ckpts), **build_photomaker_v2(cache_dir() / "photomaker"),
            "insightface": str(insightface)}


def missing_dependency() -> str | None:
    """Why this Python (the server's too) cannot run the template's Load FaceEncoder
    buffalo_l, or None: an insightface pack runs through the package insightface."""
    from portraitbooth_core.face.insight import insightface
    from portraitbooth_core.optional import MissingDependencyError
    from standins.templates import INSIGHTFACE_PACK

    try:
        insightface()
    except MissingDependencyError as exc:
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
        return (f"Load FaceEncoder {INSIGHTFACE_PACK} needs the Python package '{exc.package}'{cause}; "
                f"carry insightface and its imports to measure it there")
    return None


def pick_photos(folder: Path) -> dict[str, Path]:
    """{template photo name: file}: the template's photos (standins.templates), each missing one
    replaced by another photo whose specks the stand-in detector also takes for a face (the GPU
    machine's carry holds obama.jpg and biden.jpg only)."""
    from standins.templates import DEFAULT_PHOTOS, template_photos

    wanted = template_photos(WORKFLOW)
    present = [name for name in dict.fromkeys(wanted + DEFAULT_PHOTOS) if (folder / name).is_file()]
    if not present:
        raise SystemExit(f"e2e_photomaker: none of {', '.join(wanted + DEFAULT_PHOTOS)} in {folder}; "
                         f"run scripts/setup_host.sh")
    chosen = {name: folder / (name if name in present else present[i % len(present)])
              for i, name in enumerate(wanted)}
    for name, path in chosen.items():
        if path.name != name:
            print(f"# no {name} in {folder}: {path.name} instead", file=sys.stderr)
    return chosen


def node_of(graph: dict, class_type: str) -> str:
    """The id of the graph's only node of `class_type`."""
    found = [nid for nid, node in graph.items() if node["class_type"] == class_type]
    if len(found) != 1:
        raise ValueError(f"{WORKFLOW}: expected one {class_type} node, found {len(found)}")
    return found[0]


def graphs(size: int, steps: int, seed: int, tag: str, photos: dict[str, str], prefix: str) -> tuple[dict, dict]:
    """(plain SDXL txt2img, PhotoMaker v2 template) with the same sampling settings, read off
    the template; `tag` makes the prompt one ComfyUI has not encoded yet."""
    from headless.graphs import txt2img
    from headless.workflows import with_inputs
    from standins.templates import standin_graph

    template = standin_graph(WORKFLOW, CKPT_PM, photos, short_side=size, steps=steps, batch=1, sdxl_checkpoint=CKPT_PM)
    stea, sampler_id = node_of(template, "PortraitBoothApplySTEA"), node_of(template, "KSampler")
    sampler = template[sampler_id]["inputs"]
    text = f"{template[stea]['inputs']['text']}, take {tag}"
    negative = template[sampler["negative"][0]]["inputs"]["text"]
    latent = template[sampler["latent_image"][0]]["inputs"]
    plain = txt2img(CKPT_PLAIN, TRIGGER.sub("", text), negative, width=latent["width"], height=latent["height"],
                    steps=sampler["steps"], cfg=sampler["cfg"], seed=seed, sampler=sampler["sampler_name"],
                    scheduler=sampler["scheduler"], prefix=f"{prefix}_plain")
    photomaker = with_inputs(template, {stea: {"text": text}, sampler_id: {"seed": seed},
                                        node_of(template, "SaveImage"): {"filename_prefix": f"{prefix}_photomaker"}})
    return plain, photomaker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="1024 px, 50 Euler steps (a GPU's job)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side in px (multiple of 8)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="take no pair that would end past this many seconds from the start (at least one)")
    parser.add_argument("--cpu", action="store_true", help="run the server on the CPU even with a GPU")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (server log, images)")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    # A SIGTERM (run_all's time limit) must still stop the server: it runs in its own session.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.perf_counter()

    from headless import comfyui as host

    host.import_comfyui(cpu=True)  # this process only builds files; the server does the work
    missing = missing_dependency()
    if missing:  # before building 3 GB of stand-ins for a server that cannot run the template
        raise SystemExit(f"e2e_photomaker: skipped, the template cannot run here: {missing}")
    import torch

    from headless.server import ComfyServer

    cuda = torch.cuda.is_available() and not args.cpu
    size = args.size or (1024 if args.full else 64)
    steps = args.steps or (50 if args.full else 4)
    photo_files = pick_photos(host.photos_dir())
    work = Path(tempfile.mkdtemp(prefix="pb_e2e_pm_"))
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        """Record and print how long a phase took (for run_all.py's budget); returns now."""
        phases[name] = round(time.perf_counter() - since, 1)
        print(f"# phase {name}: {phases[name]} s", file=sys.stderr, flush=True)
        return time.perf_counter()

    server = None
    try:
        t = time.perf_counter()
        paths = build_models(work)
        t = phase("build_models", t)
        server = ComfyServer(work / "server", python=sys.executable, extra_model_paths=paths, cpu=not cuda,
                             extra_args=server_args(work, "lru"))
        client = server.start(timeout=300)
        t = phase("server_start", t)
        clock = MessageClock(server.url, client.client_id)
        if clock.error:
            print(f"# no per-node times: {clock.error}", file=sys.stderr)
        log = LogTail(server.log_path)
        stats = client.get_json("/system_stats")
        photos = {name: client.upload_image(path, name=f"e2e_pm_{name}") for name, path in photo_files.items()}
        plain, photomaker = graphs(size, steps, 0, "w", photos, "warm")
        sampler = plain["5"]["inputs"]
        # Named as the other benchmarks name it (torch's device name), the server's own beside it.
        device = torch.cuda.get_device_name(0) if cuda else \
            f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        config = {"mode": "full" if args.full else "quick",
                  "unet": "sdxl stand-in (KOALA-like, 95M params)", "text_encoders": "clip-l + bigG, full size",
                  "vae": "taesd", "px": size, "steps": steps,
                  **{k: sampler[k] for k in ("sampler_name", "scheduler", "cfg")},
                  "photomaker": "v2 stand-in (ViT-L tower, full head, rank-4 LoRA)",
                  "face_encoder": "buffalo_l stand-in", "start_percent": "from the file (0.2)",
                  "photos": {name: path.name for name, path in photo_files.items()},
                  "server_threads": os.environ["OMP_NUM_THREADS"], "server_device": stats["devices"][0].get("name"),
                  "torch": stats.get("system", {}).get("pytorch_version"), "server_cache": "lru",
                  "timing": "comfyui execution_start->success"}
        print("# end-to-end: PhotoMaker v2 template vs SDXL txt2img through ComfyUI's HTTP API", file=sys.stderr)
        print(f"# device={device} " + " ".join(f"{k}={v}" for k, v in config.items()), file=sys.stderr)
        # Warm-up: loads both models, the image encoder and the face encoder, and computes the
        # identity the pairs then take from the cache (on a GPU also settles kernels and clocks).
        for k in range(2 if args.full else 1):
            plain, photomaker = graphs(size, steps, 1000 + k, f"w{k}", photos, "warm")
            run_timed(client, plain, ())
            run_timed(client, photomaker, ())
        t = phase("warm_up", t)
        name = "e2e_photomaker_v2_vs_sdxl_txt2img"
        runs: dict[str, list[Run]] = {"plain": [], "photomaker": []}
        pair_s: list[float] = []
        for k in range(args.pairs):
            if args.budget_s is not None and pair_s and \
                    time.perf_counter() - start + max(pair_s) > args.budget_s:
                print(f"# --budget-s {args.budget_s:g}: stopped after {k} of {args.pairs} pairs", file=sys.stderr)
                break
            began = time.perf_counter()
            plain, photomaker = graphs(size, steps, k, f"p{k}", photos, name)
            stea, sampler_id = node_of(photomaker, "PortraitBoothApplySTEA"), node_of(photomaker, "KSampler")
            runs["plain"].append(run_timed(client, plain, ("2", "5"), clock, log))
            runs["photomaker"].append(run_timed(client, photomaker, (stea, sampler_id), clock, log))
            pair_s.append(time.perf_counter() - began)
        config = {**config, "pairs": len(pair_s), "pairs_requested": args.pairs}
        print(json.dumps(ratio_record(name, [r.seconds for r in runs["plain"]],
                                      [r.seconds for r in runs["photomaker"]], device, config, TARGET)), flush=True)
        print(json.dumps(nodes_record("e2e_photomaker_v2_nodes", runs, device, config, clock)), flush=True)
        phase("pairs", t)
        print(json.dumps({"name": "e2e_photomaker_run_seconds", "value": round(time.perf_counter() - start, 1),
                          "device": device, "config": {**config, "phases_s": phases,
                                                       "pair_wall_s": round(statistics.median(pair_s), 2)}}),
              flush=True)
    except Exception:
        if server is not None:
            print(f"--- server log tail ---\n{server.log_tail(40)}", file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.stop()
        if not args.keep:  # links, uploads and outputs only: the stand-ins stay in the cache
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
