"""The face nodes in-process (V3 schema), as ComfyUI would call them."""
from __future__ import annotations

import pytest
import torch

from face_fixtures import *  # noqa: F401,F403
from face_fixtures import read_photo
from portraitbooth_core.face import Identity, uint8_to_comfy

FACE_NODES = ("PortraitBoothLoadFaceEncoder", "PortraitBoothAnalyzeFaces", "PortraitBoothMixIdentities")


@pytest.fixture(scope="module")
def face_nodes(pack_nodes):
    return {nid: pack_nodes[nid] for nid in FACE_NODES}


@pytest.fixture(scope="module")
def no_pack_encoder(face_nodes):
    out = face_nodes["PortraitBoothLoadFaceEncoder"].execute(
        pack="none (zero-download RetinaFace)", detector="auto", recognizer="auto", provider="cpu",
        det_size=640, mask_ears=False, mask_hair=False, mask_neck=False)
    return out.result[0]


def test_face_nodes_are_registered_with_tooltips_everywhere(face_nodes):
    for node_id, cls in face_nodes.items():
        schema = cls.define_schema()
        assert schema.category == "PortraitBooth/face"
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{node_id}: inputs without a tooltip: {missing}"


def test_load_face_encoder_offers_packs_found_in_the_insightface_folder(face_nodes, insightface_root, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(insightface_root)], set()))
    loader = face_nodes["PortraitBoothLoadFaceEncoder"]
    pack_input = loader.define_schema().inputs[0]
    assert pack_input.options[0] == "none (zero-download RetinaFace)"
    assert {"standin_r50", "antelopev2"} <= set(pack_input.options)
    encoder = loader.execute(pack="standin_r50", detector="auto", recognizer="auto", provider="cpu",
                             det_size=320, mask_ears=False, mask_hair=False, mask_neck=False).result[0]
    assert encoder.kind == "arcface:standin_r50/w600k_r50.onnx"
    assert encoder.detector.det_size == (320, 320)
    from portraitbooth_core.face import PackError

    with pytest.raises(PackError, match="missing a face recognizer"):
        loader.execute(pack="no_recognizer", detector="auto", recognizer="auto", provider="cpu",
                       det_size=640, mask_ears=False, mask_hair=False, mask_neck=False)


def test_analyze_node_outputs_embedding_mask_preview_and_report(face_nodes, no_pack_encoder, photos_dir):
    image = uint8_to_comfy([read_photo(photos_dir, "astronaut.png")])
    out = face_nodes["PortraitBoothAnalyzeFaces"].execute(
        face_encoder=no_pack_encoder, images=image, select="largest", face_index=0, on_no_face="error",
        det_threshold=0.6)
    identity, mask, preview, report = out.result
    assert isinstance(identity, Identity) and identity.dim == 128 and identity.kind == "dlib:resnet128"
    assert mask.shape == (1, 512, 512) and mask.dtype == torch.float32 and 0 < mask.mean() < 0.2
    assert preview.shape == image.shape and preview.dtype == torch.float32 and preview.max() <= 1.0
    assert "picked the only face" in report


def test_mix_node_blends_two_embeddings(face_nodes, no_pack_encoder, photos_dir):
    analyze = face_nodes["PortraitBoothAnalyzeFaces"]
    ids = [analyze.execute(face_encoder=no_pack_encoder, images=uint8_to_comfy([read_photo(photos_dir, n)]),
                           select="largest", face_index=0, on_no_face="error", det_threshold=0.6).result[0]
           for n in ("obama.jpg", "biden.jpg")]
    mixed = face_nodes["PortraitBoothMixIdentities"].execute(identity_a=ids[0], identity_b=ids[1], weight=0.25)
    blend = torch.nn.functional.normalize(0.75 * ids[0].vector + 0.25 * ids[1].vector, dim=0)
    torch.testing.assert_close(mixed.result[0].vector, blend)


