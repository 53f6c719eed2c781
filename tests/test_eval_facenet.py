"""`--identity-metric facenet`: FastComposer's MTCNN + FaceNet identity score.

The MTCNN weights are the real ones from the facenet-pytorch wheel; the InceptionResnetV1
weights are a seeded random stand-in saved the way the real VGGFace2 file is (a torch.save'd
state dict of InceptionResnetV1 with its 8631-class head), so the scores mean nothing as
identities. What is checked is that our metric computes exactly what facenet-pytorch's own
modules compute with FastComposer's settings, on real face photos.
"""
from __future__ import annotations

import builtins
import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

try:
    import facenet_pytorch
except ImportError:  # setup_host.sh installs it: its absence is a broken host, not a reason to skip
    pytest.fail("facenet-pytorch is not installed: run `bash scripts/setup_host.sh` "
                "(or python -m pip install --no-deps facenet-pytorch==2.6.0)", pytrace=False)

from evaluation.__main__ import cli, main  # noqa: E402
from evaluation.facenet import FaceNetMetric, FaceNetUnavailableError, FaceNetWeightsError  # noqa: E402


@pytest.fixture(scope="module")
def standin_state(photos_dir) -> dict[str, torch.Tensor]:
    """Seeded random InceptionResnetV1 whose BatchNorm statistics are measured on face crops:
    with init statistics every face embeds to nearly the same vector (cosines all ~1), which
    would let a wrong face or a wrong crop pass unnoticed."""
    torch.manual_seed(0)
    model = facenet_pytorch.InceptionResnetV1(pretrained=None, classify=True, num_classes=8631)
    mtcnn = facenet_pytorch.MTCNN(keep_all=True)
    crops = torch.cat([mtcnn(Image.open(photos_dir / n).convert("RGB"))[:1]
                       for n in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.png", "t1.jpg")])
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.reset_running_stats()
            module.momentum = None  # cumulative: the statistics of exactly this batch
    with torch.no_grad():
        model.train()(torch.cat([crops, crops.flip(3)]))
    return model.state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, standin_state) -> dict[str, object]:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("facenet")
    pt = folder / "vggface2-standin.pt"
    torch.save(standin_state, pt)  # like 20180402-114759-vggface2.pt: head and BatchNorm counters included
    st = folder / "vggface2-standin.safetensors"
    save_file({k: v.contiguous() for k, v in standin_state.items()
               if not k.startswith("logits.") and not k.endswith("num_batches_tracked")}, str(st))
    return {"pt": pt, "safetensors": st, "folder": folder}


@pytest.fixture(scope="module")
def photos(photos_dir, tmp_path_factory) -> dict[str, object]:
    """Reference and generated folders from the real photos, plus a two-face composite."""
    root = tmp_path_factory.mktemp("facenet_photos")
    refs, images = root / "refs", root / "images"
    (refs / "obama").mkdir(parents=True)
    # obama.jpg has a small second face in the background: the largest must be the one used.
    shutil.copy(photos_dir / "obama.jpg", refs / "obama" / "a.jpg")
    shutil.copy(photos_dir / "obama3.jpg", refs / "obama" / "b.jpg")  # not used: one photo per subject
    shutil.copy(photos_dir / "biden.jpg", refs / "biden.jpg")
    (images / "obama").mkdir(parents=True)
    (images / "biden").mkdir()
    (images / "obama+biden").mkdir()
    shutil.copy(photos_dir / "obama2.jpg", images / "biden" / "wrong.jpg")  # a negative cosine: scores 0
    shutil.copy(photos_dir / "obama2.jpg", images / "obama" / "same.jpg")
    shutil.copy(photos_dir / "biden.jpg", images / "obama" / "other.jpg")
    Image.new("RGB", (160, 160), (90, 90, 90)).save(images / "obama" / "flat.png")
    halves = []
    for name in ("biden.jpg", "obama2.jpg"):  # biden left, obama right: matching must not go by position
        with Image.open(photos_dir / name) as im:
            halves.append(im.convert("RGB").resize((round(im.width * 600 / im.height), 600)))
    pair = Image.new("RGB", (sum(h.width for h in halves), 600))
    pair.paste(halves[0], (0, 0))
    pair.paste(halves[1], (halves[0].width, 0))
    pair.save(images / "obama+biden" / "pair.png")
    return {"refs": refs, "images": images, "pair_split": halves[0].width}


def _fastcomposer_scores(photos, state) -> dict[str, float]:
    """FastComposer's evaluation written against facenet-pytorch directly (its MTCNN class,
    its forward), independent of evaluation.facenet; the two-subject image greedily matched."""
    mtcnn = facenet_pytorch.MTCNN(image_size=160, margin=0, min_face_size=20, thresholds=[0.6, 0.7, 0.7],
                                  factor=0.709, post_process=True, keep_all=True, device="cpu")
    resnet = facenet_pytorch.InceptionResnetV1(pretrained=None, classify=False).eval()
    resnet.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")})

    def faces(path):
        with torch.no_grad():
            crops = mtcnn(Image.open(path).convert("RGB"))
            return None if crops is None else resnet(crops)

    ref = {"obama": faces(photos["refs"] / "obama" / "a.jpg")[:1], "biden": faces(photos["refs"] / "biden.jpg")[:1]}
    out = {}
    for rel in ("obama/same.jpg", "obama/other.jpg", "obama/flat.png", "biden/wrong.jpg"):
        emb = faces(photos["images"] / rel)
        out[rel] = None if emb is None else (emb[:1] @ ref[rel.split("/")[0]].T).item()
    emb = faces(photos["images"] / "obama+biden" / "pair.png")
    sim = (torch.cat([ref["obama"], ref["biden"]]) @ emb.T).numpy().astype(np.float64)
    matched = []
    for _ in range(2):
        s, f = np.unravel_index(np.argmax(sim), sim.shape)
        matched.append(max(sim[s, f], 0.0))
        sim[s, :], sim[:, f] = -np.inf, -np.inf
    out["obama+biden/pair.png"] = float(np.mean(matched))
    return out  # one subject: the cosine (None: no face); the pair: its score


def test_facenet_scores_equal_fastcomposers_mtcnn_and_inception_resnet(photos, weights, standin_state, tmp_path,
                                                                        capsys):
    out = tmp_path / "report"
    assert main(["score", "--references", str(photos["refs"]), "--images", str(photos["images"]),
                 "--out", str(out), "--identity-metric", "facenet", "--facenet-weights", str(weights["pt"])]) == 0
    result = json.loads((out / "scores.json").read_text())
    got = {r["file"]: r for r in result["images"]}
    expected = _fastcomposer_scores(photos, standin_state)
    assert set(got) == set(expected)
    for name, cos in expected.items():
        if name != "obama+biden/pair.png" and cos is not None:
            assert got[name]["per_subject"][0]["cosine"] == pytest.approx(cos, abs=1e-5), name
        assert got[name]["identity"] == pytest.approx(max(cos or 0.0, 0.0), abs=1e-5), name
    # The stand-in tells faces apart, so the checks above can fail: distinct cosines, one negative.
    assert expected["biden/wrong.jpg"] < 0 and got["biden/wrong.jpg"]["identity"] == 0.0
    assert 0.1 < expected["obama/other.jpg"] < expected["obama/same.jpg"] < 0.95
    assert expected["obama/flat.png"] is None
    assert got["obama/flat.png"]["identity"] == 0.0 and got["obama/flat.png"]["faces"] == 0
    assert not got["obama/flat.png"]["face_found"]
    pair = got["obama+biden/pair.png"]
    left = [pair["boxes"][s["face"]][0] < photos["pair_split"] for s in pair["per_subject"]]
    assert pair["faces"] == 2 and left == [False, True]  # obama found on the right, biden on the left
    metric = "facenet (MTCNN + InceptionResnetV1 vggface2: vggface2-standin.pt)"
    assert result["identity_metric"] == metric
    assert result["reference_photos"]["obama"].endswith("a.jpg")
    assert result["facenet"]["thresholds"] == [0.6, 0.7, 0.7] and result["facenet"]["image_size"] == 160
    assert f"Identity metric: `{metric}`" in (out / "scores.md").read_text()
    assert metric in capsys.readouterr().out


def test_a_safetensors_copy_of_the_weights_embeds_the_same(photos, weights):
    image = np.asarray(Image.open(photos["images"] / "obama" / "same.jpg").convert("RGB"))
    a, b = FaceNetMetric(weights["pt"]), FaceNetMetric(weights["safetensors"])
    faces = a.detect(image)
    assert len(faces) == 1
    assert np.allclose(a.recognizer.embed_faces(image, faces), b.recognizer.embed_faces(image, faces), atol=1e-6)
    assert b.description == "facenet (MTCNN + InceptionResnetV1 vggface2: vggface2-standin.safetensors)"


def test_the_pack_scorer_stays_the_default_and_reports_name_it(photos, tmp_path):
    refs = tmp_path / "refs"
    shutil.copytree(photos["refs"] / "obama", refs / "obama")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(photos["images"] / "obama" / "flat.png", images / "flat.png")
    assert main(["score", "--references", str(refs), "--images", str(images), "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert result["identity_metric"] == f"pack ({result['recognizer']})" and "facenet" not in result
    assert f"Identity metric: `pack ({result['recognizer']})`" in (tmp_path / "o" / "scores.md").read_text()


def _cli_error(monkeypatch, capsys, argv: list[str]) -> str:
    monkeypatch.setattr(sys, "argv", ["python -m evaluation", *argv])
    assert cli() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_facenet_without_weights_is_refused(photos, tmp_path, monkeypatch, capsys):
    err = _cli_error(monkeypatch, capsys, ["score", "--references", str(photos["refs"]), "--images",
                                           str(photos["images"]), "--out", str(tmp_path), "--identity-metric",
                                           "facenet"])
    assert "--identity-metric facenet needs --facenet-weights" in err and "nothing is downloaded" in err
    assert not (tmp_path / "scores.json").exists()


def test_a_missing_weights_file_is_one_line_saying_where_to_get_it(photos, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "20180402-114759-vggface2.pt"
    err = _cli_error(monkeypatch, capsys, ["score", "--references", str(photos["refs"]), "--images",
                                           str(photos["images"]), "--out", str(tmp_path), "--identity-metric",
                                           "facenet", "--facenet-weights", str(missing)])
    assert str(missing) in err and "facenet-pytorch/releases" in err and "nothing is downloaded" in err


def test_missing_facenet_pytorch_is_one_line_with_the_install_command(photos, weights, tmp_path, monkeypatch,
                                                                      capsys):
    real_import = builtins.__import__

    def no_facenet(name, *args, **kwargs):
        if name.split(".")[0] == "facenet_pytorch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_facenet)
    err = _cli_error(monkeypatch, capsys, ["score", "--references", str(photos["refs"]), "--images",
                                           str(photos["images"]), "--out", str(tmp_path), "--identity-metric",
                                           "facenet", "--facenet-weights", str(weights["pt"])])
    assert "python -m pip install --no-deps facenet-pytorch==2.6.0" in err
    with pytest.raises(FaceNetUnavailableError):
        FaceNetMetric(weights["pt"])


def test_weights_that_are_not_vggface2_inception_resnet_are_refused(weights, standin_state):
    folder = weights["folder"]
    bad = {
        "keys": {"conv.weight": torch.zeros(3)},
        "shape": {**standin_state, "last_linear.weight": torch.zeros(256, 1792)},
        "casia": {**standin_state, "logits.weight": torch.zeros(10575, 512), "logits.bias": torch.zeros(10575)},
    }
    messages = {"keys": "not an InceptionResnetV1 state dict",
                "shape": re.escape("last_linear.weight (256, 1792) (expected (512, 1792))"),
                "casia": "10575-class head"}
    for name, state in bad.items():
        path = folder / f"{name}.pt"
        torch.save(state, path)
        with pytest.raises(FaceNetWeightsError, match=messages[name]) as info:
            FaceNetMetric(path)
        assert str(path) in str(info.value) and "20180402-114759-vggface2.pt" in str(info.value)
    pickle = folder / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickle)  # a pickled module: refused by weights_only
    with pytest.raises(FaceNetWeightsError, match="could not be read as a state dict"):
        FaceNetMetric(pickle)
