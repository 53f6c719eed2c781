"""The real ComfyUI frontend in headless Chromium knows every node of the pack."""
from __future__ import annotations

import copy
import json

import pytest

from frontend import canvas_picture, load_frontend, load_ui_workflow, need_chromium, node_boxes, open_frontend, \
    overlapping, visible_alerts, wait_for_node_types
from conftest import REPO

pytestmark = pytest.mark.slow  # headless Chromium: ~1 min on 2 cores

TEMPLATES = sorted((REPO / "workflows").glob("*.json"))


def headings(alerts: list[str]) -> list[str]:
    """First lines: a dialog's full text may change while it is open (the Templates browser fills in)."""
    return sorted(a.split("\n")[0] for a in alerts)


def shown(alerts: list[str], limit: int = 300) -> list[str]:
    """Alerts for a failure message: the Templates browser alone is thousands of characters."""
    return [a if len(a) <= limit else a[:limit] + " ..." for a in alerts]


@pytest.fixture(scope="module")  # one browser for the file: each start costs ~8 s on 2 cores
def page(comfy_server):
    need_chromium()
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


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_ui_workflow_template_loads_with_every_node_known(page, pack_nodes, path, artifacts_dir):
    wait_for_node_types(page, list(pack_nodes))
    workflow = json.loads(path.read_text())
    loaded = load_ui_workflow(page, workflow)
    assert loaded["count"] == len(workflow["nodes"])
    assert loaded["unknown"] == []
    assert not loaded["alerts"], f"loading {path.name} raised: {shown(loaded['alerts'])}"
    assert not loaded["other_alerts"], (
        f"not raised by {path.name}, but on screen and not expected (a first-run dialog of the frontend, "
        f"a notice of the server?): {shown(loaded['other_alerts'])}")
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


def _unknown_node_type(workflow: dict) -> str:
    node = next(n for n in workflow["nodes"] if n["type"].startswith("PortraitBooth"))
    node["type"] = "PortraitBoothNoSuchNode"
    return "PortraitBoothNoSuchNode"


def _node_without_id(workflow: dict) -> str:
    del workflow["nodes"][0]["id"]
    return "nodes[0].id"


def test_a_broken_workflow_is_caught_and_told_apart_from_dialogs_it_did_not_raise(page, comfy_server, pack_nodes):
    """The template check's alerts are precise: a dialog the workflow did not raise (the
    first-run Templates browser, a server's toast) is no pack error, and a real error in a
    workflow still shows as one while such a dialog is open."""
    template = json.loads(TEMPLATES[0].read_text())
    # A page of its own (a fresh browser context): the Templates browser ignores Escape and
    # would stay open on the shared page.
    context = page.context.browser.new_context(viewport=page.viewport_size)
    try:
        tab = context.new_page()
        load_frontend(tab, comfy_server.url)
        wait_for_node_types(tab, list(pack_nodes))
        tab.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        tab.evaluate("""() => window.app.extensionManager.toast.add(
            {severity: 'info', summary: 'Server notice', detail: 'something unrelated to any workflow'})""")
        tab.wait_for_function("() => document.querySelector('.p-dialog') !== null", timeout=30_000)
        tab.wait_for_timeout(300)
        unrelated = headings(visible_alerts(tab))
        assert unrelated == ["Server notice", "Templates"], unrelated

        # One more that pops up while the workflow loads, yet does not speak of it.
        tab.evaluate("""() => setTimeout(() => window.app.extensionManager.toast.add(
            {severity: 'warn', summary: 'Reconnected', detail: 'the server is back'}), 100)""")
        clean = load_ui_workflow(tab, template)
        assert clean["alerts"] == [], f"blamed on the workflow: {shown(clean['alerts'])}"
        assert headings(clean["other_alerts"]) == ["Reconnected", *unrelated]

        for breakage in (_unknown_node_type, _node_without_id):
            broken = copy.deepcopy(template)
            named = breakage(broken)
            loaded = load_ui_workflow(tab, broken)
            assert any(named in alert for alert in loaded["alerts"]), (named, shown(loaded["alerts"]))
            assert not set(headings(loaded["alerts"])) & {"Reconnected", *unrelated}, shown(loaded["alerts"])
            assert {"Reconnected", *unrelated} <= set(headings(loaded["other_alerts"])), shown(loaded["other_alerts"])
            if breakage is _unknown_node_type:
                assert loaded["unknown"] == [named]
    finally:
        context.close()
