"""LoRA adapters on ComfyUI's own UNet layers, trained through forward hooks, exported in
the kohya key form ComfyUI's LoRA loader reads (`lora_unet_<module>.lora_up/down/alpha`).

Hooks leave ComfyUI's module classes untouched: the model the trainer runs is the model
the nodes run, and the exported file applied by `LoraLoader` (or Load PortraitBooth
Model) reproduces W + alpha/rank * up @ down exactly as the hook computed it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import parse_lora_targets


class LoRA(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA supports Linear and Conv2d layers, not {type(base).__name__}")
        self.rank, self.alpha = rank, float(alpha)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)  # a fresh adapter changes nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * (self.alpha / self.rank)


class LoRASet(nn.Module):
    """Adapters by UNet module name (dots replaced: ModuleDict keys cannot hold dots)."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.names: dict[str, str] = {}   # ModuleDict key -> module name in the UNet
        self._handles: list = []

    def attach(self, unet: nn.Module, targets: str, rank: int, alpha: float) -> int:
        """Adapters on the Linear/Conv2d modules that `targets` (lora_targets) names."""
        match = TargetMatcher(parse_lora_targets(targets))
        for name, module in unet.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and match(name):
                key = name.replace(".", "_")
                adapter = LoRA(module, rank, alpha).to(next(module.parameters()).device)
                self.adapters[key] = adapter
                self.names[key] = name
                self._handles.append(module.register_forward_hook(_hook(adapter)))
        if not self.adapters:
            raise ValueError(f"lora_targets: {targets[:200]!r} names no Linear/Conv2d layer of the UNet; name the "
                             f"ends of its module names, e.g. 'attn1.to_q, attn2.to_v'.")
        return len(self.adapters)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def export(self) -> dict[str, torch.Tensor]:
        """Kohya keys for ComfyUI (`comfy.lora.model_lora_keys_unet`)."""
        out = {}
        for key, adapter in self.adapters.items():
            prefix = f"lora_unet_{key}"
            out[f"{prefix}.lora_up.weight"] = adapter.up.weight.detach().float().cpu().contiguous()
            out[f"{prefix}.lora_down.weight"] = adapter.down.weight.detach().float().cpu().contiguous()
            out[f"{prefix}.alpha"] = torch.tensor(adapter.alpha)
        return out


class TargetMatcher:
    """Whether a module name ends, at a dot, in one of lora_targets' patterns (config.
    parse_lora_targets). Part by part: a `*` inside a pattern part matches any characters of
    the name's part, found left to right with str.find, never backtracking, so the cost is
    linear in the lengths whatever the pattern. Name parts repeat across a UNet's modules
    (attn1, to_q, 0..11), so each part pair is compared once."""

    def __init__(self, patterns: tuple[str, ...]):
        self.patterns = [p.split(".") for p in patterns]
        self._parts: dict[tuple[str, str], bool] = {}

    def __call__(self, name: str) -> bool:
        parts = name.split(".")
        return any(len(p) <= len(parts) and all(self._part(a, b) for a, b in zip(p, parts[len(parts) - len(p):]))
                   for p in self.patterns)

    def _part(self, pattern: str, part: str) -> bool:
        key = (pattern, part)
        if key not in self._parts:
            self._parts[key] = _glob(pattern, part)
        return self._parts[key]


def _glob(pattern: str, text: str) -> bool:
    """`pattern` with `*` wildcards matches the whole of `text`. The pieces between stars are
    found in order, each at its leftmost place after the one before: that choice leaves the
    most room for the rest, so a failed search means no match (no other choice to try)."""
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return pattern == text
    first, *middle, last = pieces
    if len(first) + len(last) > len(text) or not text.startswith(first) or not text.endswith(last):
        return False
    at, end = len(first), len(text) - len(last)
    for piece in middle:
        found = text.find(piece, at, end)
        if found < 0:
            return False
        at = found + len(piece)
    return True


def _hook(adapter: LoRA):
    def hook(module, args, output):
        return output + adapter(args[0]).to(output.dtype)
    return hook
