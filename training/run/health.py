"""The collapse alarm of a training run (issue 23): the identity and expression tokens'
attention in the face, watched at every logged step (portraitbooth_core.ecac.health).

A token whose mean attention in the face stays below `collapse_threshold` in every layer
group for `collapse_patience` logged steps in a row is dead: the paper's L_loc cannot bring
it back, and the loss terms do not show it. The alarm says so with the numbers, the step
and what to do; on_collapse=stop then ends the run with a checkpoint saved
(TrainingCollapsedError), on_collapse=warn logs it and goes on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from portraitbooth_core.ecac.health import CollapseAlarm, CollapseMonitor, read_health

from ..config import TrainConfig

ALARM_KEY = "alarm"  # a metrics record's alarm text (metrics.jsonl; the DIP Trainer's report)


class TrainingCollapsedError(RuntimeError):
    """on_collapse=stop ended the run at a collapse alarm; the message has the numbers, the
    checkpoint saved and what to do."""


def monitor(config: TrainConfig) -> CollapseMonitor:
    """The run's dead-token monitor, with its collapse_threshold and collapse_patience."""
    return CollapseMonitor(config.collapse_threshold, config.collapse_patience)


def advice(alarm: CollapseAlarm, config: TrainConfig, stopping: bool = False) -> str:
    """What to do about a dead token, in settings both `--set` and extra_settings take."""
    weight = "ecac_lambda" if alarm.token == "identity" else "ecac_mu"
    if config.loc_floor == "paper":
        why = ("L_loc's paper floor cannot bring it back: the softmax passes the floor's pull to the token's logit as "
               "A (1 - A), which has vanished")
        first = "with loc_floor=log (a floor on log-attention that keeps a gradient; not the paper's)"
    else:
        why = "the log floor still pulls on it, yet the token stays dead"
        first = "after checking the dataset's face masks and the captions' class words"
    switch = "" if stopping else "; on_collapse=stop ends a run at this alarm, collapse_threshold=0 turns the alarm off"
    return (f"{why}. What to do: train again (in a new run folder, or over this one with overwrite) {first}, or "
            f"with a lower lr (now {config.learning_rate:g}) or {weight} (now {getattr(config, weight):g}){switch}.")


def alarm_text(alarm: CollapseAlarm, config: TrainConfig, stopping: bool = False) -> str:
    """The alarm's numbers and what to do, as the warning and metrics.jsonl's `alarm` say them."""
    return f"{alarm.describe()}. {advice(alarm, config, stopping)}"


def stop_text(alarms: Iterable[CollapseAlarm], config: TrainConfig, checkpoint: Path | None, step: int) -> str:
    """TrainingCollapsedError's message: where the run stopped, its checkpoint, each alarm and the fix."""
    saved = f"its checkpoint {checkpoint} is saved" if checkpoint else "its checkpoint is saved"
    return (f"on_collapse=stop: the run in {config.output} stopped at step {step} of {config.steps}; {saved} and no "
            f"weight file was exported. " + " ".join(alarm_text(a, config, stopping=True) for a in alarms))


def compact(values: Mapping[str, object]) -> str:
    """One short line: per token and layer group its attention in the face and its
    concentration (share in the face / the face's area share), e.g.
    `identity input 0.012/0.9x output 0.80/3.1x; expression output 0.09/2.0x`."""
    parts = []
    for token, groups in read_health(values).items():
        cells = " ".join(f"{g} {v['face']:.2g}/{v.get('conc', float('nan')):.1f}x" for g, v in groups.items()
                         if "face" in v)
        parts.append(f"{token} {cells}")
    return "; ".join(parts)


def token_faces(values: Mapping[str, object]) -> dict[str, float]:
    """Per token its highest attention in the face over the layer groups (what the alarm reads)."""
    return {token: max(v["face"] for v in groups.values() if "face" in v)
            for token, groups in read_health(values).items() if any("face" in v for v in groups.values())}


def alarm_lines(records: list[dict]) -> list[str]:
    """The collapse alarms of a run's metrics records (metrics.jsonl), oldest first."""
    return [str(r[ALARM_KEY]) for r in records if r.get(ALARM_KEY)]


def attention_line(records: list[dict]) -> str | None:
    """The latest logged attention in the face (share / concentration per layer group), or
    None when no logged step measured it."""
    latest = next((r for r in reversed(records) if read_health(r)), None)
    if latest is None:
        return None
    return f"attention in the face at step {latest['step']} (mean share / x the face's area share): {compact(latest)}"


__all__ = ["ALARM_KEY", "TrainingCollapsedError", "advice", "alarm_lines", "alarm_text", "attention_line",
           "compact", "monitor", "stop_text", "token_faces"]
