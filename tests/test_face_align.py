"""Five-point alignment to the ArcFace template, in numpy/cv2 and differentiable torch."""
from __future__ import annotations

import numpy as np
import torch

from face_fixtures import read_photo
from portraitbooth_core.face import ARCFACE_TEMPLATE, align_face, align_faces_torch, similarity_transform
from portraitbooth_core.face.align import alignment_matrix, warp_affine_torch


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_similarity_transform_recovers_a_known_rotation_scale_and_shift():
    angle, scale, shift = 0.3, 2.5, np.array([40.0, -12.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = ARCFACE_TEMPLATE @ rot.T + shift
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(_apply(matrix, landmarks), ARCFACE_TEMPLATE, atol=1e-9)
    np.testing.assert_allclose(matrix[:, :2] @ rot, np.eye(2), atol=1e-9)


def test_aligned_crop_puts_the_landmarks_on_the_template():
    # Paint five dots at the landmark positions of a rotated, scaled face, then align.
    rot = 1.8 * np.array([[np.cos(-0.4), -np.sin(-0.4)], [np.sin(-0.4), np.cos(-0.4)]])
    landmarks = ARCFACE_TEMPLATE @ rot.T + [150, 80]
    img = np.zeros((400, 400, 3), np.uint8)
    for x, y in landmarks.round().astype(int):
        img[y - 2:y + 3, x - 2:x + 3] = 255
    crop = align_face(img, landmarks)
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE.round().astype(int):
        assert crop[y, x].min() > 200, f"no dot at template point ({x}, {y})"


def test_torch_warp_matches_cv2_and_passes_gradients(photos_dir):
    from portraitbooth_core.face.retinaface import RetinaFaceDetector

    img = read_photo(photos_dir, "astronaut.png")
    face = RetinaFaceDetector("cpu").detect(img, 0.6)[0]
    reference = align_face(img, face.landmarks).astype(np.float32)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float().requires_grad_()
    crop = align_faces_torch(t, face.landmarks[None])
    ours = crop[0].permute(1, 2, 0).detach().numpy()
    # Same sampling grid as cv2.warpAffine; cv2 rounds its bilinear weights to 1/32 px.
    assert np.abs(ours - reference)[4:-4, 4:-4].mean() < 1.0
    crop.sum().backward()
    assert t.grad.abs().sum() > 0
    # Only pixels under the crop get gradient: map the crop's corners back to the image.
    inverse = np.linalg.inv(np.vstack([alignment_matrix(face.landmarks), [0, 0, 1]]))[:2]
    corners = _apply(inverse, np.array([[0, 0], [111, 0], [0, 111], [111, 111]], float))
    top, bottom = int(corners[:, 1].min()) - 2, int(corners[:, 1].max()) + 3
    assert t.grad[0, :, :top].abs().sum() == 0 and t.grad[0, :, bottom:].abs().sum() == 0
    assert t.grad[0, :, top:bottom].abs().sum() > 0


def test_torch_warp_identity_matrix_is_a_plain_crop():
    img = torch.arange(3 * 200 * 200, dtype=torch.float32).reshape(1, 3, 200, 200)
    shift = torch.tensor([[[1.0, 0.0, -30.0], [0.0, 1.0, -50.0]]])  # image pixel (30,50) -> crop (0,0)
    out = warp_affine_torch(img, shift, 112)
    torch.testing.assert_close(out, img[:, :, 50:162, 30:142])
    # Landmarks already on the template need no transform at all.
    np.testing.assert_allclose(alignment_matrix(ARCFACE_TEMPLATE), np.hstack([np.eye(2), np.zeros((2, 1))]),
                               atol=1e-9)
