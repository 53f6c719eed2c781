"""LoRA adapters on ComfyUI's own UNet layers, trained through forward hooks, exported in
the kohya key form ComfyUI's LoRA loader reads (`lora_unet_<module>.lora_up/down/alpha`).

Hooks leave ComfyUI's module classes untouched: the model the trainer runs is the model
the nodes run, and the exported file applied by `LoraLoader` (or Load PortraitBooth
Model) reproduces W + alpha/rank * up @ down exactly as the hook computed it.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn


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
        pattern = re.compile(targets)
        for name, module in unet.named_modules():
            if pattern.search(name) and isinstance(module, (nn.Linear, nn.Conv2d)):
                key = name.replace(".", "_")
                adapter = LoRA(module, rank, alpha).to(next(module.parameters()).device)
                self.adapters[key] = adapter
                self.names[key] = name
                self._handles.append(module.register_forward_hook(_hook(adapter)))
        if not self.adapters:
            raise ValueError(f"LoRA targets {targets!r} match no Linear/Conv2d layer of the UNet")
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


def _hook(adapter: LoRA):
    def hook(module, args, output):
        return output + adapter(args[0]).to(output.dtype)
    return hook
