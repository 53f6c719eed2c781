"""The training package's public entry point for code that runs it in-process.

The DIP Trainer node (and any script) starts, or continues, a run here: settings in,
a step callback while it trains, the weight file and the metrics back. Nothing else of
the package is part of its contract with the nodes.

    result = run_training({"checkpoint": ..., "dataset": ..., "output": ..., "steps": 100},
                          on_step=lambda step, total, values: ..., export_to="me.safetensors")
    result.weights, result.step, result.metrics, loss_curve(result)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .config import TrainConfig, apply_overrides, load_config
from .dip_check import IdentityLossError  # noqa: F401 - part of the API: what check_identity_loss raises

# (step, total steps, that step's logged values: losses, lr, step_s)
StepCallback = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class RunResult:
    weights: Path | None    # the exported weight file (None on ranks other than 0)
    output: Path            # the run folder: checkpoints, metrics, validation images
    step: int               # the step the run stopped at
    metrics: list[dict]     # every logged step, oldest first


class SettingsError(ValueError):
    """Settings text or values that cannot be used; the message names the line or setting."""


class ResumeError(ValueError):
    """A run folder that cannot be continued with these settings (or whose checkpoint is unreadable)."""


# Settings that shape the trained parameters or the optimizer state: a run continues only
# with the same values (another value fails deep in torch with a shape or group error).
# init_unet: the weights the frozen part of a LoRA/frozen run sits on.
RESUME_SETTINGS = ("mode", "lora_rank", "lora_alpha", "lora_targets", "projector_hidden", "optimizer", "init_unet")


def settings_from_text(text: str, source: str = "extra_settings") -> dict[str, Any]:
    """`key=value` lines (blank lines and `#` comments skipped) -> the settings they change
    from the defaults. Errors name `source` and the line number as the user sees it."""
    base = TrainConfig()
    changed: dict[str, Any] = {}
    for number, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        if "\x00" in line:
            raise SettingsError(f"{where}: contains a NUL byte (\\x00); remove it.")
        if "=" not in line:
            raise SettingsError(f"{where}: {line[:80]!r} is not a setting; write one setting per line as "
                                f"name=value, e.g. save_every=50.")
        try:
            one = apply_overrides(base, [line])
        except ValueError as exc:
            raise SettingsError(f"{where}: {str(exc)[:600]}") from None
        key = line.split("=", 1)[0].strip()
        changed[key] = getattr(one, key)
    return {k: v for k, v in changed.items() if v != getattr(base, k)}


def check_dataset(folder: str | Path) -> int:
    """Before training: open the dataset's index and shard lists (every name in them checked
    to lie inside the folder) and return its sample count. Raises ValueError or
    PermissionError naming the file and field that is wrong."""
    from .shards import ShardReader

    reader = ShardReader(folder)
    try:
        return len(reader)
    finally:
        reader.close()


def check_identity_loss(settings: Mapping[str, Any], recognizer_roots: Iterable[str | Path] | None = None,
                        node: bool = False) -> Path | None:
    """Before training: the recognizer ONNX the identity loss will use (None: id_weight=0,
    said in one info line). Raises dip_check.IdentityLossError with the fix (a face pack,
    the `recognizer` setting or node input, or id_weight=0) when the dataset cannot feed it:
    built with dlib, or its recorded recognizer not found."""
    from .dip_check import identity_recognizer
    from .shards import ShardReader

    config = load_config(None, dict(settings))
    reader = ShardReader(config.dataset)
    try:
        face = reader.index.get("face_encoder")
    finally:
        reader.close()
    if not isinstance(face, dict):
        raise ValueError(f"{Path(config.dataset) / 'index.json'}: 'face_encoder' is missing; rebuild the dataset.")
    roots = None if recognizer_roots is None else [Path(r) for r in recognizer_roots]
    return identity_recognizer(face, config, roots, config.dataset, node)


def check_resume(settings: Mapping[str, Any]) -> int | None:
    """Before training: the step the run in settings["output"] would continue from (None: a
    new run). Raises ResumeError naming the checkpoint when the newest one cannot be read
    (instead of silently starting over), and naming each setting that differs from the
    saved run's (instead of a shape error from torch)."""
    from .checkpoint import list_checkpoints, load_checkpoint

    config = load_config(None, dict(settings))
    found = list_checkpoints(Path(config.output) / "checkpoints")
    if not found:
        return None
    newest = found[-1]
    try:
        state = load_checkpoint(newest)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ResumeError(
            f"the run's newest checkpoint {newest} cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'damaged'}). Delete that file to continue from the "
            f"checkpoint before it, or use another run name to start a new run.") from None
    saved = state.get("config") if isinstance(state, dict) else None
    if isinstance(saved, dict):
        new = config.to_dict()
        differ = [f"{k} {saved[k]!r} -> {new[k]!r}" for k in RESUME_SETTINGS if k in saved and saved[k] != new[k]]
        if differ:
            raise ResumeError(
                f"the run in {config.output} was trained with other settings ({'; '.join(differ)}), so it cannot "
                f"be continued with these. Use the run's settings to continue it, or another run name (or "
                f"output name) to start a new run.")
    return int(state.get("step", 0)) if isinstance(state, dict) else None


def changed_settings(lines: Iterable[str]) -> dict[str, Any]:
    """The settings that `key=value` lines change from the defaults (values parsed as in
    `--set`); unknown keys and bad values raise ValueError naming them."""
    base = TrainConfig()
    changed = apply_overrides(base, list(lines))
    return {k: v for k, v in changed.to_dict().items() if v != getattr(base, k)}


def run_training(settings: Mapping[str, Any], *, device: torch.device | None = None,
                 on_step: StepCallback | None = None, export_to: str | Path | None = None,
                 recognizer_roots: Iterable[str | Path] | None = None, node_words: bool = False) -> RunResult:
    """Train (or continue the run in settings["output"]) to settings["steps"] in this process.

    Gradients are on and torch's global RNG is left as it was, whatever the caller's
    context (ComfyUI executes nodes under inference mode). recognizer_roots: the folders
    holding face packs where the dataset's recorded recognizer may be found (a node passes
    ComfyUI's); None: the command line's defaults (shards.default_recognizer_roots).
    Call check_resume first to refuse a run that cannot be continued, and check_identity_loss
    to refuse a dataset that cannot feed the identity loss (the trainer refuses it too, with
    the fix in the node's words when node_words is set).
    """
    from .distributed import Dist
    from .metrics import read_metrics
    from .trainer import Trainer

    config = load_config(None, dict(settings))
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        roots = None if recognizer_roots is None else [Path(r) for r in recognizer_roots]
        trainer = Trainer(config, Dist(device=device or torch.device("cpu")), recognizer_roots=roots,
                          node_words=node_words)
        try:
            if on_step is not None:
                on_step(trainer.step, config.steps, {})
            weights = trainer.run(on_step, export_to)
            step = trainer.step
        finally:
            trainer.close()
    return RunResult(weights, Path(config.output), step, read_metrics(config.output))


def loss_curve(result: RunResult) -> np.ndarray:
    """The run's loss curve as an RGB uint8 image (H, W, 3)."""
    from .curve import loss_curve as draw

    return draw(result.metrics)
