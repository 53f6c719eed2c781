"""The collapse study (`python -m evidence --collapse-study`, issue 23): how often does a
run's identity token die, with the paper's L_loc and with the log floor, and does the
training's collapse alarm say so?

Per seed, from the seed's pretrained base (runs.py), three fine-tunings (runs.STUDY):
  full           the paper's L_loc at the evidence's weights (lambda = mu = 1): the "full" row
  log_floor      the same with loc_floor=log (a floor on log-attention that keeps a gradient)
  paper_weights  the paper's L_loc at the paper's own weights (lambda 0.001, mu 0.01)
(`--only ...,log_floor_paper_weights` adds the log floor at the paper's weights.) Each is
measured on the held-out renderings as the ablation rows are (measure.py), and the
collapse alarm (training/run/health.py, at its default settings) watches every step.

A run has collapsed when, on the held-out batch, the identity token's mean attention in the
face is below the default collapse_threshold in every layer group: the alarm's own rule,
read once after training, so the table also shows whether the alarm agrees.
"""
from __future__ import annotations

from .report import _cell, layers_at_floors
from .runs import STUDY, STUDY_EXTRA, STUDY_LABELS


def threshold() -> float:
    from training.config import TrainConfig

    return TrainConfig().collapse_threshold


def identity_face(metrics: dict) -> float:
    """Held-out: the identity token's highest mean attention in the face over the layer groups."""
    health = metrics["ecac"]["health"]
    faces = [v for k, v in health.items() if k.startswith("attn/identity/") and k.endswith("/face")]
    return max(faces) if faces else float("nan")


def collapsed(metrics: dict, limit: float | None = None) -> bool:
    return identity_face(metrics) < (threshold() if limit is None else limit)


def alarm_step(metrics: dict, token: str = "identity") -> int | None:
    steps = [a["step"] for a in metrics.get("alarms", []) if a["token"] == token]
    return min(steps) if steps else None


def _seeds(by_seed: dict[int, dict[str, dict]], name: str, test) -> str:
    hits = [str(seed) for seed, results in by_seed.items() if name in results and test(results[name])]
    total = sum(name in results for results in by_seed.values())
    return f"{len(hits)} of {total}" + (f" (seed {', '.join(hits)})" if hits else "")


def markdown(by_seed: dict[int, dict[str, dict]]) -> str:
    """One row per study run over the seeds; number cells are the mean [min, max]."""
    limit = threshold()
    head = (f"| run | collapsed (held-out identity attention in the face < {limit:g} in every layer group) "
            f"| identity alarm in training (first step) | STEA: loss margin, other vs own embedding "
            f"| ECAC: identity attention in face / face share | ECAC: expression attention in face (gamma) "
            f"| layers at both floors in the face core | held-out identity attention in the face (best group) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name in (*STUDY, *STUDY_EXTRA):
        runs = {seed: results[name] for seed, results in by_seed.items() if name in results}
        if not runs:
            continue
        ms = list(runs.values())
        steps = [f"{seed}: {alarm_step(m)}" for seed, m in runs.items() if alarm_step(m) is not None]
        alarms = _seeds(by_seed, name, lambda m: alarm_step(m) is not None)
        gamma = ms[0]["ecac"]["gamma"]
        lines.append(
            f"| {STUDY_LABELS[name]} | {_seeds(by_seed, name, collapsed)} "
            f"| {alarms}{' at step ' + ', '.join(steps) if steps else ''} "
            f"| {_cell([100 * m['stea']['margin'] for m in ms], '+.1f')} % "
            f"| {_cell([m['ecac']['identity_concentration'] for m in ms], '.2f')}x "
            f"| {_cell([m['ecac']['expression_mean_in_mask'] for m in ms], '.3f')} ({gamma}) "
            f"| {_cell([float(layers_at_floors(m['ecac'])) for m in ms], '.1f')} of {ms[0]['ecac']['layers']} "
            f"| {_cell([identity_face(m) for m in ms], '.2g')} |")
    return "\n".join(lines)


def summary(by_seed: dict[int, dict[str, dict]]) -> dict:
    """Per run and seed: collapsed, the first identity and expression alarms, the STEA margin."""
    return {name: {seed: {"collapsed": collapsed(results[name]), "identity_face": identity_face(results[name]),
                          "identity_alarm_step": alarm_step(results[name]),
                          "expression_alarm_step": alarm_step(results[name], "expression"),
                          "stea_margin": results[name]["stea"]["margin"]}
                   for seed, results in by_seed.items() if name in results}
            for name in (*STUDY, *STUDY_EXTRA) if any(name in results for results in by_seed.values())}
