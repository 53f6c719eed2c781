"""Who a run folder belongs to, and the settings it continues with.

A run folder (checkpoints, metrics, validation images) belongs to the run that made it.
run.json, written when a run starts, records its owner (the DIP Trainer's output_name; none
from the command line or a script) and the settings that change what it trains. A run
continues only as its owner and with those settings. Anything else needs the caller's
overwrite opt-in and is said in the run's notes: another owner takes the run over (its
keep_last then prunes what the first owner wrote), other settings start the run over (its
checkpoints and logs are deleted first, so nothing of the old run is resumed or plotted).

Owners are compared only when the caller names one (the node does; a shell user of the
command line can change any folder anyway). A run whose run.json names no owner (the command
line's) or that has none (written before run.json existed) is owned by the name of its
folder, which is the node's default run name.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from portraitbooth_core.bounded_json import read_json_file

from ..config import TrainConfig, load_config
from .checkpoint import PATTERN, list_checkpoints, load_latest
from .lifecycle import RunLock, RunLockedError

log = logging.getLogger("portraitbooth.training")

RUN_FILE = "run.json"
RUN_FILE_MAX_BYTES = 1 << 20  # a record is a few KB

# Settings that never change what a run trains: where the run lives, how long it runs
# (extending a run is continuing it), how data is loaded, and what is logged, saved,
# validated and exported. Every other TrainConfig field changes the result, so a setting
# added later is covered unless it is listed here.
LOGISTICS = frozenset({
    "output", "steps", "num_workers", "prefetch_factor",
    "gradient_checkpointing",  # recomputes activations: the same gradients, less memory
    "log_every", "save_every", "keep_last", "validate_every", "validation_steps", "validation_cfg",
    "tensorboard", "export_every", "export_name",
    "extra",  # free-form notes copied into the export's metadata
    # the collapse alarm watches the run: a run warned of a collapse continues with it set otherwise
    "collapse_threshold", "collapse_patience", "on_collapse",
})
_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
RESULT_SETTINGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in LOGISTICS)

# These two count through the global batch they make with the number of ranks: every draw
# is keyed by global sample position (data.py), so a run resumes exactly on another number
# of ranks when ranks x micro_batch x grad_accum stays the same.
BATCH_SETTINGS = ("micro_batch", "grad_accum")
# Compared by the file they name, so `runs/x` and its absolute path are the same setting.
PATH_SETTINGS = ("checkpoint", "dataset", "recognizer", "init_unet", "stage0_teacher", "stage0_clip_vision")
# The DIP Trainer's inputs for settings it names otherwise (node words).
NODE_INPUTS = {"checkpoint": "ckpt_name", "micro_batch": "batch_size", "lr": "learning_rate"}

# What a refusal says to do, in the caller's words.
FIXES = {
    "node": {"settings": "set them back to the recorded values to continue it, use another output_name (with "
                         "run_name empty) for a new run, or turn on overwrite to start this run over (its "
                         "checkpoints and logs are deleted)",
             "owner": "use another output_name (with run_name empty) for a run of your own, or turn on overwrite "
                      "to take this run over (its checkpoints are then pruned by keep_last)",
             "busy": "wait for that run to end or stop it, or use another output_name (with run_name empty) for a "
                     "run of your own"},
    "cli": {"settings": "pass the recorded values (--config/--set) to continue it, another --output for a new run, "
                        "or --overwrite to start this run over (its checkpoints and logs are deleted)",
            "owner": "use another --output for a run of your own, or --overwrite to take this run over",
            "busy": "wait for it to end or stop it, or use another --output for a run of your own"},
    "api": {"settings": "pass the recorded values to continue it, another `output` folder for a new run, or "
                        "overwrite=True to start this run over (its checkpoints and logs are deleted)",
            "owner": "use another `output` folder for a run of your own, or overwrite=True to take this run over "
                     "(its checkpoints are then pruned by keep_last)",
            "busy": "wait for it to end or stop it, or use another `output` folder for a run of your own"},
}


class ResumeError(ValueError):
    """A run folder that cannot be continued with these settings or by this owner (or whose
    checkpoint is unreadable); the message names each difference and the way on."""


class RunInUseError(ResumeError, RunLockedError):
    """The run folder is held by another live run (lifecycle.RunLock): a ResumeError, so a
    caller that refuses a run on ResumeError (the DIP Trainer) refuses this one too."""


def hold_run(folder: str | os.PathLike, by: str, words: str = "api") -> RunLock:
    """Hold the run folder for this run (lifecycle.RunLock) until release(), or raise
    RunInUseError naming the live holder and the way on, in the caller's words (FIXES)."""
    try:
        return RunLock.acquire(folder, by, FIXES[words]["busy"])
    except RunLockedError as exc:
        raise RunInUseError(str(exc)) from None


