"""insightface packs run through insightface: the identity computed here is the one
`insightface.app.FaceAnalysis` computes (what IPAdapter FaceID, InstantID and PuLID use),
nothing is ever downloaded, and pack folder mistakes say which folder was searched.

The packs are stand-ins in the real files' formats (tests/standins_face.py): the three SCRFD
output layouts (buffalo_l's det_10g, antelopev2's batched scrfd_10g_bnkps, the fixed-shape
2.5g export), ArcFace with and without the MXNet normalization nodes, and genderage.onnx.
"""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from face_fixtures import read_photo
from portraitbooth_core.face import NoFaceError, PackError, build_encoder, pack_folder, uint8_to_comfy
from standins_face import build_arcface_onnx, build_genderage_onnx, build_scrfd_onnx

insightface = pytest.importorskip("insightface", reason="insightface packs need insightface (requirements-test.txt)")

PHOTOS = ("astronaut.png", "obama.jpg", "t1.jpg")
PACKS = ("buffalo_l", "antelopev2", "mxnet_2p5g")


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """<root>/models/<pack>/ folders in the three real layouts."""
    root = tmp_path_factory.mktemp("insightface_packs")
    models = root / "models"
    buffalo = models / "buffalo_l"
    build_scrfd_onnx(buffalo / "det_10g.onnx", layout="det_10g")
    build_arcface_onnx(buffalo / "w600k_r50.onnx", seed=2)
    build_genderage_onnx(buffalo / "genderage.onnx")
    antelope = models / "antelopev2" / "antelopev2"  # unpacked one level too deep, as the zip does
    build_scrfd_onnx(antelope / "scrfd_10g_bnkps.onnx", layout="scrfd_10g_bnkps")
    build_arcface_onnx(antelope / "glintr100.onnx", seed=3)
    build_genderage_onnx(antelope / "genderage.onnx")
    mxnet = models / "mxnet_2p5g"
    build_scrfd_onnx(mxnet / "scrfd_2.5g_bnkps_shape640x640.onnx", layout="scrfd_2.5g_shape640")
    build_arcface_onnx(mxnet / "arcface_r100_v1.onnx", seed=4, mxnet=True)
    (models / "empty").mkdir()
    return models


def marked(rgb: np.ndarray) -> np.ndarray:
    """The photo dimmed by 3 % (so no pixel is pure white) with three white squares: the
    stand-in detector's faces, whose crops then hold the photo's own pixels."""
    img = (rgb.astype(np.float32) * 0.97).astype(np.uint8)
    h, w = img.shape[:2]
    side = int(np.ceil(6 * max(h, w) / 640))  # about 6 px after the letterbox resize: one face per square
    for fx, fy in ((0.3, 0.35), (0.62, 0.4), (0.45, 0.72)):
        x, y = int(fx * w), int(fy * h)
        img[y:y + side, x:x + side] = 255
    return img


@pytest.fixture(scope="module")
def photos(photos_dir):
    return {name: marked(read_photo(photos_dir, name)) for name in PHOTOS}


def _faceanalysis(folder):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(folder), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))  # det_thresh: insightface's default 0.5
    return app


