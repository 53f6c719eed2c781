"""Every shipped template (workflows/api/*.json) runs headless through the HTTP API.

One session server (conftest's models_server) sees the stand-ins of standins/templates.py:
the random SD1.5 checkpoint, PortraitBooth files and an imported FastComposer release. Each
template is run as shipped except for the model and photo names and its size (64 px, 2
steps, batches of at most 2); the photos are real. Every output node must produce its
images or text.
"""
from __future__ import annotations

import io

import pytest
from PIL import Image

from headless.workflows import API_DIR
from standins.templates import DEFAULT_PHOTOS, PHOTOS, RUNS_AFTER, standin_graph

TEMPLATES = sorted(p.stem for p in API_DIR.glob("*.json"))


@pytest.fixture(scope="module")
def photos(models_server, photos_dir) -> dict[str, str]:
    files = sorted({*DEFAULT_PHOTOS, *(f for group in PHOTOS.values() for f in group)})
    return {f: models_server.client.upload_image(photos_dir / f) for f in files}


def test_every_template_has_a_ui_twin_and_a_note():
    ui = sorted(p.stem for p in (API_DIR.parent).glob("*.json"))
    assert ui == TEMPLATES, "workflows/*.json (UI) and workflows/api/*.json must hold the same templates"
    missing = [t for t in TEMPLATES if not (API_DIR / f"{t}.note.md").is_file()]
    assert not missing, f"no note (workflows/api/<name>.note.md) for {missing}"
    readme = (API_DIR.parents[1] / "README.md").read_text()
    unshown = [t for t in TEMPLATES if f"(docs/images/{t}.png)" not in readme
               or not (API_DIR.parents[1] / "docs" / "images" / f"{t}.png").is_file()]
    assert not unshown, f"README shows no picture of {unshown}: run `python tests/frontend.py pictures`"


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_runs_headless_on_the_standins(models_server, photos, sd15_checkpoint, name):
    client = models_server.client
    graph = standin_graph(name, sd15_checkpoint, photos)
    info = client.object_info()
    unknown = sorted({n["class_type"] for n in graph.values()} - set(info))
    assert not unknown, f"{name} uses node types this ComfyUI does not have: {unknown}"
    outputs = {nid: n["class_type"] for nid, n in graph.items() if info[n["class_type"]].get("output_node")}
    assert outputs, f"{name} has no output node"

    if name in RUNS_AFTER:  # e.g. Load Identity needs the file Save Identity writes
        client.run(standin_graph(RUNS_AFTER[name], sd15_checkpoint, photos), timeout=600)
    result = client.run(graph, timeout=600)
    for nid, kind in outputs.items():
        images, texts = result.images(nid), result.texts(nid)
        assert images or texts, f"{name}: output node {nid} ({kind}) produced nothing"
        for record in images:
            picture = Image.open(io.BytesIO(client.fetch(record)))
            assert min(picture.size) >= 8, (name, nid, picture.size)
        assert all(t.strip() for t in texts), f"{name}: node {nid} ({kind}) showed an empty text"
