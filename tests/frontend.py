"""Headless Chromium (Debian's) driving the real ComfyUI frontend, through Playwright.

Shared by the browser tests and two commands:
  python tests/frontend.py export    workflows/api/*.json (+ .note.md) -> the UI templates in
                                     workflows/, laid out by the frontend without overlaps
  python tests/frontend.py pictures [template name ...]
                                     the README's pictures in docs/images/: each template's
                                     canvas, and the attention-map preview of a stand-in run
                                     (named templates: only their canvases)
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


# The frontend's start-up is over once it has loaded its default workflow, or opened a dialog
# instead (1.32 opens its Templates browser for a user it takes for new, on a blank graph).
STARTED_JS = """() => window.LiteGraph && window.app && window.app.graph
    && ((window.app.graph._nodes || window.app.graph.nodes).length > 0
        || document.querySelector('.p-dialog') !== null)"""

# Every dialog and toast on screen as [id, text]; ones on their way out (closing animation) are
# gone. The id is stamped on the element when first seen: a dialog's text may change while it
# is open (the Templates browser fills in), so text cannot tell an old alert from a new one.
ALERTS_JS = """() => [...document.querySelectorAll('.p-dialog, .p-toast-message')]
    .filter(e => ![...e.classList].some(c => c.endsWith('-leave-active') || c.endsWith('-leave-to')))
    .map(e => [e.dataset.pbAlert ||= String(window.__pbAlerts = (window.__pbAlerts || 0) + 1), e.innerText.trim()])
    .filter(([id, text]) => text)"""

# What the frontend (1.32) heads its findings with when a workflow it loads has a problem:
# unknown node types, models not found, links or fields that fail its checks, an exception.
LOAD_PROBLEMS = ("missing nodes", "unsupported nodes", "missing models", "when loading the graph",
                 "workflow validation", "invalid workflow", "loading aborted")


def need_chromium() -> None:
    """For a test: skip without Playwright, fail without Debian's chromium."""
    import pytest

    pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is missing: scripts/setup_host.sh installs it (needs root)")


