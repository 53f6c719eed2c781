"""Training configuration: one dataclass, loaded from a JSON or TOML file, overridden
from the command line with `--set key=value` (value parsed as JSON, else taken as text).

Every field has the paper's default where the paper gives one (design.md §1).
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

MODES = ("full", "lora", "frozen")
OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Learning rate when `lr` is 0 (the default): the paper's constant 1e-5 fine-tunes the whole
# UNet; LoRA adapters (and the projector alone, mode=frozen) start from zero or random weights
# with far fewer parameters and barely move at that rate, so they get 1e-4.
LR_BY_MODE = {"full": 1e-5, "lora": 1e-4, "frozen": 1e-4}


@dataclass
class TrainConfig:
    checkpoint: str = ""          # SD1.5 .safetensors, loaded with ComfyUI's loader
    dataset: str = ""             # folder with index.json (python -m training build)
    output: str = "runs/portraitbooth"
    # what trains
    mode: str = "lora"            # full UNet, LoRA on attention, or frozen UNet (projector only)
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: str = r"attn[12]\.to_(q|k|v|out\.0)$"  # module-name regex inside the UNet
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
    # data loading (training/data.py): the batches do not depend on these
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
    recognizer: str = ""          # ArcFace ONNX for L_id; empty: the one the dataset was built with
    recognizer_feature: str = "final"
    # warm start from FastComposer (training/warm_start.py; README "Warm start from FastComposer")
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
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.dip_region not in ("face", "full"):
            problems.append(f"dip_region must be 'face' or 'full', got {self.dip_region!r}")
        if self.precomputed not in ("auto", "off"):
            problems.append(f"precomputed must be 'auto' or 'off', got {self.precomputed!r}")
        if self.num_workers < -1 or self.prefetch_factor < 1:
            problems.append("num_workers must be >= -1 (-1: auto) and prefetch_factor >= 1")
        if self.lr < 0 or self.projector_lr < 0:
            problems.append("lr and projector_lr must be >= 0 (0: the default for the mode)")
        if self.p_text_only + self.p_uncond > 1:
            problems.append("p_text_only + p_uncond must not exceed 1")
        for name in ("steps", "micro_batch", "grad_accum", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.stage0_steps < 0 or self.stage0_samples < 0 or self.stage0_batch < 1 or self.stage0_lr <= 0:
            problems.append("stage0_steps and stage0_samples must be >= 0, stage0_batch >= 1 and stage0_lr > 0")
        if self.stage0_steps > 0 and not self.stage0_teacher:
            problems.append("stage0_steps > 0 needs stage0_teacher: the *_postfuse.safetensors file that "
                            "`python -m training import-fastcomposer` wrote (models/portraitbooth/)")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))
        return self

    @property
    def learning_rate(self) -> float:
        """The UNet/LoRA learning rate: `lr` when set, else the mode's default (LR_BY_MODE)."""
        return self.lr if self.lr > 0 else LR_BY_MODE[self.mode]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(name: str, value: Any, kind: type | str) -> Any:
    kind = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}.get(kind, kind) \
        if isinstance(kind, str) else kind
    if kind is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is str and not isinstance(value, str):
        return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    if not isinstance(value, kind):
        raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def apply_overrides(config: TrainConfig, values: dict | Iterable[str]) -> TrainConfig:
    """A copy with `values` applied: a dict, or 'key=value' strings from `--set`."""
    if not isinstance(values, dict):
        pairs = {}
        for item in values:
            if "=" not in item:
                raise ValueError(f"--set expects key=value, got {item!r}")
            key, raw = item.split("=", 1)
            pairs[key.strip()] = _parse_value(raw)
        values = pairs
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown training setting(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    changes = {k: _coerce(k, v, fields[k]) for k, v in values.items()}
    return dataclasses.replace(config, **changes)


def load_config(path: str | Path | None = None, overrides: dict | Iterable[str] = ()) -> TrainConfig:
    """Defaults <- file (.json or .toml) <- overrides, validated."""
    config = TrainConfig()
    if path:
        path = Path(path)
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        config = apply_overrides(config, data)
    return apply_overrides(config, overrides).validate()
