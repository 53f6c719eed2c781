"""The protocol's summary in the layout of the PortraitBooth paper's Table 3: one row per
weight file, identity and CLIP-T for one and for two subjects, seconds per image, and the
paper's published numbers beside them (report.md, report.csv); plus one contact sheet per
method and setting, subjects down and prompt categories across (sheet_<weights>_<setting>.png).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .report import THUMB, _fmt, _thumbnail

# Table 3 of the PortraitBooth paper (arXiv 2312.06354), FastComposer's protocol; verbatim.
PAPER_TABLE3: dict[str, dict[str, tuple[str, str] | None]] = {
    "FastComposer": {"single": ("0.514", "0.243"), "multi": ("0.431", "0.243")},
    "PortraitBooth": {"single": ("0.657", "0.245"), "multi": None},
}
SETUP_NOTE = ("Reference columns: the PortraitBooth paper's Table 3 (15 subjects x 40 prompts x 4 images, Euler 50 "
              "steps, CFG 5, MTCNN + FaceNet identity, CLIP ViT-L/14 text score). This run's setup may differ "
              "(subjects, photos, checkpoint, prompts in our wording, the identity metric below, the hardware "
              "behind s/image): read the columns side by side, not as a reproduction unless every setting matches.")
COLUMNS = ["method", "weights", "single Id", "single CLIP-T", "single expression", "single s/image", "single images",
           "two Id", "two CLIP-T", "two s/image", "two images", "identity metric",
           "paper single Id", "paper single CLIP-T", "paper two Id", "paper two CLIP-T"]


def seconds_per_image(images_dir: Path) -> float | None:
    """Mean generation time of the images in the folder's manifest (None if none recorded)."""
    manifest = images_dir / "prompts.json"
    if not manifest.is_file():
        return None
    times = [e["seconds"] for e in json.loads(manifest.read_text()).values()
             if isinstance(e, dict) and isinstance(e.get("seconds"), (int, float))]
    return sum(times) / len(times) if times else None


def table_rows(runs: list[dict]) -> list[dict]:
    """runs: [{"method", "weights", "setting", "result" (score_folder's), "images_dir"}] -> rows."""
    rows: dict[str, dict] = {}
    for run in runs:
        row = rows.setdefault(run["weights"], {c: None for c in COLUMNS} | {"method": run["method"],
                                                                             "weights": run["weights"]})
        overall = run["result"]["by_category"]["all"]
        prefix = "single" if run["setting"] == "single" else "two"
        row[f"{prefix} Id"] = overall["identity"]
        row[f"{prefix} CLIP-T"] = overall["clip_text"]
        row[f"{prefix} s/image"] = seconds_per_image(run["images_dir"])
        row[f"{prefix} images"] = overall["images"]
        if prefix == "single":
            row["single expression"] = overall["expression"]
        metric = run["result"].get("identity_metric") or run["result"].get("recognizer")
        row["identity metric"] = metric if row["identity metric"] in (None, metric) else "mixed: see each run"
        paper = PAPER_TABLE3.get(run["method"], {})
        for setting, label in (("single", "single"), ("multi", "two")):
            ref = paper.get(setting)
            row[f"paper {label} Id"], row[f"paper {label} CLIP-T"] = ref if ref else ("—", "—")
    for method, paper in PAPER_TABLE3.items():  # the paper's rows stay in the table as reference lines
        if not any(r["method"] == method for r in rows.values()):
            row = {c: None for c in COLUMNS} | {"method": method, "weights": "(paper only)"}
            for setting, label in (("single", "single"), ("multi", "two")):
                ref = paper.get(setting)
                row[f"paper {label} Id"], row[f"paper {label} CLIP-T"] = ref if ref else ("—", "—")
            rows[f"paper:{method}"] = row
    return list(rows.values())


