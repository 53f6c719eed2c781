"""Run every benchmark script, one after the other, within one time budget.

Made for the GPU machine's single call (benchmarks/gpu_all.sh), where the whole run
must end inside a fixed time: each script runs in its own process with a time limit
(its own budget, never past the overall deadline). A script that fails or runs out of
time is reported and the next one still runs. Every JSON line the scripts print is
printed here and appended to a .jsonl file; each script's outcome gets a line too:
  {"script": ..., "status": "ok" | "failed" | "timeout" | "skipped", "seconds": ..., "error": ...}

    python benchmarks/run_all.py [--quick] [--only ecac_cost,e2e_workflow] [--total-s 480]
                                 [--jsonl PATH]

Full mode (default) is every script's --full; --quick (or PB_BENCH_QUICK=1) runs their
quick modes instead. The .jsonl goes to --jsonl, else $OUT/bench.jsonl when OUT is set.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass
class Bench:
    script: str
    budget_s: int  # the most this script may take in full mode on a GPU
    full: list[str] = field(default_factory=lambda: ["--full"])
    quick: list[str] = field(default_factory=list)
    gpu_extra: list[str] = field(default_factory=list)  # added in full mode when CUDA is there


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def benches(cuda: bool) -> list[Bench]:
    """In priority order: the figures still missing on a GPU come first."""
    face_full = ["--full", "--provider", "auto"]
    if cuda:
        face_full += ["--torch-device", "cuda"]
    face_quick = []
    # dlib's recognizer needs dlib and its weights package (~100 MB); skipped where absent.
    if not (has_module("dlib") and has_module("face_recognition_models")):
        face_full.append("--no-dlib")
        face_quick.append("--no-dlib")
    return [
        # One UNet evaluation or text encode takes milliseconds on a GPU: more pairs cost little.
        Bench("ecac_cost.py", 75, gpu_extra=["--pairs", "15"]),
        Bench("dispatch_budget.py", 60, full=[]),  # counts, not timings: no --full mode
        # 150 s for the interleaved figures + ~45 s for the 2-step pairs and the block-ordered
        # runs that break the time down (its e2e_run_seconds record gives each phase's seconds).
        Bench("e2e_workflow.py", 210),
        Bench("stea_cost.py", 75, gpu_extra=["--pairs", "15"]),
        # SDXL: builds a full-size random SDXL UNet (~30 s) before its figures.
        Bench("photomaker_cost.py", 120),
        # PhotoMaker v2 template vs SDXL txt2img through a server. Quick mode: 130 s for 3 pairs
        # on a 2-core CPU (build 12, server 12, warm-up 52, pairs 17 s each). Full mode: its
        # --budget-s takes fewer pairs when the builds (~1 min on a fresh machine, estimated;
        # the SDXL stand-in comes from photomaker_cost.py's run) and warm-up leave too little time.
        Bench("e2e_photomaker.py", 120, full=["--full", "--budget-s", "100"]),
        Bench("regions_cost.py", 120),
        Bench("train_step.py", 120),
        Bench("face_timing.py", 90, full=face_full, quick=face_quick),
        # Training data path and dataset builder throughput (cluster issue's figures).
        Bench("data_path.py", 60),
        Bench("precompute_gain.py", 60),
        Bench("build_throughput.py", 60),
        # Evaluation fan-out, two CPU servers against one (~2 min on a busy 2-core CPU; it runs
        # CPU servers everywhere: the figure is about the fan-out, not the device). No --full mode.
        Bench("eval_fanout.py", 120, full=[]),
    ]


def run_one(bench: Bench, args: list[str], limit: float, sink) -> dict:
    """Run one script with a time limit; stream its output; return its outcome record."""
    cmd = [sys.executable, "-u", str(HERE / bench.script), *args]
    sink(f"### {bench.script} {' '.join(args)} (limit {limit:.0f} s)", json_line=False)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Own process group: a time-out ends the script and whatever it started in its group.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, errors="replace")
    tail: list[str] = []
    records = [0]

    def pump():
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            is_json = line.startswith("{")
            if is_json:
                try:
                    json.loads(line)
                    records[0] += 1
                except ValueError:
                    is_json = False
            if not is_json:
                tail.append(line)
                del tail[:-15]
            sink(line if is_json else f"[{bench.script}] {line}", json_line=is_json)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = "ok"
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        status = "timeout"
        _stop(proc)
    reader.join(timeout=10)
    seconds = round(time.perf_counter() - start, 1)
    if status == "ok" and proc.returncode != 0:
        status = "failed"
    record = {"script": bench.script, "args": args, "status": status, "seconds": seconds,
              "returncode": proc.returncode, "records": records[0]}
    if status != "ok":
        lines = [t for t in tail if t.strip()]
        # The exception line (Python's last traceback line) says most; else the last line.
        raised = [t for t in lines if re.match(r"^(\w+\.)*\w*(Error|Exception|Exit|Interrupt)\b", t)]
        if status == "timeout":
            record["error"] = f"no end within its {limit:.0f} s limit; stopped"
        else:
            record["error"] = (raised or lines or ["(no output)"])[-1]
        record["tail"] = lines[-8:]
    return record


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM first (e2e_workflow stops its ComfyUI server on it), SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("PB_BENCH_QUICK") == "1",
                        help="quick modes (CPU-sized) instead of --full")
    parser.add_argument("--only", default="", help="comma-separated script names (without .py) to run")
    parser.add_argument("--total-s", type=float, default=float(os.environ.get("PB_BENCH_TOTAL_S", 480)),
                        help="overall time budget in seconds")
    parser.add_argument("--jsonl", default=None, help="file the JSON lines are appended to")
    args = parser.parse_args()
    deadline = time.monotonic() + args.total_s

    import torch

    cuda = torch.cuda.is_available()
    jsonl = Path(args.jsonl) if args.jsonl else (Path(os.environ["OUT"]) / "bench.jsonl" if os.environ.get("OUT")
                                                 else None)
    out = open(jsonl, "a") if jsonl else None
    lock = threading.Lock()
    records: list[dict] = []

    def sink(line: str, json_line: bool) -> None:
        with lock:
            print(line, flush=True)
            if json_line:
                records.append(json.loads(line))
                if out:
                    out.write(line + "\n")
                    out.flush()

    chosen = [b for b in benches(cuda) if not args.only or b.script[:-3] in args.only.split(",")]
    if not chosen:
        parser.error(f"--only {args.only!r} matches no script")
    sink(json.dumps({"run_all": "start", "mode": "quick" if args.quick else "full", "cuda": cuda,
                     "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                     "python": sys.version.split()[0], "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                     "total_s": args.total_s, "scripts": [b.script for b in chosen]}), json_line=True)
    outcomes = []
    for i, bench in enumerate(chosen):
        remaining = deadline - time.monotonic()
        # Keep back a little time per later script so that each one at least gets to report.
        later = len(chosen) - i - 1
        limit = min(bench.budget_s if not args.quick else 1e9, remaining - 5 * later)
        script_args = bench.quick if args.quick else bench.full + (bench.gpu_extra if cuda else [])
        if limit < 20:
            outcome = {"script": bench.script, "args": script_args, "status": "skipped", "seconds": 0,
                       "error": f"only {max(remaining, 0):.0f} s of the {args.total_s:.0f} s budget left"}
        else:
            outcome = run_one(bench, script_args, limit, sink)
        outcomes.append(outcome)
        sink(json.dumps(outcome), json_line=True)

    # Summary last: the device tool returns only the end of the output.
    sink("### summary", json_line=False)
    for o in outcomes:
        sink(f"# {o['script']:<18} {o['status']:<8} {o['seconds']:>6} s"
             + (f"  {o.get('error', '')[:150]}" if o["status"] != "ok" else ""), json_line=False)
    for rec in list(records):
        if "ratio" in rec:
            sink(f"# {rec['name']:<46} {rec['ratio']:<7} {rec.get('spread')} target={rec.get('target')} "
                 f"base={rec.get('config', {}).get('baseline_s')} s", json_line=False)
        elif "value" in rec and "name" in rec:
            sink(f"# {rec['name']:<46} {rec['value']}" + (f"  {rec['summary']}" if "summary" in rec else ""),
                 json_line=False)
        elif "summary" in rec and "name" in rec:  # diagnostic records (e2e_workflow's per-node times)
            sink(f"# {rec['name']:<46} {rec['summary']}", json_line=False)
    if out:
        out.close()
    return 0 if all(o["status"] == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
