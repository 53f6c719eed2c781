"""The foundation: the pack inside a real ComfyUI, driven over HTTP like a user would."""
from __future__ import annotations

import io
import json
from pathlib import Path

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
