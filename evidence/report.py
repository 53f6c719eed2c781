"""The evidence run's claims as checks with stated margins, and its Table-6-style report.

STEA and ECAC are checked on one run's metrics alone, so the same check runs on the
ablated run too: that the run without the component fails its own check is the proof
that the check measures the component and not something every run has. DIP's claim is
a comparison ("higher with L_id than without"), so its check takes the run without L_id
as the baseline; with L_id switched off the two runs are the same run and the gain is 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from .runs import ABLATIONS, LABELS

# The stated margins. STEA: held-out denoising loss (face region) with another
# identity's embedding at least this much higher (relative) than with the right one.
STEA_MIN_MARGIN = 0.02
# ECAC: the identity token's attention mass inside the face at least this many times
# the mask's share of the image (1.0 = spread evenly over the image).
ECAC_MIN_CONCENTRATION = 1.5
# ECAC floors: L_loc's truncated terms stop pulling at beta (identity) and gamma
# (expression), so a trained layer sits at the floor from below; "at the floor" is
# within this factor of it, in the face core, with the identity token near 0 outside.
FLOOR_FACTOR = 0.9
OUTSIDE_MAX = 0.05
# DIP: recognizer cosine of decoded one-step estimates (t <= 250) at least this much
# above the same run trained without L_id.
DIP_MIN_GAIN = 0.005


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float
    bound: str

    def __str__(self) -> str:
        return f"{self.name}: {self.value:.4f} (needs {self.bound}) -> {'pass' if self.passed else 'FAIL'}"


def stea_check(metrics: dict) -> Check:
    margin = metrics["stea"]["margin"]
    return Check("STEA carries identity (loss margin, other identity's vs own embedding)", margin >= STEA_MIN_MARGIN,
                 margin, f">= {STEA_MIN_MARGIN}")


def ecac_check(metrics: dict) -> Check:
    value = metrics["ecac"]["identity_concentration"]
    return Check("ECAC places attention (identity mass in face / face share)", value >= ECAC_MIN_CONCENTRATION,
                 value, f">= {ECAC_MIN_CONCENTRATION}")


def layers_at_floors(ecac: dict) -> int:
    """Layers where, in the face core, the identity token holds ~beta and the expression
    token ~gamma of the attention, and the identity token is ~absent outside the face."""
    return sum(v["identity_core"] >= FLOOR_FACTOR * ecac["beta"] and v["expression_core"] >= FLOOR_FACTOR * ecac["gamma"]
               and v["identity_outside"] <= OUTSIDE_MAX for v in ecac["per_layer"].values())


def ecac_floors_check(metrics: dict) -> Check:
    e = metrics["ecac"]
    value = layers_at_floors(e)
    return Check(f"ECAC reaches its floors (of {e['layers']} layers: identity >= {FLOOR_FACTOR} * {e['beta']}, "
                 f"expression >= {FLOOR_FACTOR} * {e['gamma']} in the face core, identity <= {OUTSIDE_MAX} outside)",
                 value >= 1, value, ">= 1")


def dip_check(metrics: dict, without_dip: dict) -> Check:
    gain = metrics["dip"]["similarity"] - without_dip["dip"]["similarity"]
    return Check("DIP raises identity (z0_hat cosine gain over the run without L_id)", gain >= DIP_MIN_GAIN,
                 gain, f">= {DIP_MIN_GAIN}")


DIRECTION = {"no_stea": ("stea", "margin"), "no_ecac": ("ecac", "identity_concentration"),
             "no_dip": ("dip", "similarity")}


def directions(results: dict[str, dict]) -> dict[str, bool]:
    """Paper's Table 6 direction: removing a component lowers its own metric."""
    out = {}
    for name, (group, key) in DIRECTION.items():
        if name in results and "full" in results:
            out[name] = results[name][group][key] < results["full"][group][key]
    return out


def checks(results: dict[str, dict]) -> dict[str, dict[str, Check]]:
    """Per run: STEA and ECAC on every run; DIP on every run that trains with L_id, against no_dip."""
    out: dict[str, dict[str, Check]] = {}
    for name, m in results.items():
        out[name] = {"stea": stea_check(m), "ecac": ecac_check(m), "ecac_floors": ecac_floors_check(m)}
        if "no_dip" in results and name != "no_dip":
            out[name]["dip"] = dip_check(m, results["no_dip"])
    return out


def summary(by_seed: dict[int, dict[str, dict]]) -> dict:
    return {"checks": {seed: {name: {k: str(c) for k, c in cs.items()} for name, cs in checks(results).items()}
                       for seed, results in by_seed.items()},
            "directions": {seed: directions(results) for seed, results in by_seed.items()}}


def _cell(values: list[float], fmt: str) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def markdown(by_seed: dict[int, dict[str, dict]]) -> str:
    """One row per run; with several seeds each cell is the mean [min, max]."""
    head = ("| run | STEA: loss margin, other vs own embedding | ECAC: identity attention in face / face share "
            "| ECAC: expression attention in face (gamma) | ECAC: layers at both floors in the face core "
            "| DIP: z0_hat identity cosine (clean target) |")
    lines = [head, "|---|---|---|---|---|---|"]
    for name in ABLATIONS:
        runs = [results[name] for results in by_seed.values() if name in results]
        if not runs:
            continue

        def values(group: str, key: str, scale: float = 1.0) -> list[float]:
            return [scale * m[group][key] for m in runs]

        floors = [float(layers_at_floors(m["ecac"])) for m in runs]

        gamma = runs[0]["ecac"]["gamma"]
        lines.append(f"| {LABELS[name]} | {_cell(values('stea', 'margin', 100), '+.1f')} % "
                     f"| {_cell(values('ecac', 'identity_concentration'), '.2f')}x "
                     f"| {_cell(values('ecac', 'expression_mean_in_mask'), '.3f')} ({gamma}) "
                     f"| {_cell(floors, '.1f')} of {runs[0]['ecac']['layers']} "
                     f"| {_cell(values('dip', 'similarity'), '.3f')} ({_cell(values('dip', 'clean_similarity'), '.3f')}) |")
    return "\n".join(lines)