@contextlib.contextmanager
def open_frontend(url: str, viewport=(1400, 900)):
    """A Playwright page with the ComfyUI frontend loaded and its start-up over (STARTED_JS):
    whatever it opens by itself is on screen by then, not in the middle of a test."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            load_frontend(page, url)
            yield page
        finally:
            browser.close()


def load_frontend(page, url: str) -> None:
    """Open the frontend at `url` in `page` and wait until its start-up is over; the page's
    JavaScript errors collect in page.page_errors."""
    page.page_errors = []
    page.on("pageerror", lambda exc: page.page_errors.append(str(exc)))
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_function(STARTED_JS, timeout=90_000)


def wait_for_node_types(page, node_ids: list[str], timeout_ms: int = 60_000) -> None:
    page.wait_for_function("ids => ids.every(id => id in window.LiteGraph.registered_node_types)",
                           arg=list(node_ids), timeout=timeout_ms)


# Column layout, left to right in data-flow order: a node's column is one past its deepest
# input; a source (loader, latent, photo) sits just left of its first consumer instead of at
# the far left. Nodes are stacked in their column, ordered by where their inputs (sources:
# their consumers) are, so the picture reads like the graph. Stacking by measured size
# (title bar included) is what makes the result free of overlaps.
LAYOUT_JS = """([noteText, gapX, gapY]) => {
    const graph = window.app.graph;
    const TITLE = window.LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = (graph._nodes || graph.nodes).filter(n => n.type !== "Note");
    // The size the frontend gives a node on load (a long title widens it), never smaller.
    nodes.forEach(n => { const c = n.computeSize(); n.size = [Math.max(n.size[0], c[0]), Math.max(n.size[1], c[1])]; });
    const inputsOf = n => (n.inputs || []).map((_, i) => n.getInputNode(i)).filter(Boolean);
    const consumers = new Map(nodes.map(n => [n.id, []]));
    nodes.forEach(n => inputsOf(n).forEach(src => consumers.get(src.id).push(n)));
    const level = new Map();
    const depth = n => {
        if (!level.has(n.id)) {
            level.set(n.id, 0);
            level.set(n.id, Math.max(-1, ...inputsOf(n).map(depth)) + 1);
        }
        return level.get(n.id);
    };
    nodes.forEach(depth);
    nodes.filter(n => !inputsOf(n).length && consumers.get(n.id).length).forEach(n =>
        level.set(n.id, Math.max(0, Math.min(...consumers.get(n.id).map(c => level.get(c.id))) - 1)));
    const columns = [];
    nodes.forEach(n => (columns[level.get(n.id)] ||= []).push(n));
    const centre = new Map();
    const mean = xs => xs.reduce((a, b) => a + b, 0) / xs.length;
    const stack = (column, key) => {
        column.sort((a, b) => key(a) - key(b) || a.id - b.id);
        let y = 0;
        column.forEach(n => { centre.set(n.id, y + (TITLE + n.size[1]) / 2); y += TITLE + n.size[1] + gapY; });
    };
    // Left to right by the inputs' places; then a few sweeps by all neighbours' places (inputs
    // and consumers), which pulls each node level with what it connects to.
    columns.forEach(col => col && stack(col, n => inputsOf(n).length ? mean(inputsOf(n).map(s => centre.get(s.id))) : -1));
    const neighbours = n => inputsOf(n).concat(consumers.get(n.id));
    for (let sweep = 0; sweep < 4; sweep++)
        columns.forEach(col => col && stack(col, n => neighbours(n).length
                                            ? mean(neighbours(n).map(m => centre.get(m.id))) : centre.get(n.id)));
    let x = 0, top = 0;
    if (noteText) {
        const note = window.LiteGraph.createNode("Note");
        note.widgets[0].value = noteText;
        note.title = "Read me: what to change";
        // About 80 characters a line at this width; paragraphs add a blank line each.
        const lines = noteText.split(String.fromCharCode(10)).reduce((k, p) => k + Math.max(1, Math.ceil(p.length / 80)), 0);
        note.size = [640, Math.max(120, 24 + 17 * lines)];
        note.pos = [0, TITLE];
        graph.add(note);
        top = TITLE + note.size[1] + gapY;
    }
    columns.forEach(col => {
        if (!col) return;
        let y = top;
        col.forEach(n => { n.pos = [x, y + TITLE]; y += TITLE + n.size[1] + gapY; });
        x += Math.max(...col.map(n => n.size[0])) + gapX;
    });
    graph.setDirtyCanvas(true, true);
}"""


def api_to_ui(page, api_graph: dict, name: str, note: str | None = None) -> dict:
    """Let the frontend itself convert an API-format graph to a UI-format workflow, laid out
    in columns without overlapping nodes (LAYOUT_JS).

    note: text of a Note node placed above the graph (Notes are UI-only: an API graph
    cannot hold one, so it comes from workflows/api/<name>.note.md)."""
    page.evaluate("([g, n]) => window.app.loadApiJson(g, n)", [api_graph, name])
    page.wait_for_timeout(300)
    page.evaluate(LAYOUT_JS, [note or "", 60, 40])
    page.wait_for_timeout(100)
    # graphToPrompt's workflow is what "Save" writes. Go through JSON text: Playwright
    # turns JS `undefined` into null, which the frontend's schema check rejects on load.
    return json.loads(page.evaluate(
        "async () => JSON.stringify((await window.app.graphToPrompt()).workflow)"))


def visible_alerts(page) -> list[str]:
    """The text of each dialog and toast message on screen."""
    return [text for _, text in page.evaluate(ALERTS_JS)]


def load_ui_workflow(page, workflow: dict) -> dict:
    """Load a UI-format workflow; report unknown node types and the alerts on screen after.

    "alerts": what the load raised: dialogs and toasts that appeared while it loaded and speak
    of it (name one of its node types or titles, the pack's among them, or say what the
    frontend says of a workflow it finds wrong: LOAD_PROBLEMS). Not the pack's name alone: the
    Templates browser shows it too. "other_alerts": the rest, which the workflow did not
    cause: open before it loaded (a first-run dialog, say) or unrelated to it. A test that
    wants a clean screen checks both, and says which is which."""
    before = {alert_id for alert_id, _ in page.evaluate(ALERTS_JS)}
    page.evaluate("w => window.app.loadGraphData(JSON.parse(w))", json.dumps(workflow))
    page.wait_for_timeout(500)
    after = page.evaluate(ALERTS_JS)
    raised = [text for alert_id, text in after if alert_id not in before]
    names = {str(n.get(key)).lower() for n in workflow.get("nodes", []) for key in ("type", "title") if n.get(key)}
    names.discard("note")  # a word too common to tell a workflow's alert by

    def about_workflow(text: str) -> bool:
        text = text.lower()
        return any(word in text for word in (*names, *LOAD_PROBLEMS))

    result = page.evaluate("""() => {
        const known = window.LiteGraph.registered_node_types;
        const nodes = window.app.graph._nodes || window.app.graph.nodes;
        return {count: nodes.length,
                types: nodes.map(n => n.type),
                unknown: nodes.filter(n => !(n.type in known) || n.has_errors).map(n => n.type)};
    }""")
    result["alerts"] = [text for text in raised if about_workflow(text)]
    result["other_alerts"] = [text for alert_id, text in after
                              if alert_id in before or not about_workflow(text)]
    return result


def node_boxes(page) -> list[dict]:
    """Each node of the loaded graph as the canvas draws it: the box from node.pos/node.size
    with the title bar above pos (LiteGraph's NODE_TITLE_HEIGHT) included."""
    return page.evaluate("""() => {
        const title = window.LiteGraph.NODE_TITLE_HEIGHT;
        return (window.app.graph._nodes || window.app.graph.nodes).map(n => ({
            id: n.id, type: n.type, title: n.title,
            x: n.pos[0], y: n.pos[1] - title, w: n.size[0], h: n.size[1] + title}));
    }""")


def overlapping(boxes: list[dict]) -> list[str]:
    """'A overlaps B' for every pair of boxes that share area (touching edges do not count)."""
    found = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                    and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]):
                found.append(f"{a['type']} #{a['id']} ({a['title']}) overlaps {b['type']} #{b['id']} ({b['title']})")
    return found