def _cell(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else (str(value) if isinstance(value, int) else _fmt(value))


def markdown_table(rows: list[dict]) -> str:
    lines = ["# Protocol results beside the PortraitBooth paper's Table 3", "", SETUP_NOTE, "",
             "| method | weights | single Id | single CLIP-T | two Id | two CLIP-T | s/image (single / two) | "
             "images (single / two) | paper single Id / CLIP-T | paper two Id / CLIP-T |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['weights']} | {_cell(r['single Id'])} | {_cell(r['single CLIP-T'])} | "
            f"{_cell(r['two Id'])} | {_cell(r['two CLIP-T'])} | "
            f"{_seconds(r['single s/image'])} / {_seconds(r['two s/image'])} | "
            f"{_cell(r['single images'])} / {_cell(r['two images'])} | "
            f"{r['paper single Id']} / {r['paper single CLIP-T']} | {r['paper two Id']} / {r['paper two CLIP-T']} |")
    metrics = sorted({r["identity metric"] for r in rows if r["identity metric"]})
    lines += ["", "Identity metric of this run's numbers: " + ("; ".join(f"`{m}`" for m in metrics) or "-") + ".",
              "Expression (CLIP cosine of the image with the prompt's emotion word; single subject, prompts with "
              "an emotion word only): " + ", ".join(f"{r['method']} {_cell(r['single expression'])}" for r in rows
                                                   if r["single expression"] is not None) + "."
              if any(r["single expression"] is not None for r in rows) else
              "Expression: no prompt with an emotion word in this run (add `--prompts expression` and `--clip`)."]
    return "\n".join(lines) + "\n"


def _seconds(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def csv_table(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ("" if r[c] is None else r[c]) for c in COLUMNS})
    return buffer.getvalue()


def category_sheet(result: dict, images_dir: Path, out: Path, title: str) -> Path:
    """Subjects (or pairs) down, prompt categories across: each cell the first image of the
    category's first prompt, its identity score under it."""
    from PIL import Image, ImageDraw, ImageFont

    records = result["images"]
    groups = sorted({r["group"] for r in records})
    categories = list(dict.fromkeys(r.get("category") or "-" for r in records))
    chosen = {}
    for r in sorted(records, key=lambda r: r["file"]):
        chosen.setdefault((r["group"], r.get("category") or "-"), r)
    font = ImageFont.load_default()
    label_w, head_h, line_h = 140, 30, 12
    cell_h = THUMB + line_h + 4
    sheet = Image.new("RGB", (label_w + THUMB * len(categories), head_h + cell_h * len(groups)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title[:60], fill=(0, 0, 0), font=font)
    for c, category in enumerate(categories):
        draw.text((label_w + c * THUMB + 4, head_h - 14), category, fill=(0, 0, 0), font=font)
    for g, group in enumerate(groups):
        y = head_h + g * cell_h
        draw.text((4, y + THUMB // 2), group[:22], fill=(0, 0, 0), font=font)
        for c, category in enumerate(categories):
            record = chosen.get((group, category))
            if record is None:
                continue
            x = label_w + c * THUMB
            sheet.paste(_thumbnail(images_dir / record["file"]), (x, y))
            ident = f"id {record['identity']:.3f}" if record["face_found"] else "id 0 (no face)"
            draw.text((x + 3, y + THUMB + 1), f"{record.get('prompt_id') or ''} {ident}", fill=(0, 0, 0), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def write_protocol_report(runs: list[dict], out: Path) -> dict[str, Path | list[Path]]:
    """report.md, report.csv and one category sheet per run, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs)
    md, table = out / "report.md", out / "report.csv"
    md.write_text(markdown_table(rows))
    table.write_text(csv_table(rows))
    sheets = [category_sheet(run["result"], run["images_dir"],
                             out / f"sheet_{run['images_dir'].parent.parent.name}_{run['setting']}.png",
                             f"{run['method']} ({run['weights']}), {run['setting']}")
              for run in runs]
    return {"markdown": md, "csv": table, "sheets": sheets}
