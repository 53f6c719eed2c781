"""One face-detection confidence default everywhere: a photo analyzed by Analyze Faces, scored
by Identity Score, cropped by CLIP Vision Identity, cut into training samples or scored by the
evaluation CLI finds the same faces unless the user changes the threshold."""
from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from conftest import REPO
from portraitbooth_core.face import DEFAULT_DET_THRESHOLD

NODES_WITH_DET_THRESHOLD = {"PortraitBoothAnalyzeFaces", "PortraitBoothIdentityScore",
                            "PortraitBoothCLIPVisionIdentity"}


def _det_defaults(pack_nodes) -> dict[str, float]:
    """node_id -> default of its det_threshold input, for every node that has one."""
    out = {}
    for node_id, cls in pack_nodes.items():
        for spec in cls.define_schema().inputs:
            if spec.id == "det_threshold":
                out[node_id] = spec.default
    return out


def _widget_names(cls) -> list[str]:
    """The UI format's widgets_values slots of a node, in order (a seed-like Int adds one for
    its control_after_generate)."""
    from comfy_api.latest._io import WidgetInput

    names = []
    for spec in cls.define_schema().inputs:
        if isinstance(spec, WidgetInput):
            names.append(spec.id)
            if getattr(spec, "control_after_generate", False):
                names.append(f"{spec.id}:control")
    return names


def test_every_det_threshold_default_is_the_cores(pack_nodes):
    assert DEFAULT_DET_THRESHOLD == 0.5  # insightface's FaceAnalysis default (IPAdapter FaceID, InstantID)
    nodes = _det_defaults(pack_nodes)
    assert set(nodes) >= NODES_WITH_DET_THRESHOLD, sorted(nodes)
    assert {n: d for n, d in nodes.items() if d != DEFAULT_DET_THRESHOLD} == {}

    from evaluation.__main__ import parse_args
    from evaluation.score import score_folder
    from portraitbooth_core.face.retinaface import RetinaFaceDetector
    from portraitbooth_core.face.scrfd import SCRFDDetector
    from portraitbooth_core.scoring.identity_score import IdentityScorer
    from training.__main__ import parser
    from training.build.face_crops import CropSettings

    functions = {
        "IdentityScorer": inspect.signature(IdentityScorer).parameters["det_threshold"].default,
        "evaluation.score.score_folder": inspect.signature(score_folder).parameters["det_threshold"].default,
        "training CropSettings": {f.name: f.default for f in dataclasses.fields(CropSettings)}["det_threshold"],
        "SCRFDDetector.default_threshold": SCRFDDetector.default_threshold,
        "SCRFDDetector.detect": inspect.signature(SCRFDDetector.detect).parameters["threshold"].default,
        "RetinaFaceDetector.default_threshold": RetinaFaceDetector.default_threshold,
        "RetinaFaceDetector.detect": inspect.signature(RetinaFaceDetector.detect).parameters["threshold"].default,
        "python -m training build": parser().parse_args(["build", "src", "out"]).det_threshold,
        "python -m evaluation score": parse_args(["score", "--references", "r", "--images", "i",
                                                  "--out", "o"]).det_threshold,
        "python -m evaluation protocol": parse_args(["protocol", "--server", "http://x", "--subjects", "s",
                                                     "--checkpoint", "c", "--weights", "w",
                                                     "--out", "o"]).det_threshold,
    }
    assert {k: v for k, v in functions.items() if v != DEFAULT_DET_THRESHOLD} == {}


@pytest.mark.parametrize("kind", ["api", "ui"])
def test_shipped_templates_use_the_default_det_threshold(pack_nodes, kind):
    """The templates are what users start from: they set det_threshold to the nodes' default."""
    nodes = _det_defaults(pack_nodes)
    found, wrong = 0, []
    folder = REPO / "workflows" / ("api" if kind == "api" else "")
    for path in sorted(folder.glob("*.json")):
        graph = json.loads(path.read_text())
        if kind == "api":
            values = {nid: n["inputs"].get("det_threshold") for nid, n in graph.items()
                      if n["class_type"] in nodes}
        else:
            values = {}
            for n in graph["nodes"]:
                if n["type"] in nodes:
                    names = _widget_names(pack_nodes[n["type"]])
                    assert len(names) == len(n["widgets_values"]), (path.name, n["id"], names)
                    values[n["id"]] = dict(zip(names, n["widgets_values"]))["det_threshold"]
        found += len(values)
        wrong += [f"{path.name} node {nid}: {v}" for nid, v in values.items() if v != DEFAULT_DET_THRESHOLD]
    assert found >= 10, f"only {found} det_threshold settings in the {kind} templates"
    assert wrong == []
