"""The real ComfyUI frontend in headless Chromium knows every node of the pack."""
from __future__ import annotations

import json
import shutil

import pytest

from frontend import CHROMIUM, canvas_picture, load_ui_workflow, node_boxes, open_frontend, overlapping, \
    wait_for_node_types
from conftest import REPO


@pytest.fixture(scope="module")  # one browser for the file: each start costs ~8 s on 2 cores
def page(comfy_server):
    pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is missing: scripts/setup_host.sh installs it (needs root)")
    with open_frontend(comfy_server.url) as page:
        yield page


def test_frontend_registers_every_node_of_the_pack(page, pack_nodes, artifacts_dir):
    wait_for_node_types(page, list(pack_nodes))
    # One of each of the pack's nodes on the canvas, for the screenshot.
    page.evaluate("""ids => {
        window.app.graph.clear();
        ids.forEach((id, i) => {
            const node = window.LiteGraph.createNode(id);
            node.pos = [40 + (i % 3) * 440, 40 + Math.floor(i / 3) * 340];
            window.app.graph.add(node);
        });
        window.app.graph.setDirtyCanvas(true, true);
    }""", list(pack_nodes))
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts_dir / "frontend_pack_nodes.png"))
    assert not page.page_errors, page.page_errors


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_ui_workflow_template_loads_with_every_node_known(page, pack_nodes, path, artifacts_dir):
    wait_for_node_types(page, list(pack_nodes))
    workflow = json.loads(path.read_text())
    loaded = load_ui_workflow(page, workflow)
    assert loaded["count"] == len(workflow["nodes"])
    assert loaded["unknown"] == []
    assert loaded["alerts"] == [], loaded["alerts"]
    assert not page.page_errors, page.page_errors
    # Laid out readably: boxes as the frontend holds them after loading (pos, size, title bar).
    boxes = node_boxes(page)
    assert len(boxes) == loaded["count"]
    assert overlapping(boxes) == [], f"{path.name}: run `python tests/frontend.py export` to lay it out again"
    notes = [b for b in boxes if b["type"] == "Note"]
    assert len(notes) == 1, f"{path.name} needs one Note saying what to change (workflows/api/{path.stem}.note.md)"
    # The README's picture of this template, made the same way (into test-artifacts/ here).
    picture = canvas_picture(page, artifacts_dir / f"workflow_{path.stem}.png")
    assert 0 < picture.stat().st_size < 150_000, picture.stat().st_size
