"""`python -m evaluation score` on a folder: JSON, Markdown and a contact sheet.

The identity scores are real (RetinaFace + dlib on real photos). No CLIP weights exist
here, so the CLIP part is a PLUMBING test: a tiny random CLIPModel saved the way
Hugging Face saves one, loaded by our loader from disk with the real CLIP tokenizer
(ComfyUI's SD1.5 tokenizer files); its similarities are meaningless, only shapes, ranges
and which images get which score are checked.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import COMFY_DIR
from evaluation.__main__ import main
from evaluation.clip_score import ClipWeightsError, emotion_words, load_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel (2 layers, width 32) in Hugging Face layout + the real tokenizer files."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=49408),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(COMFY_DIR / "comfy" / "sd1_tokenizer" / name, folder / name)
    return folder


@pytest.fixture
def folders(tmp_path, photos_dir):
    refs, images = tmp_path / "refs", tmp_path / "images"
    (refs / "obama").mkdir(parents=True)
    shutil.copy(photos_dir / "obama.jpg", refs / "obama" / "a.jpg")
    shutil.copy(photos_dir / "biden.jpg", refs / "biden.jpg")
    (images / "obama").mkdir(parents=True)
    (images / "biden").mkdir()
    shutil.copy(photos_dir / "obama2.jpg", images / "obama" / "accessory00_0.jpg")
    shutil.copy(photos_dir / "biden.jpg", images / "obama" / "accessory00_1.jpg")  # the wrong person
    Image.new("RGB", (128, 128), (90, 90, 90)).save(images / "obama" / "style00_0.png")  # no face
    shutil.copy(photos_dir / "biden.jpg", images / "biden" / "action00_0.jpg")
    manifest = {"obama/accessory00_0.jpg": {"prompt": "a man wearing a red hat, smiling", "category": "accessory"},
                "obama/accessory00_1.jpg": {"prompt": "a man wearing a red hat", "category": "accessory"},
                "obama/style00_0.png": {"prompt": "a watercolor painting of a man", "category": "style"},
                "biden/action00_0.jpg": {"prompt": "a man riding a horse, in tears", "category": "action"}}
    (images / "prompts.json").write_text(json.dumps(manifest))
    return refs, images


def test_score_writes_json_markdown_and_a_contact_sheet(folders, tmp_path, tiny_clip, capsys):
    refs, images = folders
    out = tmp_path / "report"
    assert main(["score", "--references", str(refs), "--images", str(images), "--out", str(out),
                 "--clip", str(tiny_clip)]) == 0
    result = json.loads((out / "scores.json").read_text())
    by_file = {r["file"]: r for r in result["images"]}
    assert set(by_file) == {"obama/accessory00_0.jpg", "obama/accessory00_1.jpg", "obama/style00_0.png",
                            "biden/action00_0.jpg"}
    assert result["recognizer"] == "dlib:resnet128"
    same, wrong = by_file["obama/accessory00_0.jpg"], by_file["obama/accessory00_1.jpg"]
    assert same["identity"] > wrong["identity"] + 0.05
    assert by_file["obama/style00_0.png"]["identity"] == 0.0 and not by_file["obama/style00_0.png"]["face_found"]
    assert by_file["biden/action00_0.jpg"]["identity"] > 0.99  # the reference photo itself
    # Plumbing: every image with a prompt gets a CLIP-T in [-1, 1]; only prompts with an
    # emotion word get an expression coefficient.
    assert all(-1.0 <= r["clip_text"] <= 1.0 for r in result["images"])
    assert {f for f, r in by_file.items() if r["expression"] is not None} == {"obama/accessory00_0.jpg",
                                                                              "biden/action00_0.jpg"}
    cats = result["by_category"]
    assert cats["all"]["images"] == 4 and cats["all"]["face_rate"] == 0.75
    assert cats["accessory"]["identity"] == pytest.approx((same["identity"] + wrong["identity"]) / 2)

    md = (out / "scores.md").read_text()
    assert "| accessory | 2 |" in md and "obama/style00_0.png" in md
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width == 4 * 160 and sheet.height > 160
    # Sheet order is the JSON order; the no-face cell shows the flat gray image we saved.
    k = [r["file"] for r in result["images"]].index("obama/style00_0.png")
    cell = np.asarray(sheet.convert("RGB"))[20:140, k * 160 + 20:k * 160 + 140]
    assert np.abs(cell.astype(int) - 90).max() <= 2
    printed = capsys.readouterr().out
    assert "identity" in printed and "scores.json" in printed


def test_images_named_after_an_unknown_subject_are_refused(folders, tmp_path):
    refs, images = folders
    (images / "lincoln").mkdir()
    shutil.copy(images / "obama" / "style00_0.png", images / "lincoln" / "x.png")
    with pytest.raises(ValueError, match="lincoln"):
        main(["score", "--references", str(refs), "--images", str(images), "--out", str(tmp_path / "o")])


def test_clip_loads_from_a_folder_or_a_safetensors_file_and_never_from_a_name(tiny_clip, tmp_path):
    pic = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    folder_scorer = load_clip(tiny_clip)
    file_scorer = load_clip(tiny_clip / "model.safetensors")  # config.json beside it gives the shape
    assert folder_scorer.image_embeddings([pic]).shape == (1, 16)
    a = folder_scorer.text_image([pic], ["a photo of a man"])
    b = file_scorer.text_image([pic], ["a photo of a man"])
    assert a == pytest.approx(b, abs=1e-5)
    norms = folder_scorer.text_embeddings(["a", "a photo of a woman"]).norm(dim=-1)
    assert norms.numpy() == pytest.approx([1.0, 1.0], abs=1e-5)
    with pytest.raises(ClipWeightsError, match="nothing is downloaded"):
        load_clip("openai/clip-vit-large-patch14")  # a hub id is not a local path
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tiny_clip / "config.json", lone / "config.json")
    save_file({"vision_model.weight": torch.zeros(2)}, str(lone / "clip.safetensors"))
    with pytest.raises(ClipWeightsError, match="not a CLIPModel state dict"):
        load_clip(lone / "clip.safetensors", tokenizer_dir=tiny_clip)
    with pytest.raises(ClipWeightsError, match="tokenizer"):
        load_clip(tiny_clip / "model.safetensors", tokenizer_dir=lone)


def test_emotion_words_are_found_as_written():
    assert emotion_words("a man riding a horse, in tears") == ["tears"]
    assert emotion_words("a Smiling woman") == ["smiling"]
    assert emotion_words("a man in a red hat") == []
