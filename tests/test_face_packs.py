"""insightface packs on stand-in ONNX files: finding, routing, errors, and embedding."""
from __future__ import annotations

import numpy as np
import pytest

from face_fixtures import *  # noqa: F401,F403
from face_fixtures import dot_image
from portraitbooth_core.face import PackError, build_encoder, find_packs, inspect_pack, load_pack


def test_find_packs_lists_pack_folders_including_nested_zips(insightface_root):
    packs = find_packs([insightface_root, insightface_root / "does-not-exist"])
    assert sorted(packs) == ["antelopev2", "corrupt", "no_recognizer", "standin_r50"]
    assert packs["antelopev2"] == insightface_root / "models" / "antelopev2" / "antelopev2"


def test_onnx_files_are_routed_by_their_shapes_not_names(insightface_root, tmp_path):
    import shutil

    from standins_face import build_arcface_onnx

    pack = tmp_path / "renamed"
    pack.mkdir()
    src = insightface_root / "models" / "standin_r50"
    shutil.copy(src / "det_10g.onnx", pack / "b.onnx")
    shutil.copy(src / "w600k_r50.onnx", pack / "a.onnx")
    build_arcface_onnx(pack / "c.onnx", seed=3)  # a second recognizer is reported, not used
    info = inspect_pack(pack)
    assert info.detector.name == "b.onnx" and info.recognizer.name == "a.onnx"
    assert info.unused == {"c.onnx": "second recognizer (not used)"}


def test_missing_recognizer_error_lists_what_is_missing_and_where(insightface_root):
    folder = insightface_root / "models" / "no_recognizer"
    with pytest.raises(PackError) as err:
        load_pack(folder)
    msg = str(err.value)
    assert str(folder.resolve()) in msg
    assert "missing a face recognizer" in msg and "det_10g.onnx" in msg
    load_pack(folder, need_recognizer=False)  # fine when only its detector is wanted


def test_corrupt_onnx_file_is_named_in_the_error(insightface_root):
    with pytest.raises(PackError, match=r"(?s)missing a face recognizer.*w600k_r50.onnx could not be opened"):
        load_pack(insightface_root / "models" / "corrupt")


def test_absent_pack_folder_error_names_the_folder(tmp_path):
    with pytest.raises(PackError, match="Face model pack folder not found: .*nowhere"):
        build_encoder(tmp_path / "nowhere")


def test_pack_encoder_detects_aligns_and_embeds(insightface_root):
    from portraitbooth_core.face.arcface import ArcFaceRecognizer

    pack = insightface_root / "models" / "antelopev2"
    encoder = build_encoder(find_packs([insightface_root])["antelopev2"], provider="cpu")
    assert encoder.settings["detector"] == "scrfd" and encoder.settings["recognizer"] == "arcface"
    assert encoder.kind == "arcface:antelopev2/glintr100.onnx"
    analysis = encoder.analyze([dot_image([(120, 150)]), dot_image([(300, 100), (60, 60)])])
    identity = analysis.identity
    assert identity.embeddings.shape == (2, 512) and identity.vector.shape == (512,)
    np.testing.assert_allclose(np.linalg.norm(identity.embeddings.numpy(), axis=1), 1.0, rtol=1e-5)
    assert "2 faces found; picked the largest face" in analysis.report
    # The embedding is the recognizer applied to the aligned crop of the picked face.
    rec = ArcFaceRecognizer(pack / "antelopev2" / "glintr100.onnx", "cpu")
    direct = rec.embed(identity.aligned[:1].numpy())[0]
    np.testing.assert_allclose(identity.embeddings[0].numpy(), direct / np.linalg.norm(direct), atol=1e-5)


def test_asking_for_pack_models_without_a_pack_says_what_to_do():
    from portraitbooth_core.face import FaceAnalysisError

    with pytest.raises(FaceAnalysisError, match="recognizer 'arcface' comes from an insightface pack"):
        build_encoder(None, recognizer="arcface (pack)")


def test_cuda_provider_without_cuda_explains_the_fix():
    import onnxruntime as ort

    from portraitbooth_core.face.runtime import resolve_providers

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        resolve_providers("cuda")
    assert resolve_providers("auto") == ["CPUExecutionProvider"]