def canvas_picture(page, out: Path, width: int = 1600, margin: int = 16) -> Path:
    """Screenshot of the whole loaded graph, cropped to it and saved as a small PNG.

    The canvas is zoomed so the graph fits `width` px (never above 1:1) with text drawn at
    every zoom (the frontend otherwise switches to a text-less sketch below ~60%), the
    frontend's menus and minimap are hidden, and the picture is stored with a 256-colour
    palette: flat colours and text, which a palette keeps legible at a fraction of the bytes."""
    import io

    from PIL import Image

    boxes = node_boxes(page)
    left, top = min(b["x"] for b in boxes), min(b["y"] for b in boxes)
    right, bottom = max(b["x"] + b["w"] for b in boxes), max(b["y"] + b["h"] for b in boxes)
    scale = min(1.0, (width - 2 * margin) / (right - left))
    shot_w = int((right - left) * scale) + 2 * margin
    shot_h = int((bottom - top) * scale) + 2 * margin
    viewport = page.viewport_size
    page.set_viewport_size({"width": shot_w, "height": shot_h})
    style = page.add_style_tag(content=".splitter-overlay-root, .p-toast { display: none !important; }")
    page.wait_for_timeout(300)
    page.evaluate("""([left, top, scale, margin]) => {
        const canvas = window.app.canvas;
        canvas._lowQualityZoomThreshold = 0;  // always the full drawing, text included
        canvas.show_info = false;  // the FPS/node-count corner
        canvas.ds.scale = scale;
        canvas.ds.offset = [margin / scale - left, margin / scale - top];
        canvas.setDirty(true, true);
        canvas.draw(true, true);
    }""", [left, top, scale, margin])
    page.wait_for_timeout(500)
    png = page.screenshot(clip={"x": 0, "y": 0, "width": shot_w, "height": shot_h})
    style.evaluate("e => e.remove()")  # the page goes on as it was (menus, alerts, size)
    page.set_viewport_size(viewport)
    picture = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, optimize=True)
    return out


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


