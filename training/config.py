"""Training configuration: one dataclass, loaded from a JSON or TOML file, overridden
from the command line with `--set key=value` (value parsed as JSON, else taken as text).

Every field has the paper's default where the paper gives one (design.md §1), and one
entry in LIMITS: the values it accepts. Every way a value arrives (a config file, `--set`,
the DIP Trainer's `extra_settings`, its widgets, a TrainConfig built in code and
validated) is checked against that one entry by check_setting, which names the setting
and what it accepts; the DIP Trainer's widgets take their min, max and default from it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from portraitbooth_core.bounded_json import JSONLimitError, load_json_bytes

MODES = ("full", "lora", "frozen")
OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# portraitbooth_core.ecac.loss.FLOORS (not imported: this module loads no torch)
LOC_FLOORS = ("paper", "log")
ON_COLLAPSE = ("warn", "stop")
# Learning rate when `lr` is 0 (the default): the paper's constant 1e-5 fine-tunes the whole
# UNet; LoRA adapters (and the projector alone, mode=frozen) start from zero or random weights
# with far fewer parameters and barely move at that rate, so they get 1e-4.
LR_BY_MODE = {"full": 1e-5, "lora": 1e-4, "frozen": 1e-4}
# The attention projections of every transformer block (ComfyUI's module names end in
# e.g. `transformer_blocks.0.attn1.to_q`); see parse_lora_targets for the form.
DEFAULT_LORA_TARGETS = ("attn1.to_q, attn1.to_k, attn1.to_v, attn1.to_out.0, "
                        "attn2.to_q, attn2.to_k, attn2.to_v, attn2.to_out.0")
# lora_targets was a regular expression until issue 22 (a pattern from a graph could hang
# the queue); saved runs and configs hold this default of that time, the same layers.
OLD_DEFAULT_LORA_TARGETS = r"attn[12]\.to_(q|k|v|out\.0)$"


@dataclass
class TrainConfig:
    checkpoint: str = ""          # SD1.5 .safetensors, loaded with ComfyUI's loader
    dataset: str = ""             # folder with index.json (python -m training build)
    output: str = "runs/portraitbooth"
    # what trains
    mode: str = "lora"            # full UNet, LoRA on attention, or frozen UNet (projector only)
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: str = DEFAULT_LORA_TARGETS  # UNet modules that get adapters (parse_lora_targets)
    projector_hidden: int = 1024
    # schedule
    steps: int = 1000
    micro_batch: int = 1          # samples per process per forward
    grad_accum: int = 1           # global batch = world size * micro_batch * grad_accum
    lr: float = 0.0               # 0: by mode (LR_BY_MODE: full 1e-5 as the paper, lora/frozen 1e-4); else this
    projector_lr: float = 0.0     # 0: same as lr
    warmup_steps: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"      # adamw8bit needs bitsandbytes
    max_grad_norm: float = 1.0    # 0 disables clipping
    ema_decay: float = 0.0        # 0 disables EMA; export uses EMA weights when on
    precision: str = "auto"       # auto: bf16 on GPUs with native bf16 (>= sm80), fp16 + loss scaling on older GPUs, fp32 on CPU
    gradient_checkpointing: bool = False
    seed: int = 0
    # data loading (training/run/data.py): the batches do not depend on these
    num_workers: int = -1         # DataLoader worker processes; -1: auto (CPUs per rank - 1, at most 4); 0: in the training process
    prefetch_factor: int = 2      # micro-batches each worker prepares ahead
    precomputed: str = "auto"     # auto: use `python -m training precompute` outputs when the dataset has them; off: encode every step
    # recipe (design.md §1)
    p_text_only: float = 0.1      # samples trained without the identity (text only)
    p_uncond: float = 0.1         # samples with the empty prompt, for CFG
    p_masked_noise: float = 0.5   # identity samples whose noise loss counts only in the face
    noise_weight: float = 1.0     # 0 switches a term off
    loc_weight: float = 1.0
    id_weight: float = 1.0
    id_max_timestep: int = 250    # R_t: DIP's identity loss only for t <= R_t
    dip_region: str = "face"      # VAE-decode only the face's latent window ("full": the whole image)
    dip_margin: int = 2           # latent cells of decoder context around that window
    loc_layers: str = "mid"       # cross-attention layers of L_loc: "mid" (16x16 at 512 px) or "all"
    ecac_beta: float = 0.8
    ecac_gamma: float = 0.1
    ecac_lambda: float = 0.001
    ecac_mu: float = 0.01
    loc_floor: str = "paper"      # L_loc's floor term: "paper" relu(beta - A); "log" keeps a gradient on a dead token (not the paper's)
    # attention health (training/run/health.py): the identity/expression tokens' attention in the face, logged per step
    collapse_threshold: float = 1e-4  # a token whose mean attention in the face is below this in every layer group is dead; 0: no alarm
    collapse_patience: int = 200  # logged steps in a row a token must be dead before the alarm (healthy evidence runs had deaths of < 80 steps that healed)
    on_collapse: str = "warn"     # warn: log the alarm and go on; stop: save a checkpoint and end the run with an error
    recognizer: str = ""          # ArcFace ONNX for L_id; empty: the one the dataset was built with
    recognizer_feature: str = "final"
    # warm start from FastComposer (training/models/warm_start.py, training/run/stage0.py; README "Warm start from FastComposer")
    init_unet: str = ""           # diffusion-model file (import-fastcomposer's *_unet.safetensors) loaded over the checkpoint's UNet
    stage0_steps: int = 0         # 0: off; else projector steps regressing FastComposer's fused class token first
    stage0_teacher: str = ""      # PortraitBooth file with FastComposer's postfuse projector (import-fastcomposer's *_postfuse)
    stage0_clip_vision: str = ""  # its CLIP vision file; empty: the one the teacher names, in the clip_vision/ beside its folder
    stage0_lr: float = 1e-3
    stage0_batch: int = 64
    stage0_samples: int = 20000   # samples whose embeddings stage 0 caches (evenly spread; ~8 KB each); 0: all
    # bookkeeping
    log_every: int = 1
    save_every: int = 100
    keep_last: int = 3
    validate_every: int = 0       # 0: no validation images
    validation_steps: int = 10
    validation_cfg: float = 5.0
    tensorboard: bool = False
    export_every: int = 0         # 0: export only at the end
    export_name: str = "portraitbooth.safetensors"
    extra: dict = field(default_factory=dict)  # free-form notes copied into the export's metadata

    def validate(self) -> "TrainConfig":
        """Check every setting against LIMITS (normalising it in place: ints of float
        settings become floats, the old default lora_targets the new form) and the rules
        between settings. Raises SettingError naming each setting that is wrong."""
        problems = []
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))
            except SettingError as exc:
                problems.append(str(exc))
        if not problems and self.p_text_only + self.p_uncond > 1:
            problems.append(f"p_text_only + p_uncond: {self.p_text_only:g} + {self.p_uncond:g} is above 1; they are "
                            f"shares of the same samples, so lower one of them.")
        if not problems and self.stage0_steps > 0 and not self.stage0_teacher:
            problems.append("stage0_steps > 0 needs stage0_teacher: the *_postfuse.safetensors file that "
                            "`python -m training import-fastcomposer` wrote (models/portraitbooth/)")
        if problems:
            raise SettingError("; ".join(problems))
        return self

    @property
    def learning_rate(self) -> float:
        """The UNet/LoRA learning rate: `lr` when set, else the mode's default (LR_BY_MODE)."""
        return self.lr if self.lr > 0 else LR_BY_MODE[self.mode]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SettingError(ValueError):
    """A setting's value is not one it accepts; the message starts with the setting's name
    and says what it accepts."""


