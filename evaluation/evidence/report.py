"""The evidence run's claims as checks with stated margins, and its Table-6-style report.

Each check reads one run's metrics alone (no comparison with another run), so it can
be run on an ablated run too: that the ablated run fails its own check is the proof
that the check measures the component and not something every run has.
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
# DIP: recognizer cosine of decoded one-step estimates (t <= 250) within this of the
# clean target latent's cosine (what a perfect denoiser scores).
DIP_MAX_GAP = 0.03


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
    return Check("STEA carries identity (loss margin, shuffled vs true embedding)", margin >= STEA_MIN_MARGIN,
                 margin, f">= {STEA_MIN_MARGIN}")


def ecac_check(metrics: dict) -> Check:
    value = metrics["ecac"]["identity_concentration"]
    return Check("ECAC places attention (identity mass in face / face share)", value >= ECAC_MIN_CONCENTRATION,
                 value, f">= {ECAC_MIN_CONCENTRATION}")


def dip_check(metrics: dict) -> Check:
    gap = metrics["dip"]["clean_similarity"] - metrics["dip"]["similarity"]
    return Check("DIP raises identity (clean cosine - z0_hat cosine)", gap <= DIP_MAX_GAP, gap, f"<= {DIP_MAX_GAP}")


CHECKS = {"no_stea": stea_check, "no_ecac": ecac_check, "no_dip": dip_check}  # ablation -> the check it must fail
DIRECTION = {"no_stea": ("stea", "margin"), "no_ecac": ("ecac", "identity_concentration"),
             "no_dip": ("dip", "similarity")}


def directions(results: dict[str, dict]) -> dict[str, bool]:
    """Paper's Table 6 direction: removing a component lowers its own metric."""
    out = {}
    for name, (group, key) in DIRECTION.items():
        if name in results and "full" in results:
            out[name] = results[name][group][key] < results["full"][group][key]
    return out


def summary(results: dict[str, dict]) -> dict:
    checks = {name: {check.__name__: str(check(m)) for check in (stea_check, ecac_check, dip_check)}
              for name, m in results.items()}
    return {"checks": checks, "directions": directions(results)}


def markdown(results: dict[str, dict]) -> str:
    head = ("| run | STEA: loss margin, shuffled vs true embedding | ECAC: identity attention in face / face share "
            "| ECAC: expression attention in face (gamma) | DIP: z0_hat identity cosine (clean target) |")
    lines = [head, "|---|---|---|---|---|"]
    for name in ABLATIONS:
        if name not in results:
            continue
        m = results[name]
        s, e, d = m["stea"], m["ecac"], m["dip"]
        lines.append(f"| {LABELS[name]} | {100 * s['margin']:+.1f}% ({s['loss_true']:.4f} vs {s['loss_shuffled']:.4f}) "
                     f"| {e['identity_concentration']:.2f}x ({e['identity_share_in_mask']:.2f} / {e['mask_share']:.2f}) "
                     f"| {e['expression_mean_in_mask']:.3f} ({e['gamma']}) "
                     f"| {d['similarity']:.3f} ({d['clean_similarity']:.3f}) |")
    return "\n".join(lines)
