"""Through the real ComfyUI: the protocol runner drives the pack's workflows, and the
Identity Score node scores and sorts a batch.

Stand-ins in real formats (the session's template models): the random SD1.5 and SDXL
checkpoints, a PortraitBooth file for the zero-download face encoder (RetinaFace + dlib,
128-d), FastComposer's and PhotoMaker's stand-in releases imported with the CLI. The
generated images are noise, so the protocol test checks the run (files, manifest, report),
not the scores; the node test uses real photos, whose scores are meaningful.
"""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from standins.templates import PHOTOMAKER_FILES, WEIGHTS
from evaluation.__main__ import main
from face_fixtures import read_photo, zero_download_encoder  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # protocol runs of three methods through the session's server: ~1-2 min

NO_PACK = "none (zero-download RetinaFace)"
FASTCOMPOSER = "fastcomposer_postfuse.safetensors"  # what import-fastcomposer writes (standins/templates.py)
PHOTOMAKER_V2 = PHOTOMAKER_FILES["photomaker_v2.safetensors"]


@pytest.fixture(scope="module")
def server(models_server):
    # The session's server: the PortraitBooth stand-in (zero-download face encoder), FastComposer's
    # stand-in release imported with the CLI, the PhotoMaker stand-ins and a stand-in buffalo_l.
    return models_server


@pytest.fixture
def subjects(tmp_path, photos_dir):
    folder = tmp_path / "subjects"
    (folder / "obama").mkdir(parents=True)
    shutil.copy(photos_dir / "obama.jpg", folder / "obama" / "ref.jpg")
    shutil.copy(photos_dir / "biden.jpg", folder / "biden.jpg")
    (folder / "subjects.json").write_text(json.dumps({"obama": "man", "biden": "man"}))
    return folder


def test_protocol_runs_every_method_through_its_own_template_in_one_command_and_reports_them_side_by_side(
        server, sd15_checkpoint, sdxl_checkpoint, subjects, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["protocol", "--server", server.url, "--subjects", str(subjects), "--checkpoint", sd15_checkpoint,
            "--sdxl-checkpoint", sdxl_checkpoint, "--weights", WEIGHTS, "--weights", FASTCOMPOSER,
            "--weights", PHOTOMAKER_V2, "--setting", "both", "--prompts", "context", "--per-category", "1",
            "--images-per-prompt", "1", "--size", "64", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    stems = {WEIGHTS: "portraitbooth_templates_standin", FASTCOMPOSER: "fastcomposer_postfuse",
             PHOTOMAKER_V2: PHOTOMAKER_V2.removesuffix(".safetensors")}
    manifests = {}
    for name, stem in stems.items():
        single = json.loads((out / stem / "single" / "images" / "prompts.json").read_text())
        multi = json.loads((out / stem / "multi" / "images" / "prompts.json").read_text())
        assert sorted(single) == ["biden/context00_0.png", "obama/context00_0.png"]
        assert sorted(multi) == ["biden+obama/context00_0.png"]
        assert Image.open(out / stem / "single" / "images" / "obama" / "context00_0.png").size == (64, 64)
        manifests[name] = single
        for setting in ("single", "multi"):
            result = json.loads((out / stem / setting / "scores.json").read_text())
            assert all(0.0 <= r["identity"] <= 1.0 for r in result["images"])
            assert (out / f"sheet_{stem}_{setting}.png").is_file()
    # The method comes from the file; every method sees the same prompts and seeds.
    assert {n: m["obama/context00_0.png"]["method"] for n, m in manifests.items()} == {
        WEIGHTS: "PortraitBooth", FASTCOMPOSER: "FastComposer", PHOTOMAKER_V2: "PhotoMaker v2"}
    assert manifests[WEIGHTS]["obama/context00_0.png"]["prompt"] == "a man on the beach"
    assert manifests[PHOTOMAKER_V2]["obama/context00_0.png"]["prompt"] == "a man img on the beach"
    assert len({m["obama/context00_0.png"]["seed"] for m in manifests.values()}) == 1
    report = (out / "report.md").read_text()
    assert f"| FastComposer | {FASTCOMPOSER} |" in report and f"| PortraitBooth | {WEIGHTS} |" in report
    assert f"| PhotoMaker v2 | {PHOTOMAKER_V2} |" in report
    assert "| 0.514 / 0.243 | 0.431 / 0.243 |" in report and "| 0.657 / 0.245 | — / — |" in report
    rows = {r["weights"]: r for r in csv.DictReader((out / "report.csv").open())}
    assert rows[FASTCOMPOSER]["paper single Id"] == "0.514" and float(rows[FASTCOMPOSER]["single s/image"]) > 0
    assert "report.md" in capsys.readouterr().out

    # A second run finds every image complete and generates nothing: same files, same bytes.
    image = out / stems[FASTCOMPOSER] / "single" / "images" / "obama" / "context00_0.png"
    before = image.stat().st_mtime_ns
    assert main(args) == 0
    assert image.stat().st_mtime_ns == before


def test_a_two_subject_run_needs_two_subjects_and_a_method_needs_its_base_checkpoint(
        server, sd15_checkpoint, subjects, tmp_path):
    (subjects / "biden.jpg").unlink()
    base = ["protocol", "--server", server.url, "--subjects", str(subjects), "--checkpoint", sd15_checkpoint,
            "--out", str(tmp_path / "run"), "--weights", WEIGHTS]
    with pytest.raises(ValueError, match="at least two subjects"):
        main(base + ["--multi"])
    with pytest.raises(ValueError, match="--sdxl-checkpoint"):
        main(base + ["--weights", PHOTOMAKER_V2])
    with pytest.raises(ValueError, match="has no such file"):
        main(base + ["--weights", "nobody.safetensors"])


def face_crop(encoder, photo: np.ndarray, size: int = 256) -> np.ndarray:
    """A square around the photo's face, resized: same-size images for one batch."""
    (face,) = encoder.detect(photo, 0.6)
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    half = int(max(face.width, face.height) * 1.3)
    x0, y0 = max(0, int(cx) - half), max(0, int(cy) - half)
    crop = Image.fromarray(photo[y0:y0 + 2 * half, x0:x0 + 2 * half])
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))


