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
from .run.dip_check import IdentityLossError  # noqa: F401 - part of the API: what check_identity_loss raises
from .run.ownership import RESULT_SETTINGS, ResumeError  # noqa: F401 - part of the API: what check_resume raises
from .run.ownership import RunInUseError  # noqa: F401 - part of the API: run_training's ResumeError for a busy folder

# (step, total steps, that step's logged values: losses, lr, step_s)
StepCallback = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class RunResult:
    weights: Path | None    # the exported weight file (None on ranks other than 0)
    output: Path            # the run folder: checkpoints, metrics, validation images
    step: int               # the step the run stopped at
    metrics: list[dict]     # every logged step, oldest first
    notes: tuple[str, ...] = ()  # what overwrite did: a run started over, taken over, its checkpoints pruned


class SettingsError(ValueError):
    """Settings text or values that cannot be used; the message names the line or setting."""


# Settings a run continues only with (every TrainConfig field but a few logistics ones:
# run/ownership.py LOGISTICS); micro_batch and grad_accum through the global batch they make.
RESUME_SETTINGS = RESULT_SETTINGS


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


def check_dataset(folder: str | Path, *, index_cache: str | Path | None = None, precomputed: bool = True) -> int:
    """Before training: open the dataset's index, shard lists and compact index and, with
    precomputed, its precomputed manifest and side-file headers (every name in them checked
    to lie inside the folder, every JSON bounded in size and depth) and return its sample
    count. Raises ValueError (BadInputError) or PermissionError naming the file and field
    that is wrong, the same whether or not a file the name points at exists.

    index_cache: the folder where the compact index is made and kept (the DIP Trainer node
    passes one in ComfyUI's temp folder, so nothing is written into a dataset under input/;
    pass the same to run_training and check_identity_loss). None: beside the dataset when
    it is writable (the command line's choice: the user's own folder)."""
    from .dataset.precomputed import check_files
    from .dataset.shards import ShardReader

    reader = ShardReader(folder, index_cache=index_cache)
    try:
        if precomputed:
            check_files(reader)
        return len(reader)
    finally:
        reader.close()


def check_identity_loss(settings: Mapping[str, Any], recognizer_roots: Iterable[str | Path] | None = None,
                        node: bool = False, index_cache: str | Path | None = None) -> Path | None:
    """Before training: the recognizer ONNX the identity loss will use (None: id_weight=0,
    said in one info line). Raises dip_check.IdentityLossError with the fix (a face pack,
    the `recognizer` setting or node input, or id_weight=0) when the dataset cannot feed it:
    built with dlib, or its recorded recognizer not found."""
    from .run.dip_check import identity_recognizer
    from .dataset.shards import ShardReader

    config = load_config(None, dict(settings))
    reader = ShardReader(config.dataset, index_cache=index_cache)
    try:
        face = reader.index.get("face_encoder")
    finally:
        reader.close()
    if not isinstance(face, dict):
        raise ValueError(f"{Path(config.dataset) / 'index.json'}: 'face_encoder' is missing; rebuild the dataset.")
    roots = None if recognizer_roots is None else [Path(r) for r in recognizer_roots]
    return identity_recognizer(face, config, roots, config.dataset, node)


def check_resume(settings: Mapping[str, Any], *, owner: str | None = None, overwrite: bool = False,
                 node_words: bool = False) -> int | None:
    """Before training: the step the run in settings["output"] would continue from (None: a
    new run, or one that overwrite starts over). Raises ResumeError naming the checkpoint
    when the newest one cannot be read (instead of silently starting over); and, unless
    overwrite is on, naming the run's owner when it is not `owner` (None: not checked) and
    each result-changing setting (RESUME_SETTINGS) that differs from the run's, recorded and
    now, with the way on (in the DIP Trainer's words when node_words is set). Changes nothing."""
    from .run.checkpoint import list_checkpoints, load_checkpoint
    from .run.ownership import inspect_run

    config = load_config(None, dict(settings))
    found = list_checkpoints(Path(config.output) / "checkpoints")
    if not found:
        refusal = inspect_run(config, owner).refusal(overwrite, "node" if node_words else "api")
        if refusal:  # another owner's run that has not saved yet
            raise ResumeError(refusal)
        return None
    newest = found[-1]
    try:
        state = load_checkpoint(newest)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ResumeError(
            f"the run's newest checkpoint {newest} cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'damaged'}). Delete that file to continue from the "
            f"checkpoint before it, or use another run name to start a new run.") from None
    claim = inspect_run(config, owner)
    refusal = claim.refusal(overwrite, "node" if node_words else "api")
    if refusal:
        raise ResumeError(refusal)
    if not claim.continues(overwrite):
        return None
    return int(state.get("step", 0)) if isinstance(state, dict) else None


