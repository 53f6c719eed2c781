"""The pack's API-format workflows (workflows/api/*.json), loaded and filled in for a run.

The headless `generate` command and the tests run the same files users get as templates.
"""
from __future__ import annotations

import copy
import json

from .comfyui import REPO

API_DIR = REPO / "workflows" / "api"


def load_api_workflow(name: str) -> dict:
    path = API_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no API workflow {name!r} in {API_DIR}")
    return json.loads(path.read_text())


def with_inputs(graph: dict, changes: dict[str, dict]) -> dict:
    """A copy of `graph` with {node id: {input: value}} applied; unknown names fail loudly."""
    graph = copy.deepcopy(graph)
    for node_id, values in changes.items():
        if node_id not in graph:
            raise KeyError(f"workflow has no node {node_id!r}")
        inputs = graph[node_id]["inputs"]
        for name, value in values.items():
            if name not in inputs:
                raise KeyError(f"node {node_id} ({graph[node_id]['class_type']}) has no input {name!r}")
            inputs[name] = value
    return graph


def with_class_inputs(graph: dict, changes: dict[str, dict]) -> dict:
    """A copy of `graph` with {class_type: {input: value}} applied to every node of that class.

    Only inputs a node already has are set (a loader's file name, a sampler's steps), so one
    table fits every template; a class named in `changes` but absent from the graph is fine."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        for name, value in changes.get(node["class_type"], {}).items():
            if name in node["inputs"]:
                node["inputs"][name] = value
    return graph


def load_image_nodes(graph: dict) -> list[str]:
    """Ids of the graph's Load Image nodes in id order (subject 1 first in every template)."""
    return sorted((nid for nid, node in graph.items() if node["class_type"] == "LoadImage"),
                  key=lambda nid: (len(nid), nid))


def sized_down(graph: dict, short_side: int = 64, steps: int = 2, batch: int | None = None) -> dict:
    """A copy for a quick run: every empty latent's shorter side `short_side` px (aspect kept,
    multiples of 8) and every sampler `steps` steps; batch sizes above `batch` cut to it."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            width, height = inputs["width"], inputs["height"]
            scale = short_side / min(width, height)
            inputs["width"], inputs["height"] = (max(8, round(width * scale / 8) * 8),
                                                 max(8, round(height * scale / 8) * 8))
            if batch is not None:
                inputs["batch_size"] = min(inputs["batch_size"], batch)
        elif "steps" in inputs and isinstance(inputs["steps"], int):
            inputs["steps"] = steps
    return graph
