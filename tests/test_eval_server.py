"""Through the real ComfyUI: the protocol runner drives the pack's workflows, and the
Identity Score node scores and sorts a batch.

Stand-ins in real formats: the random SD1.5 checkpoint and a PortraitBooth file for the
zero-download face encoder (RetinaFace + dlib, 128-d). The generated images are noise,
so the protocol test checks the run (files, manifest, report), not the scores; the node
test uses real photos, whose scores are meaningful.
"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from standins.sd15 import build_portraitbooth_file
from conftest import started_server
from evaluation.__main__ import main
from face_fixtures import read_photo, zero_download_encoder  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # own server and protocol runs: ~30 s

WEIGHTS = "portraitbooth_eval_standin.safetensors"
NO_PACK = "none (zero-download RetinaFace)"


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd15_checkpoint):
    weights = tmp_path_factory.mktemp("portraitbooth")
    build_portraitbooth_file(weights / WEIGHTS)  # dlib:resnet128, what the zero-download encoder gives
    server = started_server(tmp_path_factory.mktemp("comfy-eval"), extra_model_paths={"portraitbooth": str(weights)})
    yield server
    server.stop()


def test_protocol_runner_generates_through_comfyui_and_scores(server, sd15_checkpoint, photos_dir, tmp_path):
    subjects = tmp_path / "subjects"
    (subjects / "obama").mkdir(parents=True)
    shutil.copy(photos_dir / "obama.jpg", subjects / "obama" / "ref.jpg")
    (subjects / "subjects.json").write_text(json.dumps({"obama": "man"}))
    out = tmp_path / "run"
    args = ["protocol", "--server", server.url, "--subjects", str(subjects), "--checkpoint", sd15_checkpoint,
            "--weights", WEIGHTS, "--prompts", "accessory", "--per-category", "2", "--images-per-prompt", "1",
            "--size", "64", "--steps", "2", "--out", str(out)]
    assert main(args) == 0

    images = sorted(p.name for p in (out / "images" / "obama").iterdir())
    assert images == ["accessory00_0.png", "accessory01_0.png"]
    assert Image.open(out / "images" / "obama" / images[0]).size == (64, 64)
    manifest = json.loads((out / "images" / "prompts.json").read_text())
    assert manifest["obama/accessory00_0.png"]["prompt"] == "a man wearing a red hat"
    assert manifest["obama/accessory01_0.png"]["seed"] == 1  # one seed per prompt
    result = json.loads((out / "scores.json").read_text())
    assert [r["file"] for r in result["images"]] == ["obama/accessory00_0.png", "obama/accessory01_0.png"]
    assert all(0.0 <= r["identity"] <= 1.0 for r in result["images"])
    assert (out / "scores.md").is_file() and (out / "contact_sheet.png").is_file()

    # A second run finds every image on disk and generates nothing: same bytes.
    before = (out / "images" / "obama" / images[0]).stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "images" / "obama" / images[0]).stat().st_mtime_ns == before


def test_the_multi_subject_protocol_runs_the_two_subject_workflow(server, sd15_checkpoint, photos_dir, tmp_path):
    subjects = tmp_path / "subjects"
    subjects.mkdir()
    for name in ("obama", "biden"):
        shutil.copy(photos_dir / f"{name}.jpg", subjects / f"{name}.jpg")
    out = tmp_path / "run"
    base = ["protocol", "--server", server.url, "--subjects", str(subjects), "--checkpoint", sd15_checkpoint,
            "--weights", WEIGHTS, "--out", str(out), "--class-word", "man"]
    assert main(base + ["--multi", "--prompts", "context", "--per-category", "1", "--images-per-prompt", "1",
                        "--size", "64", "--steps", "2"]) == 0
    manifest = json.loads((out / "images" / "prompts.json").read_text())
    assert manifest == {"biden+obama/context00_0.png": {
        "prompt": "a man and a man on the beach", "category": "context", "prompt_id": "context00", "seed": 0,
        "batch_index": 0}}
    assert Image.open(out / "images" / "biden+obama" / "context00_0.png").size == (96, 64)
    (record,) = json.loads((out / "scores.json").read_text())["images"]
    assert record["subjects"] == ["biden", "obama"] and len(record["per_subject"]) == 2

    (subjects / "biden.jpg").unlink()
    with pytest.raises(ValueError, match="at least two subjects"):
        main(base + ["--multi"])


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
