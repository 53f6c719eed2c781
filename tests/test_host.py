"""The foundation: the pack inside a real ComfyUI, driven over HTTP like a user would."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from headless.client import ComfyError
from headless.graphs import txt2img
from conftest import REPO, default_inputs


HIDE_ONNXRUNTIME = """
import importlib.abc, importlib.machinery, sys
class HideOnnxruntime(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxruntime":
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, HideOnnxruntime())
"""


def test_server_lists_every_node_of_the_pack(comfy, pack_nodes):
    info = comfy.object_info()
    assert pack_nodes, "the pack registered no nodes"
    missing = sorted(set(pack_nodes) - set(info))
    assert not missing, f"nodes not served by ComfyUI: {missing}"
    for node_id in pack_nodes:
        assert info[node_id]["category"].startswith("PortraitBooth/"), node_id


def test_workflow_templates_lists_the_packs_workflows(comfy, pack_folder_name):
    shipped = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert shipped, "workflows/ has no template"
    templates = comfy.get_json("/workflow_templates")
    assert sorted(templates.get(pack_folder_name, [])) == shipped


def test_builtin_text_to_image_graph_yields_a_png(comfy, sd15_checkpoint):
    graph = txt2img(sd15_checkpoint, "a photo of a man", width=64, height=64, steps=2, seed=7)
    result = comfy.run(graph, timeout=300)
    files = result.images()
    assert len(files) == 1
    image = Image.open(io.BytesIO(comfy.fetch(files[0])))
    assert image.format == "PNG" and image.size == (64, 64)


def test_a_rejected_graph_names_the_node_and_the_problem(comfy):
    graph = txt2img("no_such_model.safetensors", "x", width=64, height=64, steps=1)
    try:
        comfy.submit(graph)
    except ComfyError as exc:
        assert "CheckpointLoaderSimple" in str(exc) and "no_such_model" in str(exc)
    else:
        raise AssertionError("ComfyUI accepted a graph naming a missing checkpoint")


@pytest.mark.slow  # own server: ~12 s
def test_pack_loads_without_onnxruntime_and_the_face_node_names_it(start_server, tmp_path, pack_nodes):
    # A sitecustomize on PYTHONPATH hides onnxruntime exactly as an uninstalled one would.
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(HIDE_ONNXRUNTIME)
    server = start_server(env={"PYTHONPATH": str(blocker)})
    info = server.client.object_info()
    assert set(pack_nodes) <= set(info), "the pack did not load without onnxruntime"

    node = "PortraitBoothLoadFaceEncoder"
    graph = {"1": {"class_type": node, "inputs": default_inputs(info[node])},
             "2": {"class_type": "PortraitBoothAnalyzeFaces", "inputs": {
                 **default_inputs(info["PortraitBoothAnalyzeFaces"]),
                 "face_encoder": ["1", 0], "images": ["3", 0]}},
             "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64,
                                                          "batch_size": 1, "color": 0}},
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}}}
    try:
        server.client.run(graph, timeout=120)
    except ComfyError as exc:
        message = str(exc)
    else:
        raise AssertionError("the face encoder ran without onnxruntime")
    assert "'onnxruntime'" in message and "pip install onnxruntime" in message, message


def test_setup_with_comfyui_path_leaves_the_default_host_alone(tmp_path):
    """A run against a user's ComfyUI gets its own env and stamps: the default host keeps
    pointing at its own ComfyUI and does not reinstall next time."""
    import os
    import shutil
    import subprocess
    import sys

    from headless.comfyui import comfyui_dir, photos_dir

    # A copy of the scripts, so the checkout's own .host link is not touched.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("scripts/setup_host.sh", "scripts/fetch_photos.py", "requirements.txt",
                 "requirements-test.txt", "requirements-insightface.txt", "requirements-facenet.txt", "install.py"):
        shutil.copy(REPO / name, repo / name)
    default = tmp_path / "cache" / "portraitbooth" / "host"
    (default / "stamps").mkdir(parents=True)
    (default / "env").write_text("COMFYUI=/the/default/ComfyUI\nPYTHON=/the/default/python\n")
    (default / "stamps" / "pack-reqs").write_text("default-stamp")
    (default / "cache" / "photos").mkdir(parents=True)
    for photo in photos_dir().iterdir():  # present photos: no download
        (default / "cache" / "photos" / photo.name).symlink_to(photo)

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "COMFYUI_PATH": str(comfyui_dir()), "COMFYUI_PYTHON": sys.executable}
    env.pop("PORTRAITBOOTH_HOST", None)
    done = subprocess.run(["bash", str(repo / "scripts" / "setup_host.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    assert (default / "env").read_text().startswith("COMFYUI=/the/default/ComfyUI")
    assert (default / "stamps" / "pack-reqs").read_text() == "default-stamp"
    own = (repo / ".host").resolve()
    assert own.parent == (tmp_path / "cache" / "portraitbooth" / "hosts").resolve()
    assert f"COMFYUI={comfyui_dir()}" in (own / "env").read_text()
    assert (own / "cache" / "photos").resolve() == (default / "cache" / "photos").resolve()



FAKE_COMFYUI_ANSWERS = """
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")
http.server.HTTPServer(("127.0.0.1", port), Answer).serve_forever()
"""


def _fake_python(folder: Path, name: str, body: str) -> str:
    """An executable standing in for the Python that runs ComfyUI's main.py (it gets the same
    arguments), so start-up answers, fails or hangs in well under a second, not 20-60 s."""
    script = folder / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_server_deletes_the_work_dir_it_made_but_never_a_callers(tmp_path, monkeypatch):
    import shlex
    import sys
    import tempfile

    import pytest

    from headless.server import ComfyServer, ServerStartError

    made_here = tmp_path / "tmp"
    made_here.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(made_here))  # where mkdtemp puts pb-comfy-*
    answers = _fake_python(tmp_path, "answers", f'exec {shlex.quote(sys.executable)} -c '
                                                 f'{shlex.quote(FAKE_COMFYUI_ANSWERS)} "$@"')
    crashes = _fake_python(tmp_path, "crashes", "echo 'fake start-up failure' >&2; exit 3")
    hangs = _fake_python(tmp_path, "hangs", "exec sleep 60")

    # Started and stopped through the with-block, as headless.generate and evaluation use it.
    with ComfyServer(python=answers) as server:
        assert server.client.get_json("/system_stats") == {}
        assert (server.workdir / "server.log").is_file()
    assert server.proc.poll() is not None and not server.workdir.exists()

    # Never started: stop() alone removes it.
    server = ComfyServer()
    assert server.workdir.parent == made_here and server.workdir.is_dir()
    server.stop()
    assert not server.workdir.exists()

    # Start-up fails inside a with-block, so __exit__ never runs: start() cleans up, and the
    # log's tail still reaches the error.
    with pytest.raises(ServerStartError, match="fake start-up failure"):
        with ComfyServer(python=crashes):
            pass
    # Runs but never answers: killed with its process group, its dir deleted.
    server = ComfyServer(python=hangs)
    with pytest.raises(ServerStartError, match="did not answer"):
        server.start(timeout=1)
    assert server.proc.poll() is not None, "the hung server was left running"
    assert list(made_here.iterdir()) == [], "a pb-comfy-* folder was left behind"

    # The caller's folder stays the caller's: kept, with the log, after a failed start and stop().
    own = tmp_path / "own"
    server = ComfyServer(own, python=crashes)
    with pytest.raises(ServerStartError):
        server.start()
    server.stop()
    assert "fake start-up failure" in (own / "server.log").read_text()
    with ComfyServer(own, python=answers):
        pass
    assert (own / "server.log").is_file()