@pytest.mark.parametrize("pack", PACKS)
def test_embeddings_landmarks_gender_and_age_equal_faceanalysis(pack, packs, photos):
    folder = pack_folder(packs / pack)
    app = _faceanalysis(folder)
    encoder = build_encoder(packs / pack, provider="cpu")  # every setting at its default
    assert encoder.detector.det_size == (640, 640)
    checked = 0
    for name, rgb in photos.items():
        theirs = app.get(np.ascontiguousarray(rgb[:, :, ::-1]))  # insightface reads BGR
        ours = sorted(encoder.detect(rgb), key=lambda f: f.rank)  # back into insightface's order
        assert len(ours) == len(theirs) == 3, name
        for mine, their in zip(ours, theirs):
            np.testing.assert_allclose(mine.landmarks, their.kps, atol=0.5, err_msg=name)
            assert mine.score == pytest.approx(float(their.det_score), abs=1e-6)
            if "genderage" in app.models:
                assert (mine.gender, mine.age) == (int(their.gender), int(their.age)), name
            else:
                assert mine.gender is None and mine.age is None
        # The identity of the photo as a ComfyUI IMAGE, picked the IPAdapter FaceID way
        # (the first face FaceAnalysis returns), equals its normed_embedding ...
        image = uint8_to_comfy([rgb])
        identity = encoder.analyze(image, select="highest score").identity
        np.testing.assert_allclose(identity.embeddings[0].numpy(), theirs[0].normed_embedding, atol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(identity.vector.numpy(), theirs[0].normed_embedding, atol=1e-5)
        assert identity.face_order == "highest score" and identity.normalized
        # ... and, asked for the raw embedding (InstantID / PuLID), its embedding.
        raw = encoder.analyze(image, select="highest score", embedding="raw").identity
        emb = theirs[0].embedding
        np.testing.assert_allclose(raw.vector.numpy(), emb, atol=1e-5 * float(np.abs(emb).max()))
        assert not raw.normalized and raw.embedding_form == "raw"
        # InstantID and PuLID take the largest face, as sorted(faces, key=area)[-1].
        largest = sorted(theirs, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))[-1]
        by_size = encoder.analyze(image, select="largest").identity
        np.testing.assert_allclose(by_size.vector.numpy(), largest.normed_embedding, atol=1e-5)
        checked += len(theirs)
    assert checked == 3 * len(PHOTOS)


def test_the_pack_uses_insightface_for_detection_alignment_and_the_mxnet_input_rule(packs, photos):
    from insightface.model_zoo import SCRFD, ArcFaceONNX
    from insightface.utils.face_align import norm_crop

    from portraitbooth_core.face.arcface_torch import TorchArcFace

    mxnet = build_encoder(packs / "mxnet_2p5g", provider="cpu", det_size=320)
    assert isinstance(mxnet.detector.model, SCRFD) and isinstance(mxnet.recognizer.model, ArcFaceONNX)
    assert mxnet.detector.det_size == (640, 640)  # a fixed-shape export runs at its own size
    assert (mxnet.recognizer.mean, mxnet.recognizer.std) == (0.0, 1.0)  # normalization is inside the graph
    plain = build_encoder(packs / "buffalo_l", provider="cpu")
    assert (plain.recognizer.mean, plain.recognizer.std) == (127.5, 127.5)
    rgb = photos["astronaut.png"]
    face = plain.detect(rgb)[0]
    crop = norm_crop(np.ascontiguousarray(rgb[:, :, ::-1]), landmark=face.landmarks)[:, :, ::-1]
    np.testing.assert_array_equal(plain.align(rgb, face), crop)
    # The differentiable copy for training reads the same pixels the same way, either rule.
    for enc in (mxnet, plain):
        crops = np.stack([enc.align(rgb, f) for f in enc.detect(rgb)[:2]])
        reference = enc.recognizer.embed(crops)
        raw, _ = TorchArcFace(enc.recognizer.path).forward_all(torch.from_numpy(crops).permute(0, 3, 1, 2) / 255)
        np.testing.assert_allclose(raw.numpy(), reference, atol=1e-4 * np.abs(reference).max())


