"""Face masks: BiSeNet parsing from a pre-placed state dict, and the fallback ellipse."""
from __future__ import annotations

import numpy as np
import pytest

from face_fixtures import *  # noqa: F401,F403
from face_fixtures import read_photo
from portraitbooth_core.face import build_encoder, find_parsing_weights
from portraitbooth_core.face.parsing import CROP_SCALE, LABELS, FaceParser, fallback_mask, label_ids
from portraitbooth_core.face.types import DetectedFace
from standins_face import build_bisenet_state


@pytest.fixture(scope="module")
def astronaut_face(photos_dir):
    from portraitbooth_core.face.retinaface import RetinaFaceDetector

    img = read_photo(photos_dir, "astronaut.png")
    return img, RetinaFaceDetector("cpu").detect(img, 0.6)[0]


def _crop_box(face: DetectedFace, shape) -> tuple[int, int, int, int]:
    side = round(max(face.width, face.height) * CROP_SCALE)
    cx, cy = face.center_x, (face.box[1] + face.box[3]) / 2
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    return max(x0, 0), max(y0, 0), min(x0 + side, shape[1]), min(y0 + side, shape[0])


def test_parsing_marks_face_labels_inside_the_parsing_crop(tmp_path, astronaut_face):
    img, face = astronaut_face
    parser = FaceParser(build_bisenet_state(tmp_path / "skin.pth", LABELS["skin"]))
    mask = parser.mask(img, face)
    assert mask.shape == img.shape[:2] and set(np.unique(mask)) == {0.0, 1.0}
    x0, y0, x1, y1 = _crop_box(face, img.shape)
    assert mask[y0:y1, x0:x1].all()  # the stand-in calls every pixel "skin"
    assert mask.sum() == (y1 - y0) * (x1 - x0)  # ... and nothing outside the crop is touched


def test_hair_counts_only_when_asked(tmp_path, astronaut_face):
    img, face = astronaut_face
    weights = build_bisenet_state(tmp_path / "hair.pth", LABELS["hair"])
    assert FaceParser(weights).mask(img, face).sum() == 0
    assert FaceParser(weights, hair=True).mask(img, face).sum() > 0
    assert label_ids() == [1, 2, 3, 4, 5, 6, 10, 11, 12, 13]
    assert set(label_ids(ears=True, neck=True)) - set(label_ids()) == {7, 8, 9, 14, 15}


def test_wrong_state_dict_is_refused_with_the_file_name(tmp_path):
    import torch

    bad = tmp_path / "parsing_bisenet.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="does not fit facexlib's BiSeNet"):
        FaceParser(bad)


def test_encoder_uses_preplaced_parsing_weights_from_facexlib_folder(tmp_path, photos_dir):
    folder = tmp_path / "facexlib"
    build_bisenet_state(folder / "weights" / "parsing_bisenet.pth", LABELS["skin"])
    weights = find_parsing_weights([tmp_path / "elsewhere", folder])
    assert weights == folder / "weights" / "parsing_bisenet.pth"
    encoder = build_encoder(None, provider="cpu", parsing_weights=weights)
    analysis = encoder.analyze([read_photo(photos_dir, "astronaut.png")])
    assert "face parsing (BiSeNet" in analysis.report
    assert analysis.masks().shape == (1, 512, 512) and analysis.masks().sum() > 0


def test_fallback_mask_is_an_ellipse_in_the_box_tilted_with_the_eyes():
    box = np.array([100, 50, 200, 200], np.float32)
    level = np.array([[130, 100], [170, 100], [150, 130], [135, 160], [165, 160]], np.float32)
    mask = fallback_mask((300, 300), DetectedFace(box, 0.9, level))
    ys, xs = np.nonzero(mask)
    assert xs.min() >= 100 and xs.max() <= 200 and ys.min() >= 50 and ys.max() <= 200
    assert mask[125, 150] == 1 and mask[52, 102] == 0  # centre in, box corner out
    assert mask.sum() == pytest.approx(np.pi * 50 * 75, rel=0.03)
    # Rolled head: the ellipse turns with the eye line.
    angle = np.deg2rad(30)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    tilted = (level - [150, 125]) @ rot.T + [150, 125]
    mask2 = fallback_mask((300, 300), DetectedFace(box, 0.9, tilted.astype(np.float32)))
    assert mask2.sum() == pytest.approx(mask.sum(), rel=0.03) and (mask2 != mask).sum() > 500


def test_missing_parsing_weights_use_the_fallback_and_say_so(caplog, photos_dir):
    import logging

    with caplog.at_level(logging.WARNING, logger="portraitbooth.face"):
        encoder = build_encoder(None, provider="cpu", parsing_searched="searched /models/facexlib")
    assert "no parsing_bisenet.pth found (searched /models/facexlib)" in caplog.text
    analysis = encoder.analyze([read_photo(photos_dir, "astronaut.png")])
    assert "fallback ellipse" in analysis.report