def test_identity_score_node_scores_and_sorts_a_batch(server, photos_dir, tmp_path, zero_download_encoder):  # noqa: F811
    info = server.client.get_json("/object_info")
    assert "PortraitBoothIdentityScore" in info, "nodes/__init__.py must list *scoring.NODES"
    assert info["PortraitBoothIdentityScore"]["display_name"] == "Identity Score"
    assert info["PortraitBoothIdentityScore"]["category"] == "PortraitBooth/evaluate"

    batch = {"blank": np.full((256, 256, 3), 120, np.uint8),
             "biden": face_crop(zero_download_encoder, read_photo(photos_dir, "biden.jpg")),
             "obama2": face_crop(zero_download_encoder, read_photo(photos_dir, "obama2.jpg"))}
    names = {}
    for key, pixels in batch.items():
        Image.fromarray(pixels).save(tmp_path / f"{key}.png")
        names[key] = server.client.upload_image(tmp_path / f"{key}.png", name=f"eval_{key}.png")
    ref = server.client.upload_image(photos_dir / "obama.jpg", name="eval_ref_obama.jpg")
    graph = {
        "1": {"class_type": "PortraitBoothLoadFaceEncoder",
              "inputs": {"pack": NO_PACK, "detector": "auto", "recognizer": "auto", "provider": "cpu",
                         "det_size": 640, "mask_ears": False, "mask_hair": False, "mask_neck": False}},
        "2": {"class_type": "LoadImage", "inputs": {"image": ref}},
        "3": {"class_type": "PortraitBoothAnalyzeFaces",
              "inputs": {"face_encoder": ["1", 0], "images": ["2", 0], "select": "largest", "face_index": 0,
                         "on_no_face": "error", "det_threshold": 0.6}},
        "4": {"class_type": "LoadImage", "inputs": {"image": names["blank"]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": names["biden"]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": names["obama2"]}},
        "7": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["5", 0]}},
        "8": {"class_type": "ImageBatch", "inputs": {"image1": ["7", 0], "image2": ["6", 0]}},
        "9": {"class_type": "PortraitBoothIdentityScore",
              "inputs": {"face_encoder": ["1", 0], "reference": ["3", 0], "images": ["8", 0], "sort": True,
                         "det_threshold": 0.6}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "eval_sorted"}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["9", 3]}},
        "12": {"class_type": "PreviewAny", "inputs": {"source": ["9", 2]}},
    }
    result = server.client.run(graph, timeout=300)
    saved = [np.asarray(Image.open(io.BytesIO(server.client.fetch(f))).convert("RGB"))
             for f in result.images("10")]
    assert len(saved) == 3
    order = [next(k for k, v in batch.items() if np.array_equal(v, img)) for img in saved]
    assert order == ["obama2", "biden", "blank"], "best first: the same person, another person, no face"

    (report,) = result.texts("11")
    lines = report.splitlines()
    assert lines[0].startswith("Identity Score (dlib:resnet128), best first")
    assert lines[1].startswith("image 2: score 0.9") and "1 face found" in lines[1], report
    assert lines[2].startswith("image 1: score 0.8"), report
    assert lines[3] == "image 0: score 0.000 - no face found", report
    assert [json.loads(t) if t.startswith("[") else int(t) for t in result.texts("12")] in ([[2, 1, 0]], [2, 1, 0])
