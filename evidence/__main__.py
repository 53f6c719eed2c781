"""`python -m evidence [--quick] [--seeds 0,1,2] [--jobs 2] [--out DIR]`: pretrain the
tiny base once per seed, fine-tune it four times (full / w/o STEA / w/o DIP / w/o ECAC)
on the synthetic identity task and print the Table-6-style comparison (Markdown), the
checks and the metrics (JSON). See evidence/__init__.py. With --warm-start: the
FastComposer warm-start comparison instead (evidence/warm.py); with --collapse-study: the
collapse study instead (evidence/collapse.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evidence", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed (the first of --seeds): what the tests run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each builds its own world and base")
    p.add_argument("--steps", type=int, help="fine-tuning steps per run (default 600)")
    p.add_argument("--only", help="comma-separated runs among full,no_stea,no_dip,no_ecac "
                                  "(with --collapse-study: among full,log_floor,paper_weights,log_floor_paper_weights)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, in processes of one thread each (2 on a 2-core machine)")
    p.add_argument("--warm-start", action="store_true",
                   help="instead of the ablation rows: cold full run vs runs warm-started from a FastComposer-style "
                        "teacher (init_unet + stage 0; warm.py); writes evidence_warm_start.{md,json}")
    p.add_argument("--warm-steps", type=int, help="steps of each warm-started run (default: a third of --steps)")
    p.add_argument("--collapse-study", action="store_true",
                   help="instead of the ablation rows: per seed the full run (paper L_loc, lambda = mu = 1), the same "
                        "with loc_floor=log, and the paper's weights (lambda 0.001, mu 0.01); how many runs' identity "
                        "token dies and whether the collapse alarm says so; writes evidence_collapse.{md,json}")
    p.add_argument("--pretrain-steps", type=int,
                   help="steps of each seed's pretrained base (default 1000; fewer only for a smoke run: another "
                        "base is another experiment)")
    p.add_argument("--out", type=Path, help="folder for evidence.json and evidence.md")
    p.add_argument("--work", type=Path, help="folder for the generated checkpoints, recognizers, data and bases, "
                                             "one subfolder per seed; reused when run again (default: temporary)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: oversubscription is far slower
    from headless.comfyui import find_comfyui, import_comfyui

    import_comfyui(cpu=True, path=find_comfyui())

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from . import report
    from .runs import ABLATIONS

    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    if args.warm_start:
        return warm_start_main(args, seeds)
    if args.collapse_study:
        return collapse_main(args, seeds)
    names = args.only.split(",") if args.only else list(ABLATIONS)
    by_seed, plans, seconds = _run_seeds(args, seeds, names)
    print(f"{len(seeds) * len(names)} runs in {seconds:.0f} s", file=sys.stderr, flush=True)
    data = {"plans": plans, "results": by_seed, **report.summary(by_seed)}
    return _publish(args, "evidence", report.markdown(by_seed), data, data["checks"])


def _publish(args: argparse.Namespace, stem: str, table: str, data: dict, shown) -> int:
    """Print the table and `shown`; with --out, write <stem>.md and <stem>.json (all of data)."""
    print(table)
    print(json.dumps(shown, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.md").write_text(table + "\n")
        (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    return 0


def _run_seeds(args: argparse.Namespace, seeds: list[int], names: list[str]) -> tuple[dict, dict, float]:
    """Every named run of every seed (each seed's world and base first): (results by seed,
    plans by seed, seconds)."""
    import dataclasses

    from .experiment import run_all

    start = time.perf_counter()
    by_seed, plans = {}, {}
    with tempfile.TemporaryDirectory(prefix="evidence-") as tmp:
        for seed in seeds:
            plan = _plan(args, seed)
            plans[seed] = dataclasses.asdict(plan)
            by_seed[seed] = run_all(plan, names, (args.work or Path(tmp)) / f"seed-{seed}", args.jobs, verbose=True)
    return by_seed, plans, time.perf_counter() - start


def _plan(args: argparse.Namespace, seed: int):
    import dataclasses

    from .runs import Plan

    return dataclasses.replace(Plan(), seed=seed, **({"steps": args.steps} if args.steps else {}),
                               **({"pretrain_steps": args.pretrain_steps} if args.pretrain_steps is not None else {}))


def collapse_main(args: argparse.Namespace, seeds: list[int]) -> int:
    from . import collapse
    from .runs import STUDY, STUDY_EXTRA

    names = args.only.split(",") if args.only else list(STUDY)
    unknown = sorted(set(names) - set(STUDY) - set(STUDY_EXTRA))
    if unknown:
        print(f"error: --only {','.join(unknown)}: the collapse study's runs are {', '.join(STUDY + STUDY_EXTRA)}",
              file=sys.stderr)
        return 2
    by_seed, plans, seconds = _run_seeds(args, seeds, names)
    print(f"collapse study: {len(seeds) * len(names)} runs in {seconds:.0f} s", file=sys.stderr, flush=True)
    data = {"plans": plans, "results": by_seed, "collapse_threshold": collapse.threshold(),
            "summary": collapse.summary(by_seed)}
    return _publish(args, "evidence_collapse", collapse.markdown(by_seed), data, data["summary"])


def warm_start_main(args: argparse.Namespace, seeds: list[int]) -> int:
    import dataclasses

    from . import warm

    start = time.perf_counter()
    by_seed, plans = {}, {}
    with tempfile.TemporaryDirectory(prefix="evidence-") as tmp:
        for seed in seeds:
            plan = _plan(args, seed)
            plans[seed] = dataclasses.asdict(plan)
            by_seed[seed] = warm.run_warm_start(plan, (args.work or Path(tmp)) / f"seed-{seed}", args.jobs,
                                                verbose=True, warm_steps=args.warm_steps)
    print(f"warm-start runs of {len(seeds)} seed(s) in {time.perf_counter() - start:.0f} s", file=sys.stderr,
          flush=True)
    checks = warm.checks(by_seed)
    return _publish(args, "evidence_warm_start", warm.markdown(by_seed),
                    {"plans": plans, "results": by_seed, "checks": checks}, checks)


if __name__ == "__main__":
    sys.exit(main())