PICTURES = Path("docs") / "images"
EXPRESSION_TEMPLATE = "portraitbooth_expression_ecac"


def _open_checked(page, path: Path) -> None:
    """Load a UI template; stop with what is wrong if the frontend does not take it cleanly."""
    workflow = json.loads(path.read_text())
    wait_for_node_types(page, sorted({n["type"] for n in workflow["nodes"] if n["type"] != "Note"}))
    loaded = load_ui_workflow(page, workflow)
    problems = loaded["unknown"] + loaded["alerts"] + loaded["other_alerts"] + overlapping(node_boxes(page))
    if problems:
        raise SystemExit(f"{path.name}: {problems}")


def make_pictures(repo: Path, names: list[str] | None = None) -> list[Path]:
    """The README's pictures, into docs/images/: each UI template's canvas in the real frontend,
    and attention_preview.png, the expression template run on the stand-ins (random weights)
    through the HTTP API: its image, then Attention Map Preview's overlay per word.
    names: only these templates' canvases (after editing a few templates)."""
    import io
    import tempfile

    from PIL import Image

    from headless.comfyui import import_comfyui, photos_dir
    from headless.server import ComfyServer
    from standins.sd15 import build_sd15_checkpoint
    from standins.templates import build_template_models, standin_graph, template_photos

    import_comfyui(cpu=True)
    checkpoint = "portraitbooth_test_sd15.safetensors"  # the tests' stand-in
    out = repo / PICTURES
    written = []
    with tempfile.TemporaryDirectory(prefix="pb-pictures-") as tmp:
        # Every model in the temp folder, none in the ComfyUI the server runs from.
        models = build_template_models(Path(tmp) / "models")
        models["checkpoints"] = str(build_sd15_checkpoint(Path(tmp) / "models" / "checkpoints" / checkpoint).parent)
        with ComfyServer(Path(tmp) / "comfy", extra_model_paths=models) as server, \
                open_frontend(server.url) as page:
            paths = sorted((repo / "workflows").glob("*.json"))
            unknown = sorted(set(names or ()) - {p.stem for p in paths})
            if unknown:
                raise SystemExit(f"no UI template named {', '.join(unknown)} in workflows/")
            for path in paths:
                if names and path.stem not in names:
                    continue
                _open_checked(page, path)
                written.append(canvas_picture(page, out / f"{path.stem}.png"))
            if names:
                return written

            photos = {f: server.client.upload_image(photos_dir() / f) for f in template_photos(EXPRESSION_TEMPLATE)}
            graph = standin_graph(EXPRESSION_TEMPLATE, checkpoint, photos, short_side=192, steps=8, batch=1)
            preview = next(nid for nid, n in graph.items() if n["class_type"] == "PortraitBoothAttentionPreview")
            shown = next(nid for nid, n in graph.items()
                         if n["class_type"] == "PreviewImage" and n["inputs"]["images"][0] == preview)
            saved = next(nid for nid, n in graph.items() if n["class_type"] == "SaveImage")
            result = server.client.run(graph, timeout=600)
            tiles = [Image.open(io.BytesIO(server.client.fetch(r))).convert("RGB")
                     for r in result.images(saved) + result.images(shown)]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), max(t.height for t in tiles)))
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + 8
    # Random-weight pictures are mostly noise, which no PNG filter shrinks: a palette does.
    strip.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out / "attention_preview.png", optimize=True)
    written.append(out / "attention_preview.png")
    return written


if __name__ == "__main__":
    _usage = "usage: python tests/frontend.py export [template name ...] | pictures [template name ...]"
    _repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(_repo))
    if sys.argv[1:2] == ["export"]:
        for _path in export_templates(_repo, sys.argv[2:]):
            print(_path)
    elif sys.argv[1:2] == ["pictures"]:
        for _path in make_pictures(_repo, sys.argv[2:]):
            print(f"{_path} ({_path.stat().st_size // 1024} KB)")
    else:
        sys.exit(_usage)
