"""Which file paths a node may read or write: portraitbooth_core.paths with ComfyUI's roots.

A workflow is data anyone can share; a node that takes a free-form path must not let a
downloaded workflow read or write anywhere on the machine. So paths must lie inside
ComfyUI's input, output or models folders (including model folders registered through
extra_model_paths.yaml), after resolving symlinks and "..". A user who wants more opts in
when starting ComfyUI: PORTRAITBOOTH_ALLOW_ANY_PATH=1. The rule itself lives in the core
(training applies it to the names inside a dataset without importing ComfyUI).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from portraitbooth_core.paths import (ALLOW_ENV, LINKS_ENV, BadInputError, MissingChoiceError, PathNotAllowedError,
                                      any_path_allowed, check_choice, check_file_name, check_link_target, check_text,
                                      check_under_roots)

__all__ = ["ALLOW_ENV", "LINKS_ENV", "BadInputError", "MissingChoiceError", "PathNotAllowedError", "allowed_roots",
           "any_path_allowed", "checked_choice", "checked_model_path", "checked_name", "checked_path", "checked_text",
           "model_roots"]


def allowed_roots() -> list[Path]:
    import folder_paths

    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.models_dir]
    for kind, (paths, _exts) in folder_paths.folder_names_and_paths.items():
        if kind != "custom_nodes":  # code, not models: a workflow must not point there
            roots.extend(paths)
    return [Path(r).resolve() for r in dict.fromkeys(roots)]


def model_roots(kind: str) -> list[Path]:
    """The folders ComfyUI knows for one model kind (models/<kind> and extra_model_paths)."""
    import folder_paths

    return [Path(p) for p in folder_paths.get_folder_paths(kind)] if kind in folder_paths.folder_names_and_paths \
        else []


def checked_path(path: str, purpose: str) -> Path:
    """The resolved path, if allowed. Relative paths are taken inside ComfyUI's input folder."""
    import folder_paths

    input_dir = folder_paths.get_input_directory()
    return check_under_roots(path, allowed_roots(), purpose, relative_to=input_dir,
                             hint=f"Move it under {input_dir} (or output/models)")


def checked_model_path(path: str | os.PathLike, input_name: str, shown: str | None = None) -> Path:
    """The real path of a file or folder found in a model folder (a listed file, a pack, the
    parsing weights), if its symlinks stay inside allowed_roots(): see
    portraitbooth_core.paths.check_link_target. Call it right before opening the file."""
    return check_link_target(path, allowed_roots(), input_name, shown)


def checked_choice(value, options: Sequence, input_name: str):
    """A combo input's value, checked against the list it came from: ComfyUI passes a
    value submitted through its API to the node without checking it."""
    return check_choice(value, list(options), input_name)


def checked_name(value: str, input_name: str) -> str:
    return check_file_name(value, input_name)


def checked_text(value: str, input_name: str) -> str:
    return check_text(value, input_name)


def check_inputs(node_cls, values: dict) -> None:
    """What ComfyUI does not check for a V3 node before execute: a combo value must be one
    of the list the schema offers now, text may not hold NUL bytes, numbers must be finite
    and inside their min/max (a graph submitted over HTTP reaches execute with anything).
    A node's FILE_COMBOS ({input: (model folder kind, what files)}) marks combos that list
    model files: their error says where to put such files."""
    import math

    from comfy_api.latest import io

    for spec in node_cls.define_schema().inputs:
        if spec.id not in values or values[spec.id] is None:
            continue
        value = values[spec.id]
        if isinstance(spec, io.Combo.Input):
            try:
                checked_choice(value, spec.options or [], spec.id)
            except BadInputError as exc:
                files = getattr(node_cls, "FILE_COMBOS", {}).get(spec.id)
                if files is None:
                    raise
                kind, what = files
                raise MissingChoiceError(f"{exc} To add one, put {what} files in "
                                         f"{', '.join(map(str, model_roots(kind)))} and refresh.") from None
        elif isinstance(spec, io.String.Input):
            check_text(value, spec.id)
        elif isinstance(spec, (io.Int.Input, io.Float.Input)) and not isinstance(value, bool):
            if not isinstance(value, (int, float)):
                raise BadInputError(f"{spec.id}: expected a number, got {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise BadInputError(f"{spec.id}: {value} is not a finite number; give a value between "
                                    f"{spec.min} and {spec.max}.")
            if isinstance(spec, io.Int.Input) and isinstance(value, float) and not value.is_integer():
                raise BadInputError(f"{spec.id}: {value} is not a whole number; give one between {spec.min} and "
                                    f"{spec.max}.")
            if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
                raise BadInputError(f"{spec.id}: {value} is outside {spec.min}..{spec.max}; give a value in "
                                    f"that range.")


def checked_inputs(execute):
    """Decorator for a node's execute (under @classmethod): check_inputs first."""
    import functools
    import inspect

    signature = inspect.signature(execute)

    @functools.wraps(execute)
    def run(cls, *args, **kwargs):
        bound = signature.bind(cls, *args, **kwargs)
        check_inputs(cls, {k: v for k, v in bound.arguments.items() if k != "cls"})
        return execute(cls, *args, **kwargs)

    run.inputs_checked = True  # nodes.base.CheckedNode wraps an execute once
    return run


def validate_widget_inputs(cls, **kwargs) -> bool | str:
    """A node's validate_inputs: check_inputs at queue time, so that a graph with a bad value is
    refused before anything runs (linked inputs are None here and skipped)."""
    try:
        check_inputs(cls, kwargs)
    except BadInputError as exc:
        return str(exc)
    return True
