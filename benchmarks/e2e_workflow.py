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
                                            (meant to have the face analysis cached, as for a
                                            user generating several images; interleaved, it
                                            is not: see below); target <= 1.05
  e2e_single_subject_new_photo_vs_txt2img   also a new reference photo upload each pair,
                                            so detection + embedding run every time; the
                                            record splits them out: face_analysis_s (LoadImage
                                            + Analyze Faces, per-node times below) and
                                            ratio_without_face_analysis
Times are ComfyUI's own (execution_start -> execution_success in the prompt's history), so
HTTP polling is not counted. The two sides load the checkpoint under two names (two
independent models). The server runs with --cache-lru (default --cache lru): ComfyUI's
default (classic) cache keeps only the outputs of the last prompt's nodes, so in interleaved
pairs each side's checkpoint loader would run again every time: both models reloaded (seen on
the CPU: 3 model loads per run), the workflow's UNet patch re-applied, the negative prompt,
face encoder load and face analysis redone, none of which a user generating several images
with one workflow pays. The H200's 1.84x (2026-11) was measured that way; --cache classic
measures it again. The block-ordered records below are a cross-check either way.

Where the time goes (diagnostic records, no targets; each side's figures are medians):
  e2e_single_subject_nodes, ..._new_photo_nodes   per node, for the pairs above. ComfyUI 0.3.75
        keeps only execution_start/cached/success (ms stamps) in the history: a node's start
        ("executing") and each sampler step ("progress") reach only websocket clients, with no
        time in them, so a websocket listener stamps them on arrival (same machine, same clock).
        A node's seconds run from its start to the next node's start (the last: to
        execution_success); "(before first node)" is ComfyUI's cache set-up; the sampler's
        time is split into to_first_step / step / after_last_step. On a GPU these are
        Python-side times: queued CUDA work can spill into the next node (VAE decode).
        Also per side: model loads per run, counted from the server log ("Requested to load").
  e2e_single_subject_per_step_vs_txt2img, e2e_single_subject_fixed_overhead_s
        both sides also run --low-steps steps (interleaved, same photo): per side a line
        t(steps) = intercept + slope * steps through the two step counts; the ratio of slopes
        (per-step overhead) and the difference of intercepts (fixed overhead, seconds; with
        the interleaved pairs' reloads in it).
  e2e_single_subject_vs_txt2img_blocks, e2e_unet_patch_only_vs_txt2img_blocks, e2e_blocks_nodes
        block order on the same server: --block-runs txt2img, then the same number of
        txt2img-with-the-UNet-patch (the workflow without photo or Apply STEA), then the
        workflow; the first run of each block (it follows a switch) is left out. Blocks much
        faster than interleaved would mean switching sides costs (model reloads/re-patching);
        patch-only against txt2img separates the UNet patch from the identity conditioning.
  e2e_run_seconds   this script's own phases, to size its time budget in run_all.py.
Not measured here: the FastComposer template. Its stand-in release needs diffusers (absent on
the GPU image and not carried) and a full ViT-L build per fresh machine.

Quick mode (default): the tiny one-level stand-in checkpoint (TAESD decoder), 64 px,
4 Euler steps, on the CPU. --full: a full-size random SD1.5 (UNet, CLIP-L, KL VAE) at 512 px,
50 Euler steps (the workflow's settings), an R50-sized ArcFace stand-in, a rank-64 UNet patch.

    OMP_NUM_THREADS=1 python benchmarks/e2e_workflow.py [--full] [--pairs N] [--steps N]
                                                        [--low-steps N] [--block-runs N]
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

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


def patch_only_graph(portrait: dict) -> dict:
    """The workflow without photo, face analysis or Apply STEA: the patched UNet with a plain
    CLIPTextEncode of the same text (nodes 1 and 2 as in the workflow, so the same model)."""
    graph = {k: v for k, v in copy.deepcopy(portrait).items() if k not in ("3", "4", "5")}
    graph["6"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": portrait["6"]["inputs"]["text"]}}
    return graph


def server_args(work: Path, cache: str = "lru") -> list[str]:
    """ComfyServer's extra arguments: the node cache ("lru": both sides' node outputs kept between
    interleaved runs, see the module docstring; "classic": ComfyUI's default) and, where no web UI
    package is installed, an empty front end in `work`."""
    extra_args = ["--cache-lru", "64"] if cache == "lru" else []
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        # No web UI package (the GPU machine carries none): an empty front end lets the API start.
        (work / "frontend").mkdir()
        extra_args += ["--front-end-root", str(work / "frontend")]
    return extra_args


# Server log lines of ComfyUI's model management (comfy/model_management.py, model_patcher.py).
LOAD_LINE = re.compile(r"Requested to load|loaded (completely|partially)|[Uu]nloaded|models unloaded")


class MessageClock:
    """ComfyUI's websocket messages for one client id, each stamped with time.time() on arrival
    (the history has no per-node times; see the module docstring)."""

    KINDS = ("executing", "progress")

    def __init__(self, base_url: str, client_id: str, timeout: float = 30.0):
        self.events: list[tuple[float, str, dict]] = []  # appended by the listener thread only
        self.error: str | None = None
        self._ready = threading.Event()
        url = base_url.replace("http://", "ws://", 1) + f"/ws?clientId={client_id}"
        threading.Thread(target=asyncio.run, args=(self._listen(url),), daemon=True).start()
        if not self._ready.wait(timeout):
            self.error = f"no websocket connection to {url} within {timeout:.0f} s"

    async def _listen(self, url: str) -> None:
        try:
            import aiohttp  # ComfyUI's own dependency: present wherever its server runs

            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(url, max_msg_size=0) as ws:
                    self._ready.set()
                    async for msg in ws:
                        stamp = time.time()
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue  # binary frames are previews
                        body = json.loads(msg.data)
                        if body.get("type") in self.KINDS:
                            self.events.append((stamp, body["type"], body.get("data") or {}))
            self.error = "the server closed the websocket"  # else since() would wait out every run
        except Exception as exc:  # the per-node records say so; the timing itself goes on
            self.error = f"websocket listener: {type(exc).__name__}: {exc}"
        finally:
            self._ready.set()

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int, prompt_id: str, timeout: float = 5.0) -> list[tuple[float, str, dict]]:
        """The prompt's events after `mark`, once its closing `executing` (node None, sent
        after the history entry is written) has arrived."""
        deadline = time.monotonic() + timeout
        while True:
            events = [e for e in self.events[mark:] if e[2].get("prompt_id") == prompt_id]
            if any(kind == "executing" and data.get("node") is None for _, kind, data in events) \
                    or self.error or time.monotonic() > deadline:
                return events
            time.sleep(0.005)


class LogTail:
    """Whole lines the server's log gained since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        cut = data.rfind(b"\n") + 1  # a partial last line waits for the next call
        self.offset += cut
        return data[:cut].decode(errors="replace").splitlines()


@dataclass
class Run:
    seconds: float  # execution_start -> execution_success, ComfyUI's own stamps
    queued_s: float | None = None  # submitted here -> execution_start (validation, queue)
    nodes: dict[str, float] = field(default_factory=dict)  # "<id> <class_type>" -> seconds
    sampler: dict[str, float | None] = field(default_factory=dict)
    loads: list[str] = field(default_factory=list)  # model-management lines of the server log


def node_times(graph: dict, events: list, start: float, end: float) -> tuple[dict, dict]:
    """Per-node seconds (a node's start to the next one's; the last to `end`) and the
    KSampler's split by its per-step progress messages."""
    starts = [(t, str(d["node"])) for t, kind, d in events if kind == "executing" and d.get("node") is not None]
    if not starts:
        return {}, {}
    nodes = {"(before first node)": starts[0][0] - start}
    bounds = [t for t, _ in starts[1:]] + [end]
    sampler: dict[str, float | None] = {}
    for (t, node), nxt in zip(starts, bounds):
        kind = graph.get(node, {}).get("class_type", "?")
        nodes[f"{node} {kind}"] = nodes.get(f"{node} {kind}", 0.0) + nxt - t
        steps = [ts for ts, k, d in events if k == "progress" and str(d.get("node")) == node]
        if kind == "KSampler" and steps:
            gaps = [b - a for a, b in zip(steps, steps[1:])]
            step = statistics.median(gaps) if gaps else None
            sampler = {"to_first_step_s": steps[0] - t, "step_s": step,
                       "setup_s": steps[0] - t - step if step is not None else None,
                       "after_last_step_s": nxt - steps[-1], "steps_seen": len(steps)}
    return nodes, sampler


def run_timed(client, graph: dict, must_run: tuple[str, ...], clock: MessageClock | None = None,
              log: LogTail | None = None) -> Run:
    """Run `graph`: seconds ComfyUI spent executing it (its own timestamps), per-node times when
    `clock` listens, model-load lines when `log` is given; checks that the nodes in `must_run`
    really ran (not served from ComfyUI's cache)."""
    mark = clock.mark() if clock is not None else 0
    if log is not None:
        log.new_lines()  # what came before this run is not its
    submitted = time.time()
    prompt_id = client.submit(graph)
    result = client.wait(prompt_id, timeout=900, poll=0.02)
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
    start, end = stamps["execution_start"] / 1000.0, stamps["execution_success"] / 1000.0
    run = Run(end - start, start - submitted)
    if clock is not None and clock.error is None:
        run.nodes, run.sampler = node_times(graph, clock.since(mark, prompt_id), start, end)
    if log is not None:
        run.loads = [line.strip() for line in log.new_lines() if LOAD_LINE.search(line)]
    return run


def _median(values: list, digits: int = 4) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def breakdown(runs: list[Run]) -> dict:
    """One side's medians over its runs: total, queue, per node, sampler split, model loads."""
    keys = list(dict.fromkeys(k for r in runs for k in r.nodes))
    part = {"runs": len(runs), "total_s": _median([r.seconds for r in runs]),
            "queued_s": _median([r.queued_s for r in runs]),
            "nodes_s": {k: _median([r.nodes.get(k) for r in runs]) for k in keys}}
    partial = {k: sum(k in r.nodes for r in runs) for k in keys if not all(k in r.nodes for r in runs)}
    if partial:
        part["node_ran_in_runs"] = partial
    part["sampler"] = {k: _median([r.sampler.get(k) for r in runs])
                       for k in ("to_first_step_s", "setup_s", "step_s", "after_last_step_s", "steps_seen")}
    part["model_loads_per_run"] = _median([sum("Requested to load" in line for line in r.loads) for r in runs], 1)
    part["load_lines"] = sorted({line[:200] for r in runs for line in r.loads})[:8]
    return part


def side_summary(side: str, part: dict) -> str:
    top = sorted(((v, k) for k, v in part["nodes_s"].items() if v is not None), reverse=True)[:4]
    sampler = part["sampler"]
    return (f"{side} {part['total_s']} s: " + ", ".join(f"{k} {v}" for v, k in top)
            + f"; sampler setup {sampler['setup_s']} step {sampler['step_s']}; loads/run {part['model_loads_per_run']}")


def nodes_record(name: str, sides: dict[str, list[Run]], device: str, config: dict, clock: MessageClock) -> dict:
    parts = {side: breakdown(runs) for side, runs in sides.items()}
    record = {"name": name, "device": device,
              "summary": " | ".join(side_summary(side, part) for side, part in parts.items()),
              "config": {**config, "timing": "node start (websocket 'executing', stamped on arrival) -> next "
                                             "node's start; medians", **parts}}
    if clock.error:
        record["error"] = f"no per-node times: {clock.error}"
    return record


def ratio_record(name: str, base: list[float], cand: list[float], device: str, config: dict,
                 target: float | None = None) -> dict:
    """The harness's record: median of per-pair ratios, min-max spread, median seconds."""
    ratios = [c / b for b, c in zip(base, cand)]
    record = {"name": name, "ratio": round(statistics.median(ratios), 4),
              "spread": [round(min(ratios), 4), round(max(ratios), 4)], "target": target, "device": device,
              "config": {**config, "baseline_s": round(statistics.median(base), 4),
                         "candidate_s": round(statistics.median(cand), 4)}}
    if target is not None:
        record["meets_target"] = record["ratio"] <= target
    return record


FACE_NODES = ("LoadImage", "PortraitBoothAnalyzeFaces")  # what a new reference photo runs again


def face_analysis_split(portrait: list[Run], base: list[float]) -> dict:
    """The new-photo figure with the face analysis split out: per pair, the seconds of the
    photo's nodes (LoadImage + Analyze Faces: detection and embedding), the ratio without
    them and their share of the candidate. Empty values when no per-node times were taken."""
    face = [sum(v for k, v in r.nodes.items() if k.split(" ", 1)[-1] in FACE_NODES) if r.nodes else None
            for r in portrait]
    pairs = [(r.seconds, f, b) for r, f, b in zip(portrait, face, base) if f is not None]
    if not pairs:
        return {"face_analysis_s": None, "ratio_without_face_analysis": None,
                "face_analysis_note": "no per-node times (websocket listener missing): not split"}
    without = [(c - f) / b for c, f, b in pairs]
    return {"face_analysis_s": _median([f for _, f, _ in pairs]),
            "face_analysis_share": _median([f / c for c, f, _ in pairs]),
            "ratio_without_face_analysis": round(statistics.median(without), 4),
            "spread_without_face_analysis": [round(min(without), 4), round(max(without), 4)],
            "face_analysis_nodes": list(FACE_NODES)}


def step_cost_records(hi: dict[str, list[float]], lo: dict[str, list[float]], steps: int, low: int,
                      device: str, config: dict) -> list[dict]:
    """Per side a line through (low, t_low) and (steps, t_steps): slope = seconds per step,
    intercept = seconds outside the steps. Ratio of slopes per pair (k-th run at each count)."""
    fit = {}
    for side in ("plain", "portrait"):
        slope = (statistics.median(hi[side]) - statistics.median(lo[side])) / (steps - low)
        fit[side] = {"slope_s": round(slope, 5), "intercept_s": round(statistics.median(lo[side]) - low * slope, 4)}
    pair_slopes = {side: [(h - l) / (steps - low) for h, l in zip(hi[side], lo[side])] for side in fit}
    per_step = [c / b for b, c in zip(pair_slopes["plain"], pair_slopes["portrait"]) if b > 0]
    fixed = fit["portrait"]["intercept_s"] - fit["plain"]["intercept_s"]
    extra_steps = steps * (fit["portrait"]["slope_s"] - fit["plain"]["slope_s"])
    common = {**config, "step_counts": [low, steps], "pairs": len(per_step),
              "plain_intercept_s": fit["plain"]["intercept_s"], "plain_slope_s": fit["plain"]["slope_s"],
              "portrait_intercept_s": fit["portrait"]["intercept_s"], "portrait_slope_s": fit["portrait"]["slope_s"],
              "fixed_overhead_s": round(fixed, 4), "per_step_overhead_s": round(extra_steps / steps, 5),
              f"overhead_from_steps_at_{steps}_s": round(extra_steps, 4),
              "low_steps_baseline_s": _median(lo["plain"]), "low_steps_candidate_s": _median(lo["portrait"]),
              "timing": "comfyui execution_start->success at two step counts"}
    records = []
    if per_step:
        records.append({"name": "e2e_single_subject_per_step_vs_txt2img",
                        "ratio": round(statistics.median(per_step), 4),
                        "spread": [round(min(per_step), 4), round(max(per_step), 4)], "target": None,
                        "device": device, "config": common})
    records.append({"name": "e2e_single_subject_fixed_overhead_s", "value": round(fixed, 4), "device": device,
                    "summary": f"{fixed:.3f} s fixed + {extra_steps:.3f} s over {steps} steps "
                               f"(intercepts {fit['plain']['intercept_s']} -> {fit['portrait']['intercept_s']} s, "
                               f"slopes {fit['plain']['slope_s']} -> {fit['portrait']['slope_s']} s/step)",
                    "config": common})
    return records


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
    parser.add_argument("--low-steps", type=int, default=2,
                        help="second step count for the fixed / per-step split, below --steps (0: skip it)")
    parser.add_argument("--block-runs", type=int, default=3,
                        help="runs per side in the block-ordered measurement, the first of each left out (0: skip it)")
    parser.add_argument("--cache", choices=("lru", "classic"), default="lru",
                        help="the server's node cache: lru keeps both sides' node outputs between the "
                             "interleaved runs (a user's repeated generations); classic is ComfyUI's default")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.low_steps < 0:
        parser.error("--low-steps must be 0 (skip) or a step count below --steps")
    if args.block_runs == 1 or args.block_runs < 0:
        parser.error("--block-runs must be 0 (skip) or at least 2 (the first run of each block is left out)")
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
    low = args.low_steps if 0 < args.low_steps < steps else 0
    if args.low_steps and not low:
        print(f"# --low-steps {args.low_steps} is not below --steps {steps}: no fixed / per-step split",
              file=sys.stderr)
    photo = Path(args.photo) if args.photo else host.photos_dir() / "obama.jpg"
    if not photo.is_file():
        raise SystemExit(f"e2e_workflow: no reference photo at {photo}; run scripts/setup_host.sh or pass --photo")
    threads = os.environ["OMP_NUM_THREADS"]
    work = Path(tempfile.mkdtemp(prefix="pb_e2e_"))
    start = time.perf_counter()
    paths = build_models(work, args.full, rank)
    built_s = time.perf_counter() - start
    server = ComfyServer(work / "server", python=sys.executable, extra_model_paths=paths, cpu=not cuda,
                         extra_args=server_args(work, args.cache))
    phases = {"build_models": round(built_s, 1)}

    def phase(name: str, since: float) -> float:
        """Record and print how long a phase took (for run_all.py's budget); returns now."""
        phases[name] = round(time.perf_counter() - since, 1)
        print(f"# phase {name}: {phases[name]} s", file=sys.stderr, flush=True)
        return time.perf_counter()

    try:
        t = time.perf_counter()
        client = server.start(timeout=300)
        t = phase("server_start", t)
        clock = MessageClock(server.url, client.client_id)
        if clock.error:
            print(f"# no per-node times: {clock.error}", file=sys.stderr)
        log = LogTail(server.log_path)
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
                  "torch": stats.get("system", {}).get("pytorch_version"), "timing": "comfyui execution_start->success",
                  "server_cache": args.cache}
        print("# end-to-end: single-subject workflow vs txt2img through ComfyUI's HTTP API", file=sys.stderr)
        print(f"# device={device} " + " ".join(f"{k}={v}" for k, v in config.items())
              + f" build_s={built_s:.1f}", file=sys.stderr)
        client.upload_image(photo, name="e2e_ref.jpg")
        # Warm-up: loads both models and the face encoder (and, on a GPU, settles kernels and clocks).
        for k in range(2 if args.full else 1):
            plain, portrait = graphs(size, steps, 1000 + k, PROMPT.format(k=f"w{k}"), "e2e_ref.jpg", "warm")
            run_timed(client, plain, ())
            run_timed(client, portrait, ())
        t = phase("warm_up", t)
        figures = (("e2e_single_subject_vs_txt2img", False, 1.05),
                   ("e2e_single_subject_new_photo_vs_txt2img", True, None))
        interleaved = []
        for fig, (name, new_photo, target) in enumerate(figures):
            ratios, base, cand = [], [], []
            runs: dict[str, list[Run]] = {"plain": [], "portrait": []}
            for k in range(args.pairs):
                image = "e2e_ref.jpg"
                if new_photo:  # same bytes under a new name: LoadImage and face analysis run again
                    image = client.upload_image(photo, name=f"e2e_ref_{k}.jpg")
                # A prompt never used before (on both sides): ComfyUI must encode and sample again.
                plain, portrait = graphs(size, steps, k, PROMPT.format(k=f"f{fig}p{k}"), image, name)
                runs["plain"].append(run_timed(client, plain, ("2", "5"), clock, log))
                runs["portrait"].append(run_timed(client, portrait, ("6", "9") + (("3", "5") if new_photo else ()),
                                                  clock, log))
                b, c = runs["plain"][-1].seconds, runs["portrait"][-1].seconds
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
            if new_photo:
                record.update(face_analysis_split(runs["portrait"], base))
            print(json.dumps(record), flush=True)
            print(json.dumps(nodes_record(name.replace("_vs_txt2img", "_nodes"), runs, device,
                                          {**config, "new_photo_each_pair": new_photo, "pairs": args.pairs}, clock)),
                  flush=True)
            interleaved.append((record, base, cand))
            t = phase(name, t)
        if low:  # the same pairs at `low` steps: with the pairs above, two points per side
            lo: dict[str, list[float]] = {"plain": [], "portrait": []}
            for k in range(args.pairs):
                plain, portrait = graphs(size, low, k, PROMPT.format(k=f"lo{k}"), "e2e_ref.jpg", "low")
                lo["plain"].append(run_timed(client, plain, ("2", "5"), clock, log).seconds)
                lo["portrait"].append(run_timed(client, portrait, ("6", "9"), clock, log).seconds)
            _, base, cand = interleaved[0]
            for record in step_cost_records({"plain": base, "portrait": cand}, lo, steps, low, device, config):
                print(json.dumps(record), flush=True)
            t = phase("low_steps", t)
        if args.block_runs:  # each side's runs back to back: no switch of model inside a block
            blocks: dict[str, list[Run]] = {"plain": [], "patch_only": [], "portrait": []}
            for side, side_runs in blocks.items():
                for k in range(args.block_runs):
                    plain, portrait = graphs(size, steps, k, PROMPT.format(k=f"b{side}{k}"), "e2e_ref.jpg", "blocks")
                    graph = {"plain": plain, "patch_only": patch_only_graph(portrait), "portrait": portrait}[side]
                    must_run = ("2", "5") if side == "plain" else ("6", "9")
                    side_runs.append(run_timed(client, graph, must_run, clock, log))
            settled = {side: side_runs[1:] for side, side_runs in blocks.items()}
            head = interleaved[0][0]
            block_config = {
                **config, "order": f"{args.block_runs} txt2img, {args.block_runs} patch-only, "
                                   f"{args.block_runs} workflow; the first of each block left out",
                "pairs": args.block_runs - 1,
                "first_run_of_block_s": {side: round(r[0].seconds, 4) for side, r in blocks.items()},
                "first_run_model_loads": {side: sum("Requested to load" in line for line in r[0].loads)
                                          for side, r in blocks.items()},
                "interleaved": {"ratio": head["ratio"], "baseline_s": head["config"]["baseline_s"],
                                "candidate_s": head["config"]["candidate_s"]}}
            secs = {side: [r.seconds for r in side_runs] for side, side_runs in settled.items()}
            for name, side in (("e2e_single_subject_vs_txt2img_blocks", "portrait"),
                               ("e2e_unet_patch_only_vs_txt2img_blocks", "patch_only")):
                print(json.dumps(ratio_record(name, secs["plain"], secs[side], device, block_config)), flush=True)
            print(json.dumps(nodes_record("e2e_blocks_nodes", settled, device, block_config, clock)), flush=True)
            t = phase("blocks", t)
        if cuda:
            vram = client.get_json("/system_stats")["devices"][0]
            print(json.dumps({"name": "e2e_server_vram_in_use_mb", "value": round(
                (vram.get("torch_vram_total", 0) - vram.get("torch_vram_free", 0)) / 2**20, 1),
                "device": device, "config": {**config, "what": "CUDA memory allocated in the server after "
                                                              "both workflows (both models loaded)"}}), flush=True)
        print(json.dumps({"name": "e2e_run_seconds", "value": round(time.perf_counter() - start, 1), "device": device,
                          "config": {**config, "phases_s": phases, "pairs": args.pairs, "low_steps": low,
                                     "block_runs": args.block_runs}}), flush=True)
    except Exception:
        print(f"--- server log tail ---\n{server.log_tail(40)}", file=sys.stderr)
        raise
    finally:
        server.stop()
        if not args.keep:  # links, uploads and outputs only: the stand-ins stay in the cache
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
