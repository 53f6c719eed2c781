"""Analyzing reference photos into an identity: picking faces, bad input, several photos, mixing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from face_fixtures import *  # noqa: F401,F403
from face_fixtures import read_photo
from portraitbooth_core.face import (FaceAnalysisError, IdentityError, NoFaceError, cosine, mix_identities,
                                     uint8_to_comfy)


@pytest.fixture(scope="module")
def photos(photos_dir):
    return {n: read_photo(photos_dir, n) for n in ("astronaut.png", "obama.jpg", "obama2.jpg", "obama3.jpg",
                                                  "biden.jpg", "t1.jpg")}


def test_no_face_error_names_the_image_and_the_fixes(zero_download_encoder, photos):
    face = photos["astronaut.png"]
    batch = uint8_to_comfy([face, np.full_like(face, 128), face])  # a ComfyUI IMAGE batch
    with pytest.raises(NoFaceError) as err:
        zero_download_encoder.analyze(batch)
    assert err.value.index == 1
    msg = str(err.value)
    assert "No face found in image 2 of 3 (index 1), 512x512 px" in msg
    assert "lower det_threshold" in msg and "on_no_face=skip" in msg


def test_skip_leaves_faceless_images_out(zero_download_encoder, photos):
    face = photos["astronaut.png"]
    analysis = zero_download_encoder.analyze(uint8_to_comfy([face, np.zeros_like(face)]), on_no_face="skip")
    assert analysis.identity.count == 1
    assert "image 2 of 2 (index 1): no face found - skipped" in analysis.report
    masks = analysis.masks()
    assert masks.shape == (2, 512, 512) and masks[0].sum() > 0 and masks[1].sum() == 0
    with pytest.raises(NoFaceError, match="No face found in any of the 1 image"):
        zero_download_encoder.analyze([np.zeros_like(face)], on_no_face="skip")


def test_several_faces_are_picked_by_the_stated_rule(zero_download_encoder, photos):
    group = photos["t1.jpg"]
    largest = zero_download_encoder.analyze([group])
    r = largest.results[0]
    assert len(r.faces) == 6
    assert [f.center_x for f in r.faces] == sorted(f.center_x for f in r.faces)  # left to right
    assert r.faces[r.picked].area == max(f.area for f in r.faces)
    assert f"picked the largest face (rule 'largest'; it is index {r.picked} counting from the left)" in largest.report
    leftmost = zero_download_encoder.analyze([group], select="index", face_index=0)
    assert leftmost.results[0].picked == 0
    assert "picked face index 0 counting from the left (rule 'index')" in leftmost.report
    assert cosine(leftmost.identity, largest.identity) < 0.9  # a different person's embedding
    with pytest.raises(FaceAnalysisError, match=r"has 6 face\(s\) \(indices 0..5 from the left\), but face_index is 7"):
        zero_download_encoder.analyze([group], select="index", face_index=7)


def test_preview_draws_boxes_and_keeps_the_photo_size(zero_download_encoder, photos):
    analysis = zero_download_encoder.analyze([photos["t1.jpg"]])
    preview, original = analysis.previews[0], photos["t1.jpg"]
    assert preview.shape == original.shape
    picked = analysis.results[0].faces[analysis.results[0].picked]
    x1, y1 = int(picked.box[0]), int(picked.box[1])
    assert (preview[y1 + 5, x1] == (40, 220, 40)).all()  # the picked face is boxed in green
    assert (preview != original).any(axis=2).mean() < 0.05  # the photo itself is left alone


def test_several_photos_average_and_a_stranger_is_named(zero_download_encoder, photos):
    obamas = [photos[n] for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    same = zero_download_encoder.analyze(obamas)
    assert same.identity.count == 3 and same.warnings == []
    expected = torch.nn.functional.normalize(same.identity.embeddings.mean(0), dim=0)
    torch.testing.assert_close(same.identity.vector, expected)
    mixed = zero_download_encoder.analyze([*obamas, photos["biden.jpg"]])
    assert len(mixed.warnings) == 1
    assert mixed.warnings[0].startswith("image 4 of 4 (index 3) looks like a different person")
    assert "WARNING: image 4 of 4" in mixed.report


def test_mixing_two_identities(zero_download_encoder, photos):
    a = zero_download_encoder.analyze([photos["obama.jpg"]]).identity
    b = zero_download_encoder.analyze([photos["biden.jpg"]]).identity
    torch.testing.assert_close(mix_identities(a, b, 0.0).vector, a.vector)
    torch.testing.assert_close(mix_identities(a, b, 1.0).vector, b.vector)
    half = mix_identities(a, b, 0.5)
    assert cosine(half, a) == pytest.approx(cosine(half, b), abs=1e-5)
    assert cosine(half, a) > cosine(a, b)
    assert half.metadata["mix"]["weight_b"] == 0.5
    other = type(b)(b.embeddings, b.vector, "arcface:x/y.onnx", {})
    with pytest.raises(IdentityError, match="different recognizers"):
        mix_identities(a, other, 0.5)
    with pytest.raises(IdentityError, match="between 0 and 1"):
        mix_identities(a, b, 1.5)
