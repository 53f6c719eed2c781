"""Which file paths a node may read or write.

A workflow is data anyone can share; a node that takes a free-form path must not let a
downloaded workflow read or write anywhere on the machine. So paths must lie inside
ComfyUI's input, output or models folders (including model folders registered through
extra_model_paths.yaml), after resolving symlinks and "..". A user who wants more opts in
when starting ComfyUI: PORTRAITBOOTH_ALLOW_ANY_PATH=1.
"""
from __future__ import annotations

import os
from pathlib import Path

ALLOW_ENV = "PORTRAITBOOTH_ALLOW_ANY_PATH"


class PathNotAllowedError(PermissionError):
    pass


def allowed_roots() -> list[Path]:
    import folder_paths

    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.models_dir]
    for kind, (paths, _exts) in folder_paths.folder_names_and_paths.items():
        if kind != "custom_nodes":  # code, not models: a workflow must not point there
            roots.extend(paths)
    return [Path(r).resolve() for r in dict.fromkeys(roots)]


def any_path_allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def checked_path(path: str, purpose: str) -> Path:
    """The resolved path, if allowed. Relative paths are taken inside ComfyUI's input folder."""
    import folder_paths

    if not path or not path.strip():
        raise ValueError(f"{purpose}: no path given")
    given = Path(path.strip()).expanduser()
    if not given.is_absolute():
        given = Path(folder_paths.get_input_directory()) / given
    real = given.resolve()
    if any_path_allowed():
        return real
    roots = allowed_roots()
    if any(real == root or real.is_relative_to(root) for root in roots):
        return real
    raise PathNotAllowedError(
        f"{purpose}: '{path}' is outside ComfyUI's input, output and models folders, so this node may not "
        f"use it. Move it under {folder_paths.get_input_directory()} (or output/models), or start ComfyUI "
        f"with the environment variable {ALLOW_ENV}=1 to allow any path.")