def result_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings of `config` that change what the run trains (RESULT_SETTINGS)."""
    values = config.to_dict()
    return {k: values[k] for k in RESULT_SETTINGS}


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short hash of result-changing settings (recorded in run.json, for a quick look)."""
    text = json.dumps({k: settings[k] for k in sorted(settings)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in PATH_SETTINGS and isinstance(old, str) and isinstance(new, str) and old and new \
            and "://" not in old + new:
        return os.path.realpath(old) == os.path.realpath(new)
    return False


def differences(recorded: Mapping[str, Any], now: Mapping[str, Any], recorded_batch: int | None,
                world: int = 1) -> list[tuple[str, Any, Any]]:
    """(setting, recorded value, value now) for each result-changing setting that differs.
    A setting the record lacks (added after the run started) counts as its default, which
    keeps the behaviour of the version that wrote the run. recorded_batch: the run's global
    batch (None: its world size is unknown; taken as 1)."""
    defaults = TrainConfig().to_dict()
    recorded = _current_form(recorded)
    found = [(k, recorded.get(k, defaults[k]), now[k]) for k in RESULT_SETTINGS
             if not _same(k, recorded.get(k, defaults[k]), now[k])]
    old_batch = recorded_batch or _global_batch(recorded, defaults, 1)
    if old_batch == _global_batch(now, defaults, world):
        found = [d for d in found if d[0] not in BATCH_SETTINGS]
    return found


def _current_form(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """Recorded settings as this version writes them (validation normalises some values: an
    int of a float setting, an older spelling of the same lora_targets), so that only a real
    change differs; as recorded when they no longer validate."""
    known = {k: v for k, v in recorded.items() if k in _FIELDS}
    try:
        return {**recorded, **load_config(None, known).to_dict()}
    except (ValueError, TypeError):
        return dict(recorded)


def _global_batch(settings: Mapping[str, Any], defaults: Mapping[str, Any], world: int) -> int:
    return world * int(settings.get("micro_batch", defaults["micro_batch"])) * \
        int(settings.get("grad_accum", defaults["grad_accum"]))


def read_record(folder: str | os.PathLike) -> dict | None:
    """run.json of a run folder; None when there is none or it cannot be read as a record."""
    path = Path(folder) / RUN_FILE
    try:  # a run folder can be planted through an upload (type=output): bounded like any user file
        data = read_json_file(path, f"{path.name} of run folder {Path(folder).name}", RUN_FILE_MAX_BYTES)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class RunClaim:
    """What continuing the run in `folder` as `owner` with `settings` means (read-only)."""
    folder: Path
    owner: str | None                   # who asks; None: no owner check (command line, scripts)
    recorded_owner: str | None          # whose the run is; None: no run in the folder yet
    settings: dict[str, Any]            # result-changing settings now
    global_batch: int                   # ranks x micro_batch x grad_accum now
    differ: list[tuple[str, Any, Any]] = field(default_factory=list)  # (setting, recorded, now)
    checkpoints: list[Path] = field(default_factory=list)
    step: int | None = None             # the step the newest readable checkpoint holds

    @property
    def foreign(self) -> bool:
        """The folder holds another owner's run."""
        return self.owner is not None and self.recorded_owner is not None and self.owner != self.recorded_owner

    def continues(self, overwrite: bool) -> bool:
        """Whether the run continues from its checkpoints (not new, not started over)."""
        return bool(self.checkpoints) and not (self.differ and overwrite)

    def refusal(self, overwrite: bool, words: str = "api") -> str | None:
        """Why this run may not go on without overwrite (None: it may), with the way on."""
        if overwrite or not (self.foreign or self.differ):
            return None
        parts = []
        if self.foreign:
            named = (read_record(self.folder) or {}).get("output_name")
            where = "its run.json" if isinstance(named, str) and named else "its folder name, the default run_name"
            held = f"; continuing it would add to and prune its checkpoints ({_steps(self.checkpoints)})" \
                if self.checkpoints else ""
            parts.append(f"this run folder belongs to output_name '{self.recorded_owner}' (recorded in {where}), "
                         f"not '{self.owner}'{held}.")
        if self.differ:
            listed = "; ".join(f"{_label(k, words)} {old!r} -> {new!r}" for k, old, new in self.differ)
            parts.append(f"{'It' if parts else 'this run'} was trained with other settings, so it cannot continue "
                         f"with these: {listed} (recorded -> now).")
        fix = FIXES[words]["settings" if self.differ else "owner"]
        return f"{' '.join(parts)} To go on: {fix}."

    def apply(self, overwrite: bool) -> list[str]:
        """After refusal() said yes (on rank 0 only): start the run over when its settings
        differ. Returns what overwrite does, for the caller's output (empty when the run
        simply continues or is new). Call record() once the trainer is ready."""
        if self.differ and overwrite:
            listed = "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in self.differ)
            removed = start_over(self.folder)
            whose = f" (the run of output_name '{self.recorded_owner}')" if self.foreign else ""
            return [f"overwrite: started the run in {self.folder}{whose} over, since it was trained with other "
                    f"settings ({listed}); deleted {removed}."]
        if self.foreign:
            return [f"overwrite: took over the run in {self.folder} from output_name '{self.recorded_owner}'"
                    f"{f' at step {self.step}' if self.step else ''}; keep_last prunes its checkpoints "
                    f"({_steps(self.checkpoints)}) as this run saves newer ones."]
        return []

    def record(self) -> None:
        """Record the owner and settings in run.json (on rank 0, once the trainer is ready:
        a run refused while it is set up leaves no record behind). Without an owner named,
        the recorded one stays."""
        previous = read_record(self.folder)
        owner = self.owner if self.owner is not None else (previous or {}).get("output_name")
        if previous is None or previous.get("output_name") != owner or previous.get("settings") != self.settings:
            write_record(self.folder, owner, self.settings, self.global_batch, previous)


def inspect_run(config: TrainConfig, owner: str | None = None, world: int = 1) -> RunClaim:
    """Read (never change) the run folder of `config`: whose it is and which result-changing
    settings differ from the run's checkpoints: those of the newest readable one (what was
    trained), else run.json's. A folder without checkpoints has nothing to continue, so
    only its owner counts."""
    folder = Path(config.output)
    now = result_settings(config)
    claim = RunClaim(folder, owner, None, now, world * config.micro_batch * config.grad_accum)
    record = read_record(folder)
    claim.checkpoints = list_checkpoints(folder / "checkpoints")
    state = load_latest(folder / "checkpoints") if claim.checkpoints else None
    recorded, batch = None, None
    if state is not None and isinstance(state[1], dict):
        saved = state[1]
        claim.step = int(saved.get("step", 0))
        recorded = saved.get("config") if isinstance(saved.get("config"), dict) else None
        batch = saved.get("global_batch") if isinstance(saved.get("global_batch"), int) else None
    if recorded is None and record is not None and isinstance(record.get("settings"), dict):
        recorded = record["settings"]
        batch = record.get("global_batch") if isinstance(record.get("global_batch"), int) else None
    if record is not None or claim.checkpoints:
        name = record.get("output_name") if record is not None else None
        claim.recorded_owner = name if isinstance(name, str) and name else folder.name
    if recorded is not None and claim.checkpoints:
        claim.differ = differences(recorded, now, batch, world)
    return claim


def write_record(folder: Path, owner: str | None, settings: Mapping[str, Any], global_batch: int,
                 previous: Mapping[str, Any] | None = None) -> None:
    """Write run.json atomically; `previous` (the record it replaces) keeps its creation time
    unless the run was started over or taken over, which the history then says."""
    from ..dataset.shards import write_json_atomic

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    same_run = previous is not None and previous.get("output_name") == owner
    history = list(previous.get("history", [])) if previous is not None else []
    if previous is not None and not same_run:
        history.append({"time": now, "output_name": previous.get("output_name"), "event": "taken over"})
    record = {"version": 1, "output_name": owner, "settings": dict(settings), "fingerprint": fingerprint(settings),
              "global_batch": global_batch,
              "created": previous.get("created", now) if same_run else now, "history": history}
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / RUN_FILE, record)


# What a run writes into its folder and starting over deletes (exported weight files stay:
# they are results, not state a new run would resume from or plot).
RUN_LOGS = ("metrics.jsonl", "warm_start.json", "stage0_metrics.jsonl", RUN_FILE)


def start_over(folder: str | os.PathLike) -> str:
    """Delete the run's checkpoints, logs, validation images and TensorBoard events from its
    folder (a link among them is removed, never followed). Returns what was deleted, in words."""
    folder = Path(folder)
    found = list_checkpoints(folder / "checkpoints")
    steps = _steps(found)
    removed = 0
    for sub, ours in (("checkpoints", lambda n: PATTERN.match(n) or (n.startswith(".step-") and n.endswith(".tmp"))),
                      ("validation", lambda n: n.startswith("step-") and n.endswith(".png"))):
        path = folder / sub
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            for entry in path.iterdir():
                if ours(entry.name) and (entry.is_symlink() or entry.is_file()):
                    entry.unlink()
                    removed += 1
    for name in RUN_LOGS:
        path = folder / name
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed += 1
    board = folder / "tensorboard"
    if board.is_symlink():
        board.unlink()
    elif board.is_dir():
        shutil.rmtree(board)
    log.info("started the run in %s over: deleted %d files (checkpoints: %s)", folder, removed, steps)
    return f"{len(found)} checkpoint(s) ({steps}) and its logs" if found else "its logs"


def _steps(paths: list[Path]) -> str:
    numbers = [int(m.group(1)) for p in paths if (m := PATTERN.match(p.name))]
    if not numbers:
        return "none"
    return f"step {numbers[0]}" if len(numbers) == 1 else f"steps {', '.join(map(str, numbers))}"


def _label(key: str, words: str) -> str:
    """A setting as the caller knows it: the node's input name first where it has one."""
    if words == "node" and key in NODE_INPUTS:
        return f"{NODE_INPUTS[key]} ({key})"
    return key
