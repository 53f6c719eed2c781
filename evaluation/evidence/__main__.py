"""`python -m evaluation.evidence [--quick] [--out DIR]`: train the tiny model four times
(full / w/o STEA / w/o DIP / w/o ECAC) on the synthetic identity task and print the
Table-6-style comparison (Markdown) and the metrics (JSON). See evaluation/evidence/__init__.py."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation.evidence", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="~2-minute smoke run: 120 steps, fewer samples (too short for the effects to show)")
    p.add_argument("--steps", type=int, help="training steps per run (default: 300, --quick: 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated runs among full,no_stea,no_dip,no_ecac")
    p.add_argument("--out", type=Path, help="folder for evidence.json and evidence.md")
    p.add_argument("--work", type=Path, help="folder for the generated checkpoint, recognizer and data "
                                             "(default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: oversubscription is far slower
    from training.comfy_env import import_comfyui

    import_comfyui(cpu=True)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from . import report
    from .experiment import Experiment
    from .runs import ABLATIONS, Plan

    plan = Plan.quick() if args.quick else Plan()
    plan = dataclasses.replace(plan, seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    names = args.only.split(",") if args.only else list(ABLATIONS)
    with tempfile.TemporaryDirectory(prefix="evidence-") as tmp:
        experiment = Experiment(plan, args.work or Path(tmp))
        results = {}
        for name in names:
            start = time.perf_counter()
            results[name] = experiment.run(name)
            print(f"[{name}] {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    table = report.markdown(results)
    data = {"plan": dataclasses.asdict(plan), "results": results, **report.summary(results)}
    print(table)
    print(json.dumps(data, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "evidence.md").write_text(table + "\n")
        (args.out / "evidence.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