def changed_settings(lines: Iterable[str]) -> dict[str, Any]:
    """The settings that `key=value` lines change from the defaults (values parsed as in
    `--set`); unknown keys and bad values raise ValueError naming them."""
    base = TrainConfig()
    changed = apply_overrides(base, list(lines))
    return {k: v for k, v in changed.to_dict().items() if v != getattr(base, k)}


def run_training(settings: Mapping[str, Any], *, device: torch.device | None = None,
                 on_step: StepCallback | None = None, export_to: str | Path | None = None,
                 recognizer_roots: Iterable[str | Path] | None = None, node_words: bool = False,
                 owner: str | None = None, overwrite: bool = False,
                 index_cache: str | Path | None = None) -> RunResult:
    """Train (or continue the run in settings["output"]) to settings["steps"] in this process.

    The run folder belongs to the run that made it (run/ownership.py): it continues only as
    `owner` (the DIP Trainer's output_name; None: not checked) and with its result-changing
    settings, else ResumeError as check_resume says. With overwrite, another owner takes the
    run over and other settings start it over; RunResult.notes says so, and which of the
    previous owner's checkpoints keep_last deleted. A folder another live run holds (its
    run.lock) is refused with RunInUseError, a ResumeError naming that run.

    Gradients are on and torch's global RNG is left as it was, whatever the caller's
    context (ComfyUI executes nodes under inference mode). recognizer_roots: the folders
    holding face packs where the dataset's recorded recognizer may be found (a node passes
    ComfyUI's); None: the command line's defaults (shards.default_recognizer_roots).
    index_cache: where the dataset's compact index is kept (see check_dataset).
    Call check_resume first to refuse a run that cannot be continued, and check_identity_loss
    to refuse a dataset that cannot feed the identity loss (the trainer refuses it too, with
    the fix in the node's words when node_words is set).
    """
    from .run.checkpoint import list_checkpoints
    from .run.distributed import Dist
    from .run.lifecycle import remove_stale_temps
    from .run.metrics import read_metrics
    from .run.ownership import hold_run, inspect_run
    from .run.trainer import Trainer

    config = load_config(None, dict(settings))
    words = "node" if node_words else "api"
    # One run per folder (run/lifecycle.py): another live run there is refused, naming it.
    lock = hold_run(config.output, f"training.api.run_training{f', output_name {owner!r}' if owner else ''}", words)
    try:
        claim = inspect_run(config, owner)
        refusal = claim.refusal(overwrite, words)
        if refusal:
            raise ResumeError(refusal)
        notes = claim.apply(overwrite)
        remove_stale_temps(config.output)  # a killed run's half-written checkpoint
        # The previous owner's checkpoints that survived the claim (not started over).
        theirs = list_checkpoints(Path(config.output) / "checkpoints") if claim.foreign else []
        with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
            roots = None if recognizer_roots is None else [Path(r) for r in recognizer_roots]
            trainer = Trainer(config, Dist(device=device or torch.device("cpu")), recognizer_roots=roots,
                              node_words=node_words, index_cache=index_cache)
            try:
                claim.record()
                if on_step is not None:
                    on_step(trainer.step, config.steps, {})
                weights = trainer.run(on_step, export_to)
                step = trainer.step
            finally:
                trainer.close()
    finally:
        lock.release()
    pruned = [p.name for p in theirs if not p.exists()]
    if pruned:
        notes.append(f"keep_last={config.keep_last} deleted the checkpoints of output_name '{claim.recorded_owner}': "
                     f"{', '.join(pruned)}.")
    return RunResult(weights, Path(config.output), step, read_metrics(config.output), tuple(notes))


def loss_curve(result: RunResult) -> np.ndarray:
    """The run's loss curve as an RGB uint8 image (H, W, 3)."""
    from .run.curve import loss_curve as draw

    return draw(result.metrics)
