"""Where the ComfyUI to test against lives, and how to import it in-process."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_FOLDER_NAME = "PortraitBooth"  # the folder name servers started from here give the pack


def host_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "portraitbooth" / "host"
    return Path(os.environ.get("PORTRAITBOOTH_HOST", default))


def comfyui_dir() -> Path:
    """COMFYUI_PATH if set (a user's own ComfyUI), else the one setup_host.sh built."""
    path = Path(os.environ["COMFYUI_PATH"]) if os.environ.get("COMFYUI_PATH") else host_dir() / "ComfyUI"
    if not (path / "main.py").is_file():
        raise RuntimeError(
            f"No ComfyUI at {path}. Run `bash scripts/setup_host.sh` first, "
            "or set COMFYUI_PATH to an existing ComfyUI folder.")
    return path.resolve()


def find_comfyui() -> Path:
    """The ComfyUI the command line works with: COMFYUI_PATH; else the ComfyUI this checkout
    sits in (custom_nodes/<pack>/, a user's install); else the test host."""
    if os.environ.get("COMFYUI_PATH"):
        return comfyui_dir()
    for parent in REPO.parents:
        if (parent / "main.py").is_file() and (parent / "comfy").is_dir():
            return parent
    return comfyui_dir()


def installed_pack_name(comfy: Path) -> str | None:
    """The name of the entry in `comfy`/custom_nodes that is this checkout, if any."""
    nodes = comfy / "custom_nodes"
    for entry in sorted(nodes.iterdir()) if nodes.is_dir() else ():
        if entry.is_dir() and entry.resolve() == REPO:
            return entry.name
    return None


def photos_dir() -> Path:
    return host_dir() / "cache" / "photos"


def import_comfyui(cpu: bool | None = True, path: Path | None = None) -> Path:
    """Put ComfyUI (`path`, default comfyui_dir()) on sys.path for in-process use and return
    its folder; when comfy is already imported, that one's folder.

    `cpu` sets ComfyUI's --cpu flag, which model_management reads once at import; None
    chooses it: --cpu unless torch sees a GPU (the command line and benchmarks).
    """
    if "comfy" in sys.modules and hasattr(sys.modules["comfy"], "__path__"):
        return Path(next(iter(sys.modules["comfy"].__path__))).parent
    path = Path(path) if path is not None else comfyui_dir()
    # ComfyUI first: its top-level `nodes` module and the pack's nodes/ folder share a name.
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if cpu and "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True
    return path


def import_node_pack(name: str = "portraitbooth_pack_under_test"):
    """Import this pack the way ComfyUI does: a package named after its folder, so that
    the nodes' relative imports work. Call import_comfyui() first."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