@dataclass(frozen=True)
class Limit:
    """The values one setting accepts. Numbers: low..high (both included unless low_open);
    text: one of `choices` when there are any, else any text without NUL bytes; true/false
    and the `extra` table: their type. `note` says what special values mean."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    note: str = ""


STEPS_MAX = 10_000_000  # counts of steps: far beyond any run, and every step count stays finite
TEXT_MAX = 4096         # characters of a text setting (paths: the usual PATH_MAX)

# One entry per TrainConfig field (checked at import below): the only place a range is written.
LIMITS: dict[str, Limit] = {
    "checkpoint": Limit(), "dataset": Limit(), "output": Limit(),
    "mode": Limit(choices=MODES),
    "lora_rank": Limit(1, 256),
    "lora_alpha": Limit(0.0, 1024.0),
    "lora_targets": Limit(),  # the form parse_lora_targets reads
    "projector_hidden": Limit(1, 16384),
    "steps": Limit(1, STEPS_MAX),
    "micro_batch": Limit(1, 64),
    "grad_accum": Limit(1, 256),
    "lr": Limit(0.0, 1.0, note="0: the mode's default"),
    "projector_lr": Limit(0.0, 1.0, note="0: the same as lr"),
    "warmup_steps": Limit(0, STEPS_MAX),
    "weight_decay": Limit(0.0, 1.0),
    "optimizer": Limit(choices=OPTIMIZERS),
    "max_grad_norm": Limit(0.0, 1000.0, note="0: no clipping"),
    "ema_decay": Limit(0.0, 0.999999, note="0: no EMA"),
    "precision": Limit(choices=PRECISIONS),
    "gradient_checkpointing": Limit(),
    "seed": Limit(0, 2**31 - 1),
    "num_workers": Limit(-1, 64, note="-1: auto, 0: in the training process"),
    "prefetch_factor": Limit(1, 64),
    "precomputed": Limit(choices=("auto", "off")),
    "p_text_only": Limit(0.0, 1.0), "p_uncond": Limit(0.0, 1.0), "p_masked_noise": Limit(0.0, 1.0),
    "noise_weight": Limit(0.0, 100.0, note="0: term off"), "loc_weight": Limit(0.0, 100.0, note="0: term off"),
    "id_weight": Limit(0.0, 100.0, note="0: term off"),
    "id_max_timestep": Limit(0, 999),  # the 1000-step schedule's timesteps
    "dip_region": Limit(choices=("face", "full")),
    "dip_margin": Limit(0, 64),
    "loc_layers": Limit(choices=("mid", "all")),
    "ecac_beta": Limit(0.0, 1.0), "ecac_gamma": Limit(0.0, 1.0),
    "ecac_lambda": Limit(0.0, 10.0), "ecac_mu": Limit(0.0, 10.0),
    "loc_floor": Limit(choices=LOC_FLOORS),
    "collapse_threshold": Limit(0.0, 1.0, note="0: no alarm"),
    "collapse_patience": Limit(1, STEPS_MAX),
    "on_collapse": Limit(choices=ON_COLLAPSE),
    "recognizer": Limit(),
    # portraitbooth_core.face.arcface_torch.FEATURES (not imported: this module loads no torch)
    "recognizer_feature": Limit(choices=("final", "stage1", "stage2", "stage3", "stage4")),
    "init_unet": Limit(),
    "stage0_steps": Limit(0, STEPS_MAX, note="0: off"),
    "stage0_teacher": Limit(), "stage0_clip_vision": Limit(),
    "stage0_lr": Limit(0.0, 1.0, low_open=True),
    "stage0_batch": Limit(1, 4096),
    "stage0_samples": Limit(0, 100_000_000, note="0: all"),
    "log_every": Limit(1, STEPS_MAX), "save_every": Limit(1, STEPS_MAX), "keep_last": Limit(1, 10_000),
    "validate_every": Limit(0, STEPS_MAX, note="0: no validation images"),
    "validation_steps": Limit(1, 100),  # sampler steps of one validation image
    "validation_cfg": Limit(0.0, 100.0),
    "tensorboard": Limit(),
    "export_every": Limit(0, STEPS_MAX, note="0: only at the end"),
    "export_name": Limit(),
    "extra": Limit(),
}
KINDS: dict[str, type] = {f.name: {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}[f.type]
                          for f in dataclasses.fields(TrainConfig)}
if set(LIMITS) != set(KINDS):  # a new field must say what it accepts
    raise RuntimeError(f"training.config.LIMITS and TrainConfig differ: {sorted(set(LIMITS) ^ set(KINDS))}")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def describe_limit(name: str) -> str:
    """What setting `name` accepts, in words ("a whole number in 1..64"), as refusals say it."""
    limit, kind = LIMITS[name], KINDS[name]
    if limit.choices:
        return "one of " + ", ".join(limit.choices)
    if kind in (int, float):
        low = f"above {_number(limit.low)} up to" if limit.low_open else f"in {_number(limit.low)}.."
        text = (f"a whole number {low}" if kind is int else f"a number {low}") + \
            (" " if limit.low_open else "") + _number(limit.high)
        return text + (f" ({limit.note})" if limit.note else "")
    if kind is bool:
        return "true or false"
    if kind is dict:
        return "a table of notes (JSON values, finite numbers)"
    if name == "lora_targets":
        return f"comma-separated module names such as the default '{DEFAULT_LORA_TARGETS}'"
    return f"text of at most {TEXT_MAX} characters"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_setting(name: str, value: Any) -> Any:
    """`value` as setting `name` holds it (an int of a float setting as a float; numbers,
    lists and tables of a text setting as text; lora_targets in its normal form), or
    SettingError: the setting's name, what is wrong and what it accepts (LIMITS)."""
    limit, kind = LIMITS[name], KINDS[name]
    accepts = describe_limit(name)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise SettingError(f"{name}: expected true/false, got {_shown(value)}.")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(f"{name}: expected {kind.__name__}, got {_shown(value)}; give {accepts}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingError(f"{name}: {value} is not a finite number; give {accepts}.")
        if kind is int and isinstance(value, float):
            raise SettingError(f"{name}: expected int, got {_shown(value)}; give {accepts}.")
        if value < limit.low or (limit.low_open and value == limit.low):
            raise SettingError(f"{name}: {_shown(value)} is {'not above' if limit.low_open else 'below'} the minimum "
                               f"{_number(limit.low)}; give {accepts}.")
        if value > limit.high:
            raise SettingError(f"{name}: {_shown(value)} is above the maximum {_number(limit.high)}; give {accepts}.")
        return float(value) if kind is float else value
    if kind is dict:
        if not isinstance(value, dict):
            raise SettingError(f"{name}: expected a table, got {_shown(value)}; give {accepts}.")
        try:  # copied into the export's JSON metadata
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SettingError(f"{name}: {exc}; give {accepts}.") from None
        if len(text) > 16 * TEXT_MAX:
            raise SettingError(f"{name}: {len(text)} characters of notes; keep them under {16 * TEXT_MAX}.")
        return value
    if not isinstance(value, str):  # `--set recognizer=123` is parsed as a number first
        value = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    if "\x00" in value:
        raise SettingError(f"{name}: contains a NUL byte (\\x00); remove it.")
    if len(value) > TEXT_MAX:
        raise SettingError(f"{name}: {len(value)} characters; give {accepts}.")
    if limit.choices and value not in limit.choices:
        raise SettingError(f"{name}: {_shown(value)} is not one of {', '.join(limit.choices)}; choose one of them.")
    if name == "lora_targets":
        return ", ".join(parse_lora_targets(value))
    return value


LORA_TARGETS_MAX = 64  # patterns in lora_targets
_TARGET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_*")


def parse_lora_targets(text: str) -> tuple[str, ...]:
    """lora_targets -> its patterns. The form: comma-separated module names of the UNet,
    each matching every module whose name ends in it at a dot (`attn1.to_q` matches
    `input_blocks.1.1.transformer_blocks.0.attn1.to_q`); a `*` inside a part of the name
    matches any characters of that part (`attn*.to_q`). Matched part by part without
    backtracking (training.models.lora), so no value can make it slow. The old regular
    expression default is read as the same layers in this form; another regular
    expression is refused with the form to use. Raises SettingError naming lora_targets."""
    if text == OLD_DEFAULT_LORA_TARGETS:
        text = DEFAULT_LORA_TARGETS
    fix = (f"lora_targets takes comma-separated module names (a `*` inside a name part matches any characters of "
           f"it), e.g. the default '{DEFAULT_LORA_TARGETS}'")
    if any(c in text for c in "\\()[]{}|^$+?"):  # the whole value: its commas may be a regex's
        raise SettingError(f"lora_targets: {_shown(text)} is a regular expression, which lora_targets no longer "
                           f"reads; {fix}.")
    patterns = tuple(p.strip() for p in text.split(","))
    if not any(patterns):
        raise SettingError(f"lora_targets: names no module; {fix}.")
    if len(patterns) > LORA_TARGETS_MAX:
        raise SettingError(f"lora_targets: {len(patterns)} names; give at most {LORA_TARGETS_MAX}.")
    for pattern in patterns:
        parts = pattern.split(".")
        if not pattern or not all(parts) or not set(pattern.replace(".", "")) <= _TARGET_CHARS:
            raise SettingError(f"lora_targets: {_shown(pattern)} is not a module name; {fix}.")
    return patterns


def _parse_value(text: str, key: str = "the value") -> Any:
    try:  # bounded: a deeply nested value is a SettingError, not a RecursionError
        return load_json_bytes(text, key, max_bytes=16 << 20)
    except JSONLimitError as exc:
        raise SettingError(str(exc)) from None
    except ValueError:
        return text


def unknown_settings_message(names: Iterable[Any]) -> str:
    """The refusal of settings that do not exist: each with the nearest real name when one
    is close (a typo, a shortened name), else the list of every setting."""
    import difflib

    shown, guessed = [], True
    for name in names:
        near = difflib.get_close_matches(str(name), KINDS, n=1, cutoff=0.6)
        shown.append(f"{str(name)[:80]} (did you mean {near[0]}?)" if near else str(name)[:80])
        guessed = guessed and bool(near)
    text = f"unknown training setting(s): {', '.join(shown)[:600]}"
    return text + "." if guessed else f"{text}; known: {', '.join(sorted(KINDS))}"


class ConfigFileError(SettingError):
    """A config file (--config) that cannot be read or is not a table of settings; the
    message names the file and what to fix."""


def apply_overrides(config: TrainConfig, values: dict | Iterable[str]) -> TrainConfig:
    """A copy with `values` applied: a dict, or 'key=value' strings from `--set`."""
    if not isinstance(values, dict):
        pairs = {}
        for item in values:
            if "=" not in item:
                raise SettingError(f"--set expects name=value, got {_shown(item)}; e.g. --set steps=2000.")
            key, raw = item.split("=", 1)
            pairs[key.strip()] = _parse_value(raw, key.strip())
        values = pairs
    unknown = sorted(set(values) - set(KINDS), key=str)
    if unknown:
        raise SettingError(unknown_settings_message(unknown))
    changes = {k: check_setting(k, v) for k, v in values.items()}  # each value against its one range
    return dataclasses.replace(config, **changes)


def load_config(path: str | Path | None = None, overrides: dict | Iterable[str] = ()) -> TrainConfig:
    """Defaults <- file (.json or .toml) <- overrides, validated."""
    config = TrainConfig()
    if path:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigFileError(f"{path}: the config file does not exist; check the path, or leave the file out "
                                  f"and give settings with --set name=value.") from None
        except IsADirectoryError:
            raise ConfigFileError(f"{path}: is a folder; give a .toml or .json file of settings.") from None
        except UnicodeDecodeError as exc:
            raise ConfigFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 "
                                  f"TOML or JSON.") from None
        except OSError as exc:  # permissions, a broken link, ...
            raise ConfigFileError(f"{path}: cannot be read ({exc.strerror or exc}); fix the file or its "
                                  f"permissions.") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else \
                load_json_bytes(text, str(path), max_bytes=16 << 20)
        except ValueError as exc:  # TOMLDecodeError and JSONDecodeError both are
            raise ConfigFileError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({exc}).") \
                from None
        if not isinstance(data, dict):
            raise ConfigFileError(f"{path}: expected a table of settings (name = value), got "
                                  f"{type(data).__name__}.")
        try:
            config = apply_overrides(config, data)
        except ValueError as exc:
            raise SettingError(f"{path}: {exc}") from None
    return apply_overrides(config, overrides).validate()
