"""The identity score on real photos from registry packages (zero-download RetinaFace + dlib).

Measured here with dlib (cosines of raw 128-d descriptors): obama vs obama2/obama3
0.967/0.974, obama vs biden 0.815, vs the astronaut 0.821; a blank image 0. dlib's
cosines of different people are high, so only the order is asserted, with a margin.
"""
from __future__ import annotations

import numpy as np
import pytest

from face_fixtures import read_photo, zero_download_encoder  # noqa: F401  (fixture)
from portraitbooth_core.face import IdentityError
from portraitbooth_core.scoring.identity_score import IdentityScorer, format_report, greedy_match, match_subjects, ranking


@pytest.fixture(scope="module")
def identities(zero_download_encoder, photos_dir):  # noqa: F811
    def identity(name):
        return zero_download_encoder.analyze([read_photo(photos_dir, name)]).identity

    return {"obama": identity("obama.jpg"), "biden": identity("biden.jpg")}


def side_by_side(*images: np.ndarray) -> np.ndarray:
    """Photos pasted left to right on one canvas (zero padding at the bottom)."""
    h = max(im.shape[0] for im in images)
    return np.concatenate([np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0))) for im in images], axis=1)


def test_the_same_person_scores_higher_than_a_different_person(zero_download_encoder, identities, photos_dir):  # noqa: F811
    scorer = IdentityScorer(zero_download_encoder, [identities["obama"]])
    names = ["obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.png"]
    scores = scorer.score_images([read_photo(photos_dir, n) for n in names])
    same = [s.score for s in scores[:2]]
    other = [s.score for s in scores[2:]]
    assert all(s.faces == 1 and s.face_found for s in scores)
    assert min(same) > max(other) + 0.05, format_report(scores, names)
    assert all(0.0 <= v <= 1.0 for v in same + other)
    assert ranking(scores)[:2] == [1, 0]  # obama3 scored 0.974, obama2 0.967


def test_an_image_without_a_face_scores_zero(zero_download_encoder, identities):  # noqa: F811
    scorer = IdentityScorer(zero_download_encoder, [identities["obama"]])
    gray = np.full((256, 256, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    for result in scorer.score_images([gray, noise]):
        assert result.faces == 0 and not result.face_found
        assert result.score == 0.0 and result.subjects[0].cosine is None
    assert "no face found" in format_report(scorer.score_images([gray]))


def test_several_faces_one_subject_uses_the_largest(zero_download_encoder, identities, photos_dir):  # noqa: F811
    # Obama at full size beside a half-size Biden: the largest face is Obama's wherever it sits.
    obama, biden = read_photo(photos_dir, "obama2.jpg"), read_photo(photos_dir, "biden.jpg")[::4, ::4]
    scorer = IdentityScorer(zero_download_encoder, [identities["obama"]])
    result = scorer.score_image(side_by_side(biden, obama))
    assert result.faces == 2
    assert result.subjects[0].face == 1, "faces are listed left to right; Obama's is the right one"
    alone = scorer.score_image(obama)
    assert result.score == pytest.approx(alone.score, abs=0.02)


def test_two_faces_are_matched_greedily_to_two_subjects(zero_download_encoder, identities, photos_dir):  # noqa: F811
    obama2, biden = read_photo(photos_dir, "obama2.jpg"), read_photo(photos_dir, "biden.jpg")
    scorer = IdentityScorer(zero_download_encoder, [identities["obama"], identities["biden"]])
    for collage, where in ((side_by_side(biden, obama2), [1, 0]), (side_by_side(obama2, biden), [0, 1])):
        result = scorer.score_image(collage)
        assert result.faces == 2
        assert [s.face for s in result.subjects] == where, format_report([result])
        assert all(s.score > 0.9 for s in result.subjects)


def test_greedy_matching_takes_the_best_pair_first_and_uses_each_face_once():
    # Both subjects resemble face 0 most; greedy gives it to subject 0 (0.9 is the best
    # pair), so subject 1 gets face 1 even though its cosine there is only 0.1.
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert greedy_match(sim) == [0, 1]
    scores = match_subjects(sim)
    assert [s.score for s in scores] == [0.9, 0.1]
    # More subjects than faces: the subject left over scores 0; negative cosines clip to 0.
    left = match_subjects(np.array([[0.2], [0.7], [-0.3]]))
    assert [s.face for s in left] == [None, 0, None]
    assert [s.score for s in left] == [0.0, 0.7, 0.0]
    assert match_subjects(np.array([[-0.4]]))[0].score == 0.0 and match_subjects(np.array([[-0.4]]))[0].cosine == -0.4


def test_a_group_photo_scores_each_reference_on_its_own_face(zero_download_encoder, photos_dir):  # noqa: F811
    # t1.jpg shows six people. Identities from faces 4 and 1 (counting from the left) must
    # find those people again in the mirrored photo, where they sit at 1 and 4.
    group = read_photo(photos_dir, "t1.jpg")
    refs = [zero_download_encoder.analyze([group], select="index", face_index=i).identity for i in (4, 1)]
    result = IdentityScorer(zero_download_encoder, refs).score_image(np.ascontiguousarray(group[:, ::-1]))
    assert result.faces == 6
    assert [s.face for s in result.subjects] == [1, 4], format_report([result])
    assert all(s.score > 0.9 for s in result.subjects)


def test_references_of_another_recognizer_are_refused(zero_download_encoder, identities):  # noqa: F811
    from dataclasses import replace

    arcface_like = replace(identities["obama"], kind="arcface:antelopev2/glintr100.onnx")
    with pytest.raises(IdentityError, match="same FaceEncoder"):
        IdentityScorer(zero_download_encoder, [arcface_like])
