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
