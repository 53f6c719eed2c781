"""Dataset building from real photos: samples, references, token positions, the skipped
report, WebDataset-layout shards, resuming an interrupted build, videos."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from training_fixtures import *  # noqa: F401,F403
from training_fixtures import build_settings


def samples_by_source(dataset_dir) -> dict:
    from training.dataset.shards import ShardReader

    reader = ShardReader(dataset_dir)
    out = {}
    for i in range(len(reader)):
        raw = reader.read(i)
        out[json.loads(raw["json"])["source"]] = raw
    return out


def test_builds_samples_and_reports_every_skipped_file(dataset_dir):
    report = json.loads((dataset_dir / "report.json").read_text())
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert skipped.keys() == {"obama/corrupt.jpg", "group/t1.jpg"}
    assert "corrupt or unreadable image" in skipped["obama/corrupt.jpg"]
    assert "several faces (6)" in skipped["group/t1.jpg"]
    # biden and the astronaut have one photo each: kept, with a warning about the reference.
    assert sorted(w.split(":")[0] for w in report["warnings"]) == ["astronaut/astronaut.png", "biden/biden.jpg"]
    index = json.loads((dataset_dir / "index.json").read_text())
    assert index["samples"] == report["samples"] == 5 and index["resolution"] == 64
    assert index["face_encoder"]["kind"] == "arcface:standin/w600k_r50.onnx" and index["face_encoder"]["dim"] == 512
    assert index["identity_words"] == ["man", "woman"]


def test_sample_contents(dataset_dir):
    from training.dataset.samples import decode

    samples = samples_by_source(dataset_dir)
    obama = json.loads(samples["obama/obama.jpg"]["json"])
    # "a smiling gentleman in a suit": the subject word becomes "man"; "smiling" is the expression.
    assert obama["caption"] == "a smiling man in a suit"
    assert obama["identity_positions"] == [3] and obama["expression_positions"] == [2]
    assert obama["expression_words"] == ["smiling"]
    assert obama["reference_source"] == "obama/obama2.jpg" and not obama["reference_same_image"]
    biden = json.loads(samples["biden/biden.jpg"]["json"])
    assert biden["caption"] == "portrait of a happy man" and biden["expression_words"] == ["happy"]
    astronaut = json.loads(samples["astronaut/astronaut.png"]["json"])
    assert astronaut["caption"] == "a photo of a woman" and astronaut["identity_positions"] == [5]
    sample = decode(samples["obama/obama3.jpg"])
    assert sample["image"].shape == (3, 64, 64) and sample["ref"].shape == (3, 112, 112)
    assert abs(float(sample["embedding"].norm()) - 1) < 1e-5
    # The face mask covers the landmarks and not the whole frame.
    mask, lm = sample["mask"], sample["landmarks"].round().long()
    assert all(mask[y, x] > 0.5 for x, y in lm.tolist()) and 0.02 < float(mask.mean()) < 0.6


def test_references_come_from_another_photo_of_the_person(dataset_dir, people_dir, train_encoder):
    import io

    from training.build.sources import load_image

    samples = samples_by_source(dataset_dir)
    metas = [json.loads(v["json"]) for v in samples.values()]
    assert {m["source"]: m["reference_source"] for m in metas if m["person"] == "obama"} == {
        "obama/obama.jpg": "obama/obama2.jpg", "obama/obama2.jpg": "obama/obama3.jpg",
        "obama/obama3.jpg": "obama/obama.jpg"}
    # The cached embedding is the reference photo's face, as the face encoder sees it.
    analysis = train_encoder.analyze([load_image(people_dir / "obama" / "obama2.jpg")])
    cached = np.load(io.BytesIO(samples["obama/obama.jpg"]["emb.npy"]))
    assert float(cached @ analysis.identity.vector.numpy()) > 0.999
    own = np.load(io.BytesIO(samples["obama/obama2.jpg"]["emb.npy"]))
    assert float(cached @ own) < 0.999


def test_shards_are_plain_tars_in_webdataset_layout(dataset_dir):
    index = json.loads((dataset_dir / "index.json").read_text())
    keys = []
    for shard in index["shards"]:
        with tarfile.open(dataset_dir / shard["tar"]) as tar:
            names = tar.getnames()
        groups = {}
        for name in names:
            key, ext = name.split(".", 1)
            groups.setdefault(key, []).append(ext)
        assert all(sorted(exts) == ["emb.npy", "jpg", "json", "mask.png", "ref.png"] for exts in groups.values())
        assert len(groups) == shard["count"]
        keys += list(groups)
    assert keys == sorted(keys) and len(keys) == index["samples"]
    assert not list(dataset_dir.glob(".*.tmp"))


def test_missing_class_word_is_skipped_with_its_reason(tmp_path, people_dir, train_encoder):
    import shutil

    from training.build.builder import DatasetBuilder

    src = tmp_path / "src"
    shutil.copytree(people_dir / "obama", src / "obama")
    (src / "obama" / "obama3.txt").write_text("a photo of a politician at a desk")
    report = DatasetBuilder(src, tmp_path / "out", train_encoder, build_settings(), progress=False).build()
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert reasons["obama/obama3.jpg"].startswith("no class word in caption")
    assert report["samples"] == 2


def test_interrupted_build_resumes_without_redoing_finished_people(tmp_path, people_dir, train_encoder,
                                                                   dataset_dir, monkeypatch):
    from training.build.builder import DatasetBuilder

    out = tmp_path / "resumed"
    seen = []
    original = DatasetBuilder._person_samples

    def interrupted(self, person):
        if person.name == "group":  # third of four people: after 2 closed shards
            raise KeyboardInterrupt
        seen.append(person.name)
        return original(self, person)

    monkeypatch.setattr(DatasetBuilder, "_person_samples", interrupted)
    with pytest.raises(KeyboardInterrupt):
        DatasetBuilder(people_dir, out, train_encoder, build_settings(shard_size=2), progress=False).build()
    assert not (out / "index.json").exists()
    monkeypatch.setattr(DatasetBuilder, "_person_samples", lambda self, p: (seen.append(p.name), original(self, p))[1])
    seen.clear()
    DatasetBuilder(people_dir, out, train_encoder, build_settings(shard_size=2), progress=False).build()
    assert seen == ["group", "obama"]  # astronaut and biden were already in closed shards
    for name in ("index.json", "report.json"):
        assert json.loads((out / name).read_text()) == json.loads((dataset_dir / name).read_text())
    for tar in sorted(dataset_dir.glob("*.tar")):
        assert (out / tar.name).read_bytes() == tar.read_bytes()  # byte-identical shards


def test_video_gives_end_frames_as_targets_and_the_middle_as_reference(tmp_path, photos_dir, train_encoder):
    cv2 = pytest.importorskip("cv2")
    from training.build.builder import DatasetBuilder
    from training.build.sources import video_frames

    person = tmp_path / "src" / "obama"
    person.mkdir(parents=True)
    writer = cv2.VideoWriter(str(person / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (320, 320))
    for name in ["obama.jpg"] * 3 + ["obama2.jpg"] * 3 + ["obama3.jpg"] * 3:
        frame = cv2.resize(cv2.imread(str(photos_dir / name)), (320, 320))
        writer.write(frame)
    writer.release()
    (person / "clip.txt").write_text("a man talking")
    targets, middle = video_frames(person / "clip.avi")
    assert len(targets) == 2 and middle.shape == (320, 320, 3)
    report = DatasetBuilder(tmp_path / "src", tmp_path / "out", train_encoder, build_settings(),
                            progress=False).build()
    assert report["samples"] == 2 and not report["skipped"]
    metas = [json.loads(v["json"]) for v in samples_by_source(tmp_path / "out").values()]
    assert sorted(m["source"] for m in metas) == ["obama/clip.avi#target0", "obama/clip.avi#target1"]
    assert {m["reference_source"] for m in metas} == {"obama/clip.avi#middle"}
