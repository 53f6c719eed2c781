"""Write a scoring result: scores.json, scores.md (tables) and contact sheet PNG(s)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

THUMB = 160
CAPTION_LINES = 3
SHEET_MAX = 200  # images per contact sheet; a 2400-image protocol run gets 12 readable sheets


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(result: dict) -> str:
    lines = ["# Identity evaluation", "",
             f"Identity metric: `{result.get('identity_metric', 'pack (' + result['recognizer'] + ')')}` "
             f"({result['encoder']}); identity = max(cos, 0) of the "
             "largest face (one subject) or greedily matched faces (several), 0 without a face.", ""]
    for title, key in (("By prompt category", "by_category"), ("By subject(s)", "by_subjects")):
        lines += [f"## {title}", "", "| group | images | identity | faces found | CLIP-T | expression |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, s in result[key].items():
            lines.append(f"| {name} | {s['images']} | {_fmt(s['identity'])} | {_fmt(s['face_rate'])} | "
                         f"{_fmt(s['clip_text'])} | {_fmt(s['expression'])} |")
        lines.append("")
    lines += ["## Images", "", "| image | subjects | identity | faces | CLIP-T | expression | prompt |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in result["images"]:
        lines.append(f"| {r['file']} | {r['group']} | {_fmt(r['identity'])} | {r['faces']} | "
                     f"{_fmt(r.get('clip_text'))} | {_fmt(r.get('expression'))} | {r.get('prompt') or ''} |")
    return "\n".join(lines) + "\n"


def _thumbnail(path: Path):
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((THUMB, THUMB))
        canvas = Image.new("RGB", (THUMB, THUMB), (40, 40, 40))
        canvas.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
        return canvas


def contact_sheet(records: list[dict], images_dir: Path, out: Path, columns: int = 8) -> Path:
    """Thumbnails in a grid, each with its file name and scores written under it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_h = 12
    cell_h = THUMB + CAPTION_LINES * line_h + 6
    cols = max(1, min(columns, len(records)))
    rows = (len(records) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * THUMB, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(records):
        x, y = (k % cols) * THUMB, (k // cols) * cell_h
        sheet.paste(_thumbnail(images_dir / r["file"]), (x, y))
        ident = f"id {r['identity']:.3f}" if r["face_found"] else "id 0 (no face)"
        extra = [f"clip {r['clip_text']:.3f}" if r.get("clip_text") is not None else "",
                 f"expr {r['expression']:.3f}" if r.get("expression") is not None else ""]
        caption = [r["file"][-26:], f"{ident}  faces {r['faces']}", "  ".join(e for e in extra if e)]
        for j, text in enumerate(caption):
            draw.text((x + 3, y + THUMB + 2 + j * line_h), text, fill=(0, 0, 0), font=font)
        if r["face_found"] and r["identity"] is not None:
            # A bar over the thumbnail's bottom edge: scores readable at a glance.
            draw.rectangle((x, y + THUMB - 5, x + int(THUMB * min(r["identity"], 1.0)), y + THUMB - 1),
                           fill=(40, 170, 60))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def write_report(result: dict, images_dir: Path, out: Path) -> dict[str, list[Path] | Path]:
    """scores.json, scores.md and contact_sheet[_N].png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "scores.json"
    json_path.write_text(json.dumps(result, indent=1, default=_jsonable))
    md_path = out / "scores.md"
    md_path.write_text(markdown(result))
    records = result["images"]
    chunks = [records[i:i + SHEET_MAX] for i in range(0, len(records), SHEET_MAX)]
    sheets = [contact_sheet(chunk, images_dir, out / (f"contact_sheet_{n + 1}.png" if len(chunks) > 1
                                                      else "contact_sheet.png"))
              for n, chunk in enumerate(chunks)]
    return {"json": json_path, "markdown": md_path, "sheets": sheets}


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)
