"""Hostile graphs through a real ComfyUI server (issue 15).

Anyone who can reach a ComfyUI server can submit any graph over HTTP. Generated from
/object_info: every string, combo and path-like input of every PortraitBooth node gets
traversal values, absolute paths, a symlink out of the input folder, NUL bytes and
5,000-character values; numbers get extremes; user-supplied files (a dataset's index.json
and shard files, weight files) carry hostile contents. The server runs with an audit hook
(sys.addaudithook, installed by a sitecustomize.py on its PYTHONPATH) that records every
file open and folder listing. The suite asserts that nothing outside ComfyUI's folders, the
source trees and the Python installation is opened, that the server stays up after each
burst, and that each refusal names the input.

Bounded: one server, graphs queued in bursts, bad values refused at queue time or early in
execute, no SD model is loaded.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest

from conftest import COMFY_DIR, REPO, SESSION_BASE, TEST_CHECKPOINT
from headless.client import ComfyError
from training_fixtures import *  # noqa: F401,F403

pytestmark = pytest.mark.slow  # own server and a burst of hostile graphs: ~20 s

PACK_PREFIX = "PortraitBooth"
LONG = "x" * 5000

SITECUSTOMIZE = '''
import os, sys
_log = os.environ.get("PB_AUDIT_LOG")
if _log:
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _events = ("open", "os.listdir", "os.scandir")

    def _pb_audit(event, args):
        if event not in _events or not args:
            return
        path = args[0]
        if path is None or isinstance(path, int):
            return
        try:
            text = os.path.abspath(os.fsdecode(os.fspath(path)))
        except Exception:
            return
        line = event + "\\t" + text.replace("\\n", "\\\\n") + "\\n"
        os.write(_fd, line.encode("utf-8", "backslashreplace"))

    sys.addaudithook(_pb_audit)
'''


class _Pwn:
    """A pickle that would run a command when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, dataset_dir, sd15_checkpoint):
    """The server (with audit hook), its folders and the planted targets outside them."""
    from conftest import started_server

    base = tmp_path_factory.mktemp("hostile")
    secret = base / "secret"  # outside every allowed root: nothing may open it
    secret.mkdir()
    (secret / "index.json").write_text(json.dumps({"format": "portraitbooth-shards/1", "shards": []}))
    (secret / "model.onnx").write_bytes(b"not a model")
    (secret / "x.json").write_text(json.dumps({"tar": "x.tar", "samples": {}}))
    audit_dir = base / "audit"
    audit_dir.mkdir()
    (audit_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = base / "audit.log"
    work = base / "comfy"
    weights = work / "pb_models"  # hostile weight files where Load PortraitBooth Model lists them
    weights.mkdir(parents=True)
    (weights / "garbage.safetensors").write_bytes(os.urandom(4096))
    (weights / "huge_header.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    (weights / "pickled.safetensors").write_bytes(pickle.dumps(_Pwn(base / "PWNED")))
    facexlib = work / "facexlib"  # a pickle where the face parsing weights are looked for
    facexlib.mkdir()
    (facexlib / "parsing_bisenet.pth").write_bytes(pickle.dumps(_Pwn(base / "PWNED")))
    tmp = work / "tmp"
    tmp.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(audit_dir), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PB_AUDIT_LOG": str(log), "TMPDIR": str(tmp)}
    env.pop("PORTRAITBOOTH_ALLOW_ANY_PATH", None)
    server = started_server(work, env=env, extra_model_paths={"portraitbooth": str(weights),
                                                               "facexlib": str(facexlib)})
    try:
        inp = server.input_dir
        (inp / "link_out").symlink_to(secret, target_is_directory=True)
        _hostile_datasets(inp, dataset_dir, secret)
        yield {"server": server, "secret": secret, "log": log, "base": base, "work": work}
    finally:
        os.environ.pop("PORTRAITBOOTH_ALLOW_ANY_PATH", None)
        server.stop()


def _hostile_datasets(inp: Path, dataset_dir: Path, secret: Path) -> None:
    """Datasets in the input folder (as /upload/image could put them) naming files elsewhere."""
    def copy(name: str) -> Path:
        folder = inp / name
        shutil.copytree(dataset_dir, folder)
        return folder

    d = copy("ds_traversal")
    edit_json(d / "index.json", lambda x: x["shards"][0].update(name="../../../../../../" + str(secret / "x")[1:]))
    d = copy("ds_absolute")
    edit_json(d / "index.json", lambda x: x["shards"][0].update(name=str(secret / "x")))
    d = copy("ds_tar")
    first = json.loads((d / "index.json").read_text())["shards"][0]["name"]
    edit_json(d / f"{first}.json", lambda x: x.update(tar=str(secret / "model.onnx")))
    d = copy("ds_symlink")
    (d / f"{first}.json").unlink()
    (d / f"{first}.json").symlink_to(secret / "x.json")
    d = copy("ds_recognizer")
    edit_json(d / "index.json", lambda x: x["face_encoder"].update(recognizer={"pack": "..", "file": "/etc/passwd"})
         or x["shards"][0].update(name="../x"))
    d = inp / "ds_notjson"
    d.mkdir()
    (d / "index.json").write_bytes(b"\x00\xff" * 100)


# -- graph generation from /object_info ----------------------------------------------------------

def _inputs(info: dict) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def _kind(spec) -> tuple[str, dict]:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return "COMBO", {"options": kind, **opts}
    return kind, opts


def _defaults(info: dict) -> dict:
    values = {}
    for name, spec in _inputs(info).items():
        kind, opts = _kind(spec)
        if kind == "COMBO":
            values[name] = opts.get("default", (opts.get("options") or [""])[0])
        elif "default" in opts:
            values[name] = opts["default"]
    return values


PATH_LIKE = {("PortraitBoothDIPTrainer", n) for n in ("dataset", "recognizer", "run_name", "output_name")}


def _hostile_values(node: str, name: str, kind: str, opts: dict, secret: Path) -> list[tuple[object, bool]]:
    """(value, must_fail) pairs for one input."""
    paths = ["../../../../../../etc/passwd", "/etc/passwd", str(secret), str(secret / "index.json"), "link_out",
             "link_out/index.json", "..", "/", "a\\..\\..\\b"]
    if kind == "COMBO":
        return [(v, True) for v in (*paths, "a\x00b", LONG, "not-a-choice")]
    if kind == "STRING":
        path_like = (node, name) in PATH_LIKE
        if name in ("run_name", "output_name"):  # "link_out" is a fine plain name for a new file
            paths.remove("link_out")
        return [(v, path_like) for v in paths] + [("a\x00b", True), (LONG, path_like)]
    if kind in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        values = [v for v in (None if hi is None else hi + 1, None if lo is None else lo - 1) if v is not None]
        values += [2**80, -(2**80)] if kind == "INT" else [1e308, -1e308, math.nan]
        return [(v, True) for v in values]
    return []


def _error_text(exc: ComfyError) -> str:
    return json.dumps(exc.details, default=str) if exc.details is not None else str(exc)


def _only_missing_links(exc: ComfyError) -> bool:
    """Refused only because the graph lacks the node's links: it never runs. A value ComfyUI
    cannot check at queue time (a NUL byte) is refused on entry to execute, naming the input
    (nodes/base.py; test_face_nodes.py checks every input of every node there)."""
    details = exc.details if isinstance(exc.details, dict) else {}
    errors = [e for node in (details.get("node_errors") or {}).values() for e in node.get("errors", [])]
    return bool(errors) and all(e.get("type") == "required_input_missing" for e in errors)


def _burst(server, graphs: list[tuple[str, dict, bool, str]], timeout: float = 240.0) -> list[str]:
    """Queue every graph, wait for all; returns the problems found."""
    client = server.client
    problems, queued = [], []
    for label, graph, must_fail, name in graphs:
        try:
            queued.append((label, client.submit(graph), must_fail, name))
        except ComfyError as exc:  # refused at queue time (also for a missing link, when must_fail is off)
            if must_fail and name not in _error_text(exc) and not _only_missing_links(exc):
                problems.append(f"{label}: refused without naming {name!r}: {_error_text(exc)[:300]}")
    for label, prompt_id, must_fail, name in queued:
        try:
            client.wait(prompt_id, timeout=timeout)
            if must_fail:
                problems.append(f"{label}: ran although it must be refused")
        except ComfyError as exc:
            text = _error_text(exc)
            if name not in text:
                problems.append(f"{label}: failed without naming {name!r}: {text[:300]}")
            if "embedded null byte" in text or "KeyError" in text:
                problems.append(f"{label}: raw error: {text[:300]}")
    stats = client.get_json("/system_stats")  # the server is still up
    assert "system" in stats
    return problems


def _allowed_roots(hostile: dict) -> list[str]:
    import site
    import sysconfig

    # SESSION_BASE: the session's models (the stand-in checkpoint) and custom_nodes.
    # Where the server's Python imports from: its prefix and site-packages, and any folder a
    # .pth file adds (editable installs, a venv layered on another's packages); never "/".
    imports = [p for p in sys.path if os.path.isabs(p) and os.path.isdir(p) and os.path.realpath(p) != "/"]
    roots = [COMFY_DIR, SESSION_BASE, REPO, hostile["work"], hostile["base"] / "audit", sys.prefix, sys.base_prefix,
             sys.exec_prefix, sysconfig.get_paths()["stdlib"], *site.getsitepackages(), *imports,
             "/dev", "/proc", "/sys"]
    roots = {os.path.realpath(r) for r in roots} | {os.path.abspath(r) for r in roots}
    return sorted(r.rstrip("/") or "/" for r in roots)


# System files a Python web server reads by itself (MIME types, time zone, resolver,
# locale, the CPU and library caches): not chosen by any request.
SYSTEM_FILES = ("/etc/mime.types", "/etc/localtime", "/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf",
                "/etc/host.conf", "/etc/gai.conf", "/etc/ld.so.cache", "/usr/share/zoneinfo", "/etc/apache2/mime.types",
                "/etc/httpd/mime.types", "/etc/httpd/conf/mime.types", "/usr/local/etc/mime.types",
                "/usr/local/lib/netscape/mime.types", "/usr/local/etc/httpd/conf/mime.types", "/etc/ssl",
                "/usr/lib/ssl", "/usr/share/fonts", "/etc/fonts", os.path.expanduser("~/.cache/torch"),
                os.path.expanduser("~/.cache/matplotlib"), os.path.expanduser("~/.config/matplotlib"),
                os.path.expanduser("~/.cache/portraitbooth/host"), os.path.expanduser("~/.cache/huggingface"),
                os.path.expanduser("~/.triton"), os.path.expanduser("~/.nv"), "/usr/lib", "/usr/local/cuda",
                "/etc/os-release", "/usr/lib/os-release", "/etc/machine-id", "/var/lib/dbus/machine-id",
                "/usr/share/locale", "/usr/lib/locale")


def _outside(hostile: dict, start: int) -> list[str]:
    roots = _allowed_roots(hostile)
    allowed = [*roots, *SYSTEM_FILES]
    lines = hostile["log"].read_text(errors="replace").splitlines()[start:]
    bad = []
    for line in lines:
        event, _, path = line.partition("\t")
        if not any(path == r or path.startswith(r.rstrip("/") + "/") for r in allowed):
            bad.append(f"{event} {path}")
    return sorted(set(bad))


def _pack_nodes(info: dict) -> dict:
    return {k: v for k, v in info.items() if k.startswith(PACK_PREFIX)}


def test_hostile_graphs_open_nothing_outside_comfyui_and_name_every_input(hostile):
    server, secret = hostile["server"], hostile["secret"]
    info = _pack_nodes(server.client.object_info())
    assert len(info) >= 10, sorted(info)
    # Everything the server read while starting and listing nodes is the baseline.
    start = len(hostile["log"].read_text(errors="replace").splitlines())

    problems, count = [], 0
    for node, node_info in sorted(info.items()):
        defaults = _defaults(node_info)
        graphs = []
        for name, spec in _inputs(node_info).items():
            kind, opts = _kind(spec)
            for i, (value, must_fail) in enumerate(_hostile_values(node, name, kind, opts, secret)):
                inputs = dict(defaults, **{name: value})
                if node == "PortraitBoothDIPTrainer":
                    inputs.update(steps=1, output_name=inputs.get("output_name") if name == "output_name"
                                  else f"hostile_{os.getpid()}", dataset=inputs["dataset"] if name == "dataset"
                                  else "ds_traversal")  # a dataset refused early: nothing trains
                    must_fail = True
                graph = {"1": {"class_type": node, "inputs": inputs}}
                if not node_info.get("output_node"):  # ComfyUI validates only what leads to an output
                    graph["2"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
                graphs.append((f"{node}.{name}[{i}]={str(value)[:40]!r}", graph, must_fail, name))
        count += len(graphs)
        problems += _burst(server, graphs)
    assert count > 150
    assert not problems, "\n".join(problems[:40])
    bad = _outside(hostile, start)
    assert not bad, "opened outside the allowed roots:\n" + "\n".join(bad[:40])
    log = hostile["log"].read_text(errors="replace")
    assert str(secret) not in log and "/etc/passwd" not in log


def test_hostile_dataset_files_and_weight_files(hostile):
    server, secret = hostile["server"], hostile["secret"]
    start = len(hostile["log"].read_text(errors="replace").splitlines())
    trainer = _defaults(_pack_nodes(server.client.object_info())["PortraitBoothDIPTrainer"])
    graphs = []
    expected = {"ds_traversal": "dataset: ", "ds_absolute": "dataset: ", "ds_tar": "dataset: ",
                "ds_symlink": "dataset: ", "ds_recognizer": "dataset: ", "ds_notjson": "dataset: ",
                "link_out": "dataset: "}
    for folder, words in expected.items():
        inputs = dict(trainer, dataset=folder, steps=1, output_name=f"hostile_{os.getpid()}")
        graphs.append((f"dataset={folder}", {"1": {"class_type": "PortraitBoothDIPTrainer", "inputs": inputs}},
                       True, words))
    for name in ("garbage.safetensors", "huge_header.safetensors", "pickled.safetensors"):
        graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
                 "2": {"class_type": "PortraitBoothLoadModel",
                       "inputs": {"model": ["1", 0], "portraitbooth_name": name, "strength": 1.0}},
                 "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}
        graphs.append((f"weights={name}", graph, True, name))
    problems = _burst(server, graphs, timeout=300)
    # A pickled parsing_bisenet.pth: Load FaceEncoder falls back to the ellipse, runs no pickle.
    encoder = {"1": {"class_type": "PortraitBoothLoadFaceEncoder",
                     "inputs": _defaults(_pack_nodes(server.client.object_info())["PortraitBoothLoadFaceEncoder"])},
               "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    server.client.run(encoder, timeout=120)
    assert not (hostile["base"] / "PWNED").exists()
    assert "parsing_bisenet.pth could not be loaded" in server.log_tail(400)
    assert not problems, "\n".join(problems)
    bad = _outside(hostile, start)
    assert not bad, "opened outside the allowed roots:\n" + "\n".join(bad[:40])
    log = hostile["log"].read_text(errors="replace")
    assert str(secret) not in log and "/etc/passwd" not in log
    # the hook does record: the trainer read the hostile index.json before refusing its shard names
    assert f"open\t{os.path.realpath(server.input_dir / 'ds_traversal' / 'index.json')}" in log
    assert server.client.get_json("/system_stats")


def test_odd_images_keep_the_server_up_and_read_nothing_outside(hostile, photos_dir):
    """Odd formats and sizes through Analyze Faces: an answer or an error, never a crash or a stray read."""
    import numpy as np
    from PIL import Image

    server = hostile["server"]
    inp = server.input_dir
    rng = np.random.default_rng(0)
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(inp / "odd_1x1.png")
    Image.fromarray(rng.integers(0, 255, (4, 3000, 3), dtype=np.uint8)).save(inp / "odd_strip.png")
    Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)).save(inp / "odd_16bit.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(inp / "odd_rgba.png")
    Image.open(photos_dir / "obama.jpg").convert("CMYK").save(inp / "odd_cmyk.jpg")
    data = (photos_dir / "obama.jpg").read_bytes()
    (inp / "odd_truncated.jpg").write_bytes(data[: len(data) // 2])
    frames = [Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(inp / "odd_frames.gif", save_all=True, append_images=frames[1:])
    start = len(hostile["log"].read_text(errors="replace").splitlines())
    info = _pack_nodes(server.client.object_info())
    encoder = _defaults(info["PortraitBoothLoadFaceEncoder"])
    analyze = dict(_defaults(info["PortraitBoothAnalyzeFaces"]), on_no_face="error")
    graphs = []
    for name in sorted(p.name for p in inp.glob("odd_*")):
        graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                 "2": {"class_type": "PortraitBoothLoadFaceEncoder", "inputs": encoder},
                 "3": {"class_type": "PortraitBoothAnalyzeFaces",
                       "inputs": dict(analyze, face_encoder=["2", 0], images=["1", 0])},
                 "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 3]}}}
        graphs.append((f"image={name}", graph, False, "image"))
    problems = _burst(server, graphs, timeout=300)
    assert not problems, "\n".join(problems)
    bad = _outside(hostile, start)
    assert not bad, "opened outside the allowed roots:\n" + "\n".join(bad[:40])
