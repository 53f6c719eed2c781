"""The one rule for every path the pack opens on someone else's say-so.

A workflow (and a file it names, such as a dataset's index.json) is data anyone can
submit to a shared ComfyUI server, so:
- a path a node takes must resolve (symlinks and ".." followed) inside an allowed root:
  ComfyUI's input, output or models folders, which the caller passes in (only nodes/ knows
  folder_paths; training uses this module too and must not need ComfyUI);
- a name written inside a user-supplied file (a shard, a tar, a recognizer file) is a plain
  relative name, resolved under the folder it belongs to, never an absolute path;
- a file name a node writes is one plain component of sane length.
A user who wants more opts in when starting ComfyUI: PORTRAITBOOTH_ALLOW_ANY_PATH=1.
Errors never say whether an arbitrary path exists: the same message either way.

Files and folders found in a model folder (a listed weight or identity file, a face pack,
the parsing weights) are opened only if their symlinks lead into an allowed root too:
people keep models on another disk and link them in, so a link into any folder ComfyUI
knows is fine, a link anywhere else (models/x.safetensors -> /etc/passwd) is refused on use,
with a message naming the listed name and never the target or its contents. The operator
opts out with PORTRAITBOOTH_ALLOW_OUTSIDE_LINKS=1 (or PORTRAITBOOTH_ALLOW_ANY_PATH=1): a
narrower switch, since it lets graphs open nothing but what the operator linked in.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Sequence

ALLOW_ENV = "PORTRAITBOOTH_ALLOW_ANY_PATH"
LINKS_ENV = "PORTRAITBOOTH_ALLOW_OUTSIDE_LINKS"
MAX_NAME = 200  # characters of one file or folder name the pack writes (filesystems allow 255 bytes)


class PathNotAllowedError(PermissionError):
    """A path (or a name inside a file) that points outside where it may."""


class BadInputError(ValueError):
    """A node input (or a field of a user-supplied file) with a value that cannot be used."""


class MissingChoiceError(BadInputError, FileNotFoundError):
    """A combo value naming a file that is not among the listed model files."""


def _switched_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def any_path_allowed() -> bool:
    return _switched_on(ALLOW_ENV)


def outside_links_allowed() -> bool:
    """Whether links in the model folders may lead anywhere (the operator's start-up choice)."""
    return any_path_allowed() or _switched_on(LINKS_ENV)


def check_link_target(path: str | os.PathLike, roots: Sequence[str | os.PathLike], what: str,
                      shown: str | None = None) -> Path:
    """The real path of `path`, a file or folder found in a model folder, if following its
    symlinks (its own, or a linked folder above it) keeps it under one of `roots`, or the
    operator opted in. `shown`: the name the user picked (default: the base name); the
    message never names the link's target, which would tell a graph's author where it points."""
    real = Path(path).resolve()
    if outside_links_allowed() or is_within(real, [Path(r).resolve() for r in roots]):
        return real
    name = shown if shown is not None else Path(path).name
    name = name if len(name) <= 120 else name[:117] + "..."
    raise PathNotAllowedError(
        f"{what}: '{name}' is a symbolic link (or lies in a linked folder) that leads outside ComfyUI's models, "
        f"input and output folders and the model folders extra_model_paths.yaml adds, so PortraitBooth does not "
        f"open it. Copy the file itself into the model folder, or register the folder the link points to in "
        f"extra_model_paths.yaml, or start ComfyUI with the environment variable {LINKS_ENV}=1 to follow links "
        f"anywhere.")


def check_text(value: str, what: str) -> str:
    """`value` unless it holds a NUL byte, which no file name, prompt or setting may carry."""
    if not isinstance(value, str):
        raise BadInputError(f"{what}: expected text, got {type(value).__name__}")
    if "\x00" in value:
        raise BadInputError(f"{what}: contains a NUL byte (\\x00); remove it and queue again.")
    return value


def is_within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def check_under_roots(path: str | os.PathLike, roots: Sequence[str | os.PathLike], what: str,
                      relative_to: str | os.PathLike | None = None, hint: str = "") -> Path:
    """The resolved real path if it lies under one of `roots` (or the opt-in is set).

    Relative paths are taken inside `relative_to` (ComfyUI's input folder for nodes)."""
    text = check_text(os.fspath(path), what).strip()
    if not text:
        raise BadInputError(f"{what}: no path given")
    if len(text) > 4096:
        raise BadInputError(f"{what}: {len(text)} characters is too long for a path")
    given = Path(text).expanduser()
    if not given.is_absolute() and relative_to is not None:
        given = Path(relative_to) / given
    real = given.resolve()
    if any_path_allowed() or is_within(real, [Path(r).resolve() for r in roots]):
        return real
    shown = text if len(text) <= 120 else text[:117] + "..."
    raise PathNotAllowedError(
        f"{what}: '{shown}' is outside ComfyUI's input, output and models folders, so this node may not use it. "
        f"{hint or 'Move it under one of those folders'}, or start ComfyUI with the environment variable "
        f"{ALLOW_ENV}=1 to allow any path.")


def _relative_parts(name: str, what: str) -> list[str]:
    if not isinstance(name, str) or not name.strip():
        raise BadInputError(f"{what}: expected a file name, got {name!r}")
    check_text(name, what)
    if len(name) > 1024:
        raise BadInputError(f"{what}: a {len(name)}-character name is too long")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise PathNotAllowedError(f"{what}: {name[:120]!r} is an absolute path; only a name relative to its "
                                  f"folder is allowed there.")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise PathNotAllowedError(f"{what}: {name[:120]!r} leaves its folder ('..'); only a name inside the "
                                  f"folder is allowed there.")
    return parts


def inside(base: str | os.PathLike, name: str, what: str) -> Path:
    """`base/name` for a relative `name` read from a file, refusing absolute names, '..' and
    symlinks that lead out of `base` (the opt-in does not apply: these names come from
    files, not from the person who started ComfyUI)."""
    parts = _relative_parts(name, what)
    root = Path(base).resolve()
    real = root.joinpath(*parts).resolve()
    if not is_within(real, [root]):
        raise PathNotAllowedError(f"{what}: {name[:120]!r} leads out of its folder (a symlink?); only a file "
                                  f"inside the folder is allowed there.")
    return real


def check_file_name(value: str, what: str, max_len: int = MAX_NAME) -> str:
    """One plain file or folder name the pack may create: no separators, not '.'/'..', not
    hidden, no NUL, at most max_len characters. Returns it stripped."""
    name = check_text(value, what).strip()
    if not name:
        raise BadInputError(f"{what}: empty; give a plain name such as 'my_model'.")
    if len(name) > max_len:
        raise BadInputError(f"{what}: {len(name)} characters is too long (at most {max_len}); use a shorter name.")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise BadInputError(f"{what}: {name[:120]!r} is not a plain name (no '/', '\\', '..' or leading '.'); "
                            f"give a plain name such as 'my_model'.")
    if any(ord(c) < 32 for c in name):
        raise BadInputError(f"{what}: {name[:120]!r} contains control characters; use letters, digits, '-' or '_'.")
    return name


def check_choice(value, options: Sequence, what: str):
    """`value` if it is one of `options` (a combo's list); never used as a path otherwise."""
    if value in options:
        return value
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    listed = ", ".join(map(str, options[:30])) or "(none)"
    if len(options) > 30:
        listed += f", ... {len(options) - 30} more"
    raise BadInputError(f"{what}: {shown} is not one of the choices ({listed}); pick one of those.")
