"""dlib's ResNet recognizer (zero-download weights from face-recognition-models) on real photos."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from face_fixtures import read_photo


@pytest.fixture(scope="module")
def descriptors(photos_dir):
    from portraitbooth_core.face.dlib_recognizer import DlibRecognizer
    from portraitbooth_core.face.retinaface import RetinaFaceDetector

    detector, recognizer = RetinaFaceDetector("cpu"), DlibRecognizer()
    out = {}
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"):
        img = read_photo(photos_dir, name)
        face = max(detector.detect(img, 0.6), key=lambda f: f.area)
        out[name] = recognizer.embed_faces(img, [face])[0]
    return out


def test_same_person_is_closer_than_different_people(descriptors):
    from portraitbooth_core.face.dlib_recognizer import SAME_PERSON_L2

    obamas = [descriptors[n] for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    same = [np.linalg.norm(a - b) for a, b in itertools.combinations(obamas, 2)]
    different = [np.linalg.norm(o - descriptors["biden.jpg"]) for o in obamas]
    assert max(same) < SAME_PERSON_L2 < min(different)  # dlib's usual 0.6 margin
    assert min(different) - max(same) > 0.2


def test_descriptor_shape(descriptors):
    assert all(d.shape == (128,) and d.dtype == np.float32 for d in descriptors.values())
