"""The differentiable ArcFace built from the pack's ONNX agrees with onnxruntime."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from face_fixtures import *  # noqa: F401,F403
from portraitbooth_core.face.arcface import ArcFaceRecognizer
from portraitbooth_core.dip.identity_loss import identity_loss
from portraitbooth_core.face.arcface_torch import FEATURES, TorchArcFace, fold_identity_initializers


@pytest.fixture(scope="module")
def recognizer_path(insightface_root):
    return insightface_root / "models" / "standin_r50" / "w600k_r50.onnx"


@pytest.fixture(scope="module")
def crops():
    return np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3)).astype(np.uint8)


def _to_torch(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(255)


def test_torch_recognizer_equals_onnxruntime(recognizer_path, crops):
    reference = ArcFaceRecognizer(recognizer_path, "cpu").embed(crops)
    model = TorchArcFace(recognizer_path)
    raw, normalized = model.forward_all(_to_torch(crops))
    np.testing.assert_allclose(raw.numpy(), reference, atol=1e-4 * np.abs(reference).max())
    np.testing.assert_allclose(normalized.numpy(), reference / np.linalg.norm(reference, axis=1, keepdims=True),
                               atol=1e-4)


def test_gradients_reach_the_input_image_through_alignment(recognizer_path, photos_dir):
    from face_fixtures import read_photo
    from portraitbooth_core.face.retinaface import RetinaFaceDetector

    img = read_photo(photos_dir, "astronaut.png")
    face = RetinaFaceDetector("cpu").detect(img, 0.6)[0]
    model = TorchArcFace(recognizer_path)
    image = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).requires_grad_()
    reference = model.embed_faces(image.detach(), face.landmarks[None])
    assert identity_loss(reference, model.embed_faces(image.detach(), face.landmarks[None])) < 1e-5
    # A perturbed image is further from the reference, and the loss gradient reaches the pixels.
    noisy = (image + 0.2 * torch.randn_like(image)).clamp(0, 1)
    loss = identity_loss(reference, model.embed_faces(noisy, face.landmarks[None]))
    assert loss > 1e-4
    loss.backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the recognizer stays frozen


@pytest.mark.parametrize("feature,channels", [("stage1", 16), ("stage2", 32), ("stage3", 64), ("stage4", 128)])
def test_shallow_features_are_pooled_stage_outputs(recognizer_path, crops, feature, channels):
    model = TorchArcFace(recognizer_path, feature=feature)
    raw, feat = model.forward_all(_to_torch(crops))
    assert raw.shape == (3, 512)  # the final embedding is still computed alongside
    assert feat.shape == (3, channels)
    torch.testing.assert_close(feat.norm(dim=-1), torch.ones(3))


def test_unknown_feature_name_is_rejected(recognizer_path):
    with pytest.raises(ValueError, match=re.escape(f"one of {FEATURES}")):
        TorchArcFace(recognizer_path, feature="stage9")


def test_identity_fed_initializers_are_folded(recognizer_path):
    import onnx

    model = onnx.load(str(recognizer_path))
    assert sum(n.op_type == "Identity" for n in model.graph.node) == 1
    assert fold_identity_initializers(model) == 1
    assert not any(n.op_type == "Identity" for n in model.graph.node)
    onnx.checker.check_model(model)


def test_model_stays_in_eval_mode(recognizer_path):
    model = TorchArcFace(recognizer_path).train()
    assert not any(m.training for m in model.modules())
