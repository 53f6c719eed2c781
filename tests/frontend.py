"""Headless Chromium (Debian's) driving the real ComfyUI frontend, through Playwright.

Shared by the browser tests and by `python tests/frontend.py export`, which turns the
API-format graphs in workflows/api/ into the UI-format templates in workflows/.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without these, Chromium keeps calling home on a closed network and start-up drags.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def open_frontend(url: str, viewport=(1400, 900)):
    """A Playwright page with the ComfyUI frontend loaded and its graph ready."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.page_errors = []
            page.on("pageerror", lambda exc: page.page_errors.append(str(exc)))
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_function("() => window.LiteGraph && window.app && window.app.graph",
                                   timeout=90_000)
            yield page
        finally:
            browser.close()


def wait_for_node_types(page, node_ids: list[str], timeout_ms: int = 60_000) -> None:
    page.wait_for_function("ids => ids.every(id => id in window.LiteGraph.registered_node_types)",
                           arg=list(node_ids), timeout=timeout_ms)


def api_to_ui(page, api_graph: dict, name: str, note: str | None = None) -> dict:
    """Let the frontend itself convert an API-format graph to a UI-format workflow.

    note: text of a Note node placed above the graph (Notes are UI-only: an API graph
    cannot hold one, so it comes from workflows/api/<name>.note.md)."""
    page.evaluate("([g, n]) => window.app.loadApiJson(g, n)", [api_graph, name])
    page.wait_for_timeout(300)
    if note:
        page.evaluate("""text => {
            const nodes = window.app.graph._nodes || window.app.graph.nodes;
            const note = window.LiteGraph.createNode("Note");
            note.widgets[0].value = text;
            note.title = "Read me";
            note.size = [520, 220];
            note.pos = [Math.min(...nodes.map(n => n.pos[0])), Math.min(...nodes.map(n => n.pos[1])) - 280];
            window.app.graph.add(note);
        }""", note)
        page.wait_for_timeout(100)
    # graphToPrompt's workflow is what "Save" writes. Go through JSON text: Playwright
    # turns JS `undefined` into null, which the frontend's schema check rejects on load.
    return json.loads(page.evaluate(
        "async () => JSON.stringify((await window.app.graphToPrompt()).workflow)"))


def load_ui_workflow(page, workflow: dict) -> dict:
    """Load a UI-format workflow; report unknown node types and any alert it raised."""
    page.evaluate("w => window.app.loadGraphData(JSON.parse(w))", json.dumps(workflow))
    page.wait_for_timeout(500)
    alerts = page.locator(".p-toast-message, .p-dialog").all_inner_texts()
    result = page.evaluate("""() => {
        const known = window.LiteGraph.registered_node_types;
        const nodes = window.app.graph._nodes || window.app.graph.nodes;
        return {count: nodes.length,
                types: nodes.map(n => n.type),
                unknown: nodes.filter(n => !(n.type in known) || n.has_errors).map(n => n.type)};
    }""")
    result["alerts"] = [a for a in alerts if a.strip()]
    return result


def export_templates(repo: Path, names: list[str] | None = None) -> list[Path]:
    """Write workflows/<name>.json (UI format) for each workflows/api/<name>.json (or the named ones)."""
    from headless.comfyui import import_comfyui
    from headless.server import ComfyServer

    import_comfyui()
    written = []
    with ComfyServer() as server, open_frontend(server.url) as page:
        for api_path in sorted((repo / "workflows" / "api").glob("*.json")):
            if names and api_path.stem not in names:
                continue
            api_graph = json.loads(api_path.read_text())
            wait_for_node_types(page, sorted({n["class_type"] for n in api_graph.values()}))
            note = api_path.with_suffix(".note.md")
            ui = api_to_ui(page, api_graph, api_path.stem, note.read_text().strip() if note.is_file() else None)
            out = repo / "workflows" / api_path.name
            out.write_text(json.dumps(ui, indent=2) + "\n")
            written.append(out)
    return written


if __name__ == "__main__":
    if sys.argv[1:2] != ["export"]:
        sys.exit("usage: python tests/frontend.py export [template name ...]")
    _repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(_repo))
    for path in export_templates(_repo, sys.argv[2:]):
        print(path)
