"""Find ComfyUI and import it for the training CLI (the nodes run inside ComfyUI already).

Order: COMFYUI_PATH; the ComfyUI this pack sits in (custom_nodes/<pack>/); the test host
that scripts/setup_host.sh builds. `--cpu` is set when no GPU is usable, before
comfy.model_management reads it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent


def find_comfyui() -> Path:
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    for parent in PACK.parents:
        if (parent / "main.py").is_file() and (parent / "comfy").is_dir():
            return parent
    from headless.comfyui import comfyui_dir

    return comfyui_dir()


def import_comfyui(cpu: bool | None = None) -> Path:
    """Put ComfyUI on sys.path (first) and this pack's folder on it (last)."""
    if "comfy" in sys.modules and hasattr(sys.modules["comfy"], "__path__"):
        return Path(next(iter(sys.modules["comfy"].__path__))).parent
    path = find_comfyui()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if str(PACK) not in sys.path:
        sys.path.append(str(PACK))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    import torch

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu and "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True
    return path