def test_load_face_encoder_pack_is_only_a_listed_pack_never_a_path(face_nodes, insightface_root, monkeypatch):
    """A graph over HTTP may send any string as `pack`: only the listed names load; another value
    is an error naming the input and listing the packs, the same whether or not it exists."""
    import folder_paths

    from portraitbooth_core.paths import BadInputError

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(insightface_root)], set()))
    loader = face_nodes["PortraitBoothLoadFaceEncoder"]
    args = dict(detector="auto", recognizer="auto", provider="cpu", det_size=320, mask_ears=False, mask_hair=False,
                mask_neck=False)
    messages = []
    for bad in (str(insightface_root / "models" / "standin_r50"), "../../../../etc", "/no/such/folder",
                "standin_r50/../standin_r50", "standin_r50\x00"):
        with pytest.raises(BadInputError, match=r"^pack: .* is not one of the choices \(none \(zero-download "
                                                r"RetinaFace\), .*standin_r50.*\); pick one") as caught:
            loader.execute(pack=bad, **args)
        messages.append(str(caught.value).replace(repr(bad), "V"))
    assert len(set(messages[:3])) == 1  # nothing tells whether the path exists
    with pytest.raises(BadInputError, match=r"^provider: 'tpu' is not one of the choices"):
        loader.execute(pack="none (zero-download RetinaFace)", **(args | {"provider": "tpu"}))


def test_every_pack_node_checks_combo_text_and_number_inputs_naming_them(pack_nodes):
    """ComfyUI hands a V3 node an API caller's values unchecked: each node refuses an unlisted
    combo value, a NUL byte and a non-finite or out-of-range number with the input's name."""
    import math

    from comfy_api.latest import io

    from portraitbooth_core.paths import BadInputError

    checked = 0
    for node_id, cls in pack_nodes.items():
        inputs = cls.define_schema().inputs
        blank = {spec.id: None for spec in inputs}
        for spec in inputs:
            if isinstance(spec, io.Combo.Input):
                bad_values = ["not-a-choice", "../../../etc/passwd", "x" * 5000]
            elif isinstance(spec, io.String.Input):
                bad_values = ["a\x00b"]
            elif isinstance(spec, (io.Int.Input, io.Float.Input)) and spec.max is not None:
                bad_values = [spec.max * 10 + 1, -1e308, math.nan] if isinstance(spec, io.Float.Input) \
                    else [spec.max + 1, -(2**63)]
            else:
                continue
            for value in bad_values:
                with pytest.raises(BadInputError, match=rf"^{spec.id}: ") as caught:
                    cls.execute(**(blank | {spec.id: value}))
                assert len(str(caught.value)) < 5000, f"{node_id}.{spec.id}: the error repeats the whole value"
                # validate_inputs checks what it is given (at queue time ComfyUI gives it only the
                # model-file combo and checks choices and min/max itself: nodes/base.py)
                assert str(cls.validate_inputs(**{spec.id: value})).startswith(f"{spec.id}: ")
                checked += 1
    assert checked > 40


def test_corrupt_parsing_weights_fall_back_to_the_ellipse_naming_the_file(face_nodes, tmp_path, monkeypatch, caplog):
    import logging

    import folder_paths

    weights = tmp_path / "facexlib" / "parsing_bisenet.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"PK\x03\x04 half a download")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facexlib", ([str(weights.parent)], set()))
    with caplog.at_level(logging.WARNING, logger="portraitbooth.face"):
        encoder = face_nodes["PortraitBoothLoadFaceEncoder"].execute(
            pack="none (zero-download RetinaFace)", detector="auto", recognizer="auto", provider="cpu",
            det_size=640, mask_ears=False, mask_hair=False, mask_neck=False).result[0]
    assert encoder.parser is None and encoder.mask_note.startswith("fallback ellipse")
    assert str(weights) in encoder.mask_note and "could not be loaded" in encoder.mask_note
    assert any(str(weights) in r.getMessage() for r in caplog.records)