class NetworkAccess(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise NetworkAccess(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_analysis_needs_no_network_and_a_missing_pack_is_never_downloaded(no_network, packs, photos, tmp_path):
    encoder = build_encoder(packs / "antelopev2", provider="cpu")  # the nested folder is found
    assert encoder.kind == "arcface:antelopev2/glintr100.onnx"
    analysis = encoder.analyze([photos["obama.jpg"]])
    assert analysis.identity.dim == 512 and analysis.identity.gender in ("female", "male")
    # A pack that is not there is our error naming the folder, before insightface is asked ...
    with pytest.raises(PackError, match=r"(?s)Face model pack folder not found: .*buffalo_x.*never downloaded"):
        build_encoder(packs / "buffalo_x", provider="cpu")
    # ... because insightface, asked for a pack by name, goes to the network for it.
    from insightface.app import FaceAnalysis

    with pytest.raises(NetworkAccess):
        FaceAnalysis(name="buffalo_x", root=str(tmp_path), providers=["CPUExecutionProvider"])


def test_empty_and_nested_pack_folders_give_their_messages(packs):
    empty = packs / "empty"
    with pytest.raises(PackError) as err:
        build_encoder(empty, provider="cpu")
    msg = str(err.value)
    assert f"The face model pack folder {empty.resolve()} is empty: no *.onnx files" in msg
    assert "it has no subfolders either" in msg and "never downloaded" in msg
    # Two packs unpacked into one folder: neither is guessed.
    (packs / "double" / "a").mkdir(parents=True)
    (packs / "double" / "b").mkdir()
    for sub in ("a", "b"):
        build_genderage_onnx(packs / "double" / sub / "genderage.onnx")
    with pytest.raises(PackError, match=r"is empty: no \*\.onnx files in it, and its subfolders \(a, b\) hold no "
                                        r"single pack"):
        build_encoder(packs / "double", provider="cpu")
    assert pack_folder(packs / "antelopev2") == packs / "antelopev2" / "antelopev2"


def test_missing_insightface_says_how_to_install_it_without_breaking_opencv(packs, monkeypatch):
    import sys

    from portraitbooth_core.optional import MissingDependencyError

    monkeypatch.setitem(sys.modules, "insightface", None)
    with pytest.raises(MissingDependencyError) as err:
        build_encoder(packs / "buffalo_l", provider="cpu")
    msg = str(err.value)
    assert "requirements-insightface.txt" in msg and "--no-deps insightface==2.1" in msg
    # The zero-download detector and recognizer need no insightface.
    assert build_encoder(None, provider="cpu").kind == "dlib:resnet128"


def test_normalised_or_raw_is_recorded_and_a_mismatch_with_the_model_is_an_error(tmp_path):
    import importlib

    from conftest import load_pack
    from portraitbooth_core.stea.projector import ProjectorConfig
    from portraitbooth_core.weights.meta import (EmbeddingMismatchError, FaceEncoderSpec, PortraitBoothInfo,
                                                 check_embedding)
    from stea_fixtures import identity, model

    kind = "arcface:buffalo_l/w600k_r50.onnx"
    trained = PortraitBoothInfo(ProjectorConfig(face_dim=512), FaceEncoderSpec(kind, 512, face_order="largest"))
    assert trained.face_encoder.wants_normalized  # files that do not say were trained on normalised ones
    assert check_embedding(trained, kind, 512, normalized=True, face_order="largest") is None
    with pytest.raises(EmbeddingMismatchError, match=r"trained on L2-normalised .* holds raw \(unnormalised\) "
                                                     r"ones\. Make the identity with embedding 'normalised'"):
        check_embedding(trained, kind, 512, normalized=False)
    assert "face order 'left to right'" in check_embedding(trained, kind, 512, True, "left to right")
    raw_model = PortraitBoothInfo(ProjectorConfig(face_dim=512), FaceEncoderSpec(kind, 512, normalized=False))
    back = PortraitBoothInfo.from_json(raw_model.to_json(), "test")
    assert back.face_encoder == raw_model.face_encoder and not back.face_encoder.wants_normalized
    with pytest.raises(EmbeddingMismatchError, match="Make the identity with embedding 'raw'"):
        check_embedding(back, kind, 512, normalized=True)
    # Apply STEA refuses a raw identity for a model trained on normalised ones, before any encoding.
    load_pack()
    encode = importlib.import_module("portraitbooth_pack_under_test.nodes.stea_encode").encode_with_identity
    face = identity(0)
    raw = type(face)(face.embeddings * 23.0, face.vector * 23.0, face.kind, normalized=False)
    with pytest.raises(EmbeddingMismatchError, match="holds raw"):
        encode(object(), "a photo of a man", [raw], model(tmp_path))


def test_class_word_auto_follows_the_gender_age_model(packs, photos):
    import importlib

    from conftest import load_pack

    load_pack()
    auto = importlib.import_module("portraitbooth_pack_under_test.nodes.stea_encode").auto_class_words
    accepted = ("man", "woman", "boy", "girl", "person", "lady", "guy")
    encoder = build_encoder(packs / "buffalo_l", provider="cpu")
    identity = encoder.analyze([photos["astronaut.png"]]).identity
    assert identity.gender in ("female", "male") and 20 <= identity.age <= 50
    words = auto([identity], accepted)
    assert "person" in words and (("woman" in words) == (identity.gender == "female"))
    assert ("man" in words) == (identity.gender == "male")
    # The stand-in calls a crop male when it is redder than blue: a red and a blue photo disagree.
    red = np.zeros((300, 400, 3), np.uint8)
    red[..., 0] = 200
    blue = red[..., ::-1].copy()
    for img in (red, blue):
        img[100:104, 200:204] = 255
    man, woman = (encoder.analyze([img]).identity for img in (red, blue))
    assert (man.gender, woman.gender) == ("male", "female")
    assert auto([woman], accepted) == ["woman", "girl", "person", "lady"]
    assert auto([man, woman], accepted) == list(accepted)
    unknown = build_encoder(None, provider="cpu")  # no gender/age model: auto restricts nothing
    assert auto([unknown.analyze([photos["astronaut.png"]]).identity], accepted) == []


def test_cpu_only_onnxruntime_on_a_gpu_machine_is_reported_once_with_the_install_command(monkeypatch, caplog):
    import sys

    import onnxruntime as ort

    from portraitbooth_core.face import runtime

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_cpu_notice_given", False)
    monkeypatch.setattr(runtime, "_gpu_present", lambda: True)
    with caplog.at_level("WARNING", logger="portraitbooth.face"):
        for _ in range(3):
            assert runtime.resolve_providers("auto") == ["CPUExecutionProvider"]
    notices = [r.getMessage() for r in caplog.records if "no CUDA provider" in r.getMessage()]
    assert len(notices) == 1
    assert "This machine has a CUDA GPU" in notices[0]
    assert f"{sys.executable} -m pip uninstall -y onnxruntime && {sys.executable} -m pip install onnxruntime-gpu" \
        in notices[0]


def test_no_face_at_det_size_retries_smaller_sizes_as_ipadapter_faceid_does(packs):
    from face_fixtures import dot_image

    encoder = build_encoder(packs / "buffalo_l", provider="cpu")
    model, tried = encoder.detector.model, []
    real = model.detect

    def misses_above_448(img, input_size=None, **kwargs):  # SCRFD missing a face that fills the photo
        tried.append(tuple(input_size))
        if input_size[0] > 448:
            return np.empty((0, 5), np.float32), np.empty((0, 5, 2), np.float32)
        return real(img, input_size=input_size, **kwargs)

    model.detect = misses_above_448
    analysis = encoder.analyze([dot_image([(200, 150)])])
    assert tried == [(640, 640), (576, 576), (512, 512), (448, 448)]
    assert "found on a retry at det_size 448" in analysis.report
    tried.clear()
    with pytest.raises(NoFaceError, match="No face found"):
        encoder.analyze([np.zeros((64, 64, 3), np.uint8)])
    assert tried == [(s, s) for s in range(640, 255, -64)]


def test_conventions_survive_an_identity_file(packs, photos, tmp_path):
    from portraitbooth_core.face import load_identity, save_identity

    encoder = build_encoder(packs / "buffalo_l", provider="cpu")
    made = encoder.analyze([photos["astronaut.png"]], select="highest score", embedding="raw").identity
    path, _ = save_identity(tmp_path / "me.safetensors", made)
    back = load_identity(path)
    assert (back.normalized, back.face_order, back.gender, back.age) == (False, "highest score", made.gender, made.age)
    torch.testing.assert_close(back.vector, made.vector, rtol=0, atol=0)
    assert float(back.vector.norm()) > 1.5  # the raw ArcFace output, not a unit vector
