"""Shared method for every benchmark (see benchmarks.md in the shared notes).

A figure is a ratio against plain ComfyUI doing the same work in the same run: the two
sides are interleaved (A B A B ...), warmed up first, timed for at least 5 pairs, and
reported as the median ratio with its min-max spread, one JSON line per figure.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent


def use_repo() -> Path:
    """Make the repository's packages (benchmarks, headless, standins, ...) and the tests'
    fixture modules importable; returns the repository root.

    A benchmark run as `python benchmarks/<name>.py` has only benchmarks/ on sys.path, so
    each one starts with
        if not __package__:
            import harness
            harness.use_repo()
    The folders are appended, never prepended: ComfyUI's own `nodes` module must win over
    the pack's nodes/ folder.
    """
    for folder in (str(REPO), str(REPO / "tests")):
        if folder not in sys.path:
            sys.path.append(folder)
    return REPO


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def header(title: str, **config) -> None:
    import torch

    print(f"# {title}", file=sys.stderr)
    print(f"# device={device_name()} torch={torch.__version__} threads={torch.get_num_threads()} "
          + " ".join(f"{k}={v}" for k, v in config.items()), file=sys.stderr)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def compare(name: str, baseline: Callable[[], object], candidate: Callable[[], object],
            pairs: int = 5, warmup: int = 1, target: float | None = None,
            config: dict | None = None) -> dict:
    """Time candidate against baseline interleaved; print and return the JSON record."""
    for _ in range(warmup):
        baseline()
        candidate()
    ratios, base_times, cand_times = [], [], []
    for _ in range(pairs):
        b = timed(baseline)
        c = timed(candidate)
        base_times.append(b)
        cand_times.append(c)
        ratios.append(c / b)
    record = {
        "name": name,
        "ratio": round(statistics.median(ratios), 4),
        "spread": [round(min(ratios), 4), round(max(ratios), 4)],
        "target": target,
        "device": device_name(),
        "config": {**(config or {}), "pairs": pairs,
                   "baseline_s": round(statistics.median(base_times), 5),
                   "candidate_s": round(statistics.median(cand_times), 5)},
    }
    if target is not None:
        record["meets_target"] = record["ratio"] <= target
    print(json.dumps(record), flush=True)
    return record


def peak_memory_mb() -> float:
    """Peak CUDA allocation when on a GPU, else this process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
