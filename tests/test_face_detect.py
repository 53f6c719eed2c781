"""Face detection: the shipped RetinaFace on real photos, the SCRFD decoder on a stand-in,
and awkward photo formats and sizes."""
from __future__ import annotations

import numpy as np
import pytest

from face_fixtures import *  # noqa: F401,F403
from face_fixtures import dot_image, read_photo
from portraitbooth_core.face import to_uint8_rgb
from portraitbooth_core.face.images import detection_view
from standins_face import SCRFD_HALF_BOX, SCRFD_LANDMARK_OFFSETS, build_scrfd_onnx


@pytest.fixture(scope="module")
def retinaface():
    from portraitbooth_core.face.retinaface import RetinaFaceDetector

    return RetinaFaceDetector("cpu")


def test_retinaface_finds_the_astronauts_face(retinaface, photos_dir):
    faces = retinaface.detect(read_photo(photos_dir, "astronaut.png"), 0.6)
    assert len(faces) == 1
    face = faces[0]
    x1, y1, x2, y2 = face.box
    # Eileen Collins' face in skimage's 512x512 astronaut photo spans about x 180-270, y 60-175.
    assert 160 < x1 < 200 and 250 < x2 < 290 and 40 < y1 < 80 and 160 < y2 < 200
    eyes, nose, mouth = face.landmarks[:2], face.landmarks[2], face.landmarks[3:]
    assert eyes[0, 0] < eyes[1, 0] and mouth[0, 0] < mouth[1, 0]  # insightface order: left first
    assert eyes[:, 1].max() < nose[1] < mouth[:, 1].min()
    assert ((face.landmarks >= face.box[:2]) & (face.landmarks <= face.box[2:])).all()


def test_retinaface_finds_all_six_faces_of_the_group_photo(retinaface, photos_dir):
    faces = retinaface.detect(read_photo(photos_dir, "t1.jpg"), 0.6)
    assert len(faces) == 6
    assert min(f.score for f in faces) > 0.9


def test_scrfd_decoding_puts_boxes_and_landmarks_where_the_model_says(tmp_path):
    from portraitbooth_core.face.scrfd import SCRFDDetector

    for batched in (False, True):  # exports with and without a batch axis
        det = SCRFDDetector(build_scrfd_onnx(tmp_path / f"det{batched}.onnx", batched), "cpu", det_size=640)
        faces = sorted(det.detect(dot_image([(203, 103), (53, 203)]), 0.5), key=lambda f: f.center_x)
        assert len(faces) == 2  # the two anchors of a cell collapse to one face by NMS
        scale = 640 / 400  # letterbox: the 400x300 image is scaled to 640 wide
        for face, (x, y) in zip(faces, [(53, 203), (203, 103)]):
            cell = 8 / scale  # position is known to one stride-8 cell
            assert abs(face.center_x - x) <= cell
            assert face.width == pytest.approx(2 * SCRFD_HALF_BOX / scale, abs=0.01)
            center = (face.box[:2] + face.box[2:]) / 2
            np.testing.assert_allclose(face.landmarks, center + SCRFD_LANDMARK_OFFSETS / scale, atol=0.01)


def test_scrfd_without_faces_returns_nothing(tmp_path):
    from portraitbooth_core.face.scrfd import SCRFDDetector

    det = SCRFDDetector(build_scrfd_onnx(tmp_path / "det.onnx"), "cpu")
    assert det.detect(np.zeros((200, 200, 3), np.uint8), 0.5) == []


def test_grayscale_rgba_and_16_bit_photos_become_rgb_uint8(photos_dir, zero_download_encoder):
    rgb = read_photo(photos_dir, "astronaut.png")
    gray = rgb.mean(2).astype(np.uint8)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgb16 = rgb.astype(np.uint16) * 257
    float_gray = gray[:, :, None].astype(np.float32) / 255
    assert to_uint8_rgb(gray).shape == (512, 512, 3)
    np.testing.assert_array_equal(to_uint8_rgb(rgba), rgb)
    np.testing.assert_array_equal(to_uint8_rgb(rgb16), rgb)
    # Transparent pixels become white, not black.
    clear = rgba.copy()
    clear[..., 3] = 0
    assert (to_uint8_rgb(clear) == 255).all()
    for variant in (gray, rgba, rgb16, float_gray):
        faces = zero_download_encoder.detect(to_uint8_rgb(variant), 0.6)
        assert len(faces) == 1, f"no face in the {variant.dtype} {variant.shape} variant"
    with pytest.raises(ValueError, match="unsupported image dtype"):
        to_uint8_rgb(rgb.astype(np.int32))


def test_huge_photos_are_detected_on_a_smaller_copy_and_mapped_back(photos_dir, zero_download_encoder):
    rgb = read_photo(photos_dir, "astronaut.png")
    huge = np.repeat(np.repeat(rgb, 8, 0), 8, 1)  # 4096 x 4096
    view, factor = detection_view(huge)
    assert max(view.shape[:2]) == 1600 and factor == pytest.approx(4096 / 1600)
    small = zero_download_encoder.detect(rgb, 0.6)[0]
    big = zero_download_encoder.detect(huge, 0.6)[0]
    np.testing.assert_allclose(big.box / 8, small.box, atol=6)
    np.testing.assert_allclose(big.landmarks / 8, small.landmarks, atol=4)


def test_tiny_faces_are_found_on_an_upscaled_copy_and_flagged(photos_dir, zero_download_encoder):
    from PIL import Image

    tiny = np.array(Image.fromarray(read_photo(photos_dir, "astronaut.png")).resize((128, 128), Image.LANCZOS))
    analysis = zero_download_encoder.analyze([tiny])
    face = analysis.results[0].faces[analysis.results[0].picked]
    assert 15 < face.width < 35  # a ~24 px face, found thanks to the upscaled detection copy
    assert "[tiny face]" in analysis.report
    assert any("unreliable" in w for w in analysis.warnings)
