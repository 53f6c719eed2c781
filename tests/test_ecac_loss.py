"""ECAC localization loss against hand-computed values, and its gradients."""
from __future__ import annotations

import pytest
import torch

from portraitbooth_core.ecac.capture import AttentionCapture
from portraitbooth_core.ecac.dispatch import Attn2Dispatcher, attention_probs, apply_probs
from portraitbooth_core.ecac.loss import ECACSettings, localization_loss, loss_from_capture

MASK = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # face = top row
A_ID = torch.tensor([[[0.9, 0.5], [0.2, 0.0]]])  # 0.9 > beta (truncation inactive), 0.5 < beta (active)
A_EX = torch.tensor([[[0.05, 0.3], [0.1, 0.4]]])  # 0.05 < gamma (active), 0.3 > gamma (inactive)


def test_one_layer_matches_hand_computation():
    # identity: outside mean([0,0,.2,0]) = .05; inside mean(relu(.8-[.9,.5]),0,0) = .3/4 = .075
    # expression: outside mean([0,0,.1,.4]) = .125; inside mean(relu(.1-[.05,.3]),0,0) = .05/4 = .0125
    loss = localization_loss([A_ID], [A_EX], MASK)
    assert loss.per_layer["0"]["identity"].item() == pytest.approx(0.001 * (0.05 + 0.075))
    assert loss.per_layer["0"]["expression"].item() == pytest.approx(0.01 * (0.125 + 0.0125))
    assert loss.total.item() == pytest.approx(0.001 * 0.125 + 0.01 * 0.1375)


def test_layers_average_and_mask_is_resized_per_layer():
    # A 1x1 layer sees the 2x2 mask area-averaged to 0.5:
    # identity .6: outside .6*.5 = .3, inside relu(.2)*.5 = .1 -> .001*.4
    # expression 0: outside 0, inside .1*.5 = .05 -> .01*.05
    small_id, small_ex = torch.full((1, 1, 1), 0.6), torch.zeros(1, 1, 1)
    loss = localization_loss([A_ID, small_id], [A_EX, small_ex], MASK, layer_names=["big", "small"])
    assert loss.per_layer["small"]["total"].item() == pytest.approx(0.001 * 0.4 + 0.01 * 0.05)
    expected = (0.001 * 0.125 + 0.01 * 0.1375 + 0.001 * 0.4 + 0.01 * 0.05) / 2
    assert loss.total.item() == pytest.approx(expected)


def test_settings_and_truncation():
    # With beta = 0.95 the 0.9 pixel is below the truncation too: inside = (.05 + .45)/4.
    loss = localization_loss([A_ID], [A_EX], MASK, ECACSettings(beta=0.95, lam=1.0, mu=0.0))
    assert loss.total.item() == pytest.approx(0.05 + 0.5 / 4)
    # Maps at or above the floors inside and zero outside cost nothing.
    perfect = torch.tensor([[[0.8, 0.85], [0.0, 0.0]]])
    assert localization_loss([perfect], [perfect], MASK).total.item() == 0.0


def test_samples_without_expression_or_face_are_left_out():
    maps_id = torch.cat([A_ID, torch.ones(1, 2, 2)])
    maps_ex = torch.cat([A_EX, torch.zeros(1, 2, 2)])
    mask = torch.cat([MASK, torch.zeros(1, 2, 2)])
    both = localization_loss([maps_id], [maps_ex], mask, face_present=torch.tensor([1, 0]))
    assert both.total.item() == pytest.approx(localization_loss([A_ID], [A_EX], MASK).total.item())
    no_expr = localization_loss([A_ID], [A_EX], MASK, expression_present=torch.tensor([0]))
    assert no_expr.per_layer["0"]["expression"].item() == 0.0
    assert no_expr.total.item() == pytest.approx(0.001 * 0.125)


def _fused(q, k, v, heads, **_):
    return apply_probs(attention_probs(q, k, heads), v)


def _captured_loss(q, k, v, mask):
    capture = AttentionCapture({"identity": [1], "expression": [2]}, differentiable=True)
    dispatcher = Attn2Dispatcher(_fused, [capture])
    for block in (("input", 1), ("output", 0)):
        dispatcher(q, k, v, {"n_heads": 2, "block": block, "activations_shape": [q.shape[0], 4, 2, 3]})
    layers = capture.pop_layers()
    assert [n for n, _ in layers] == ["input.1.0", "output.0.0"] and capture.pop_layers() == []
    return loss_from_capture(layers, mask).total


def test_gradients_reach_queries_and_keys():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, 4, 6, dtype=torch.float64)
    mask[:, :2, :3] = 1
    loss = _captured_loss(q, k, v, mask)
    loss.backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0
    # and they are the right gradients (probabilities are computed in float32 inside;
    # finite differences in float64 with a matching tolerance)
    q2, k2 = q.detach().clone(), k.detach().clone()
    eps = 1e-3
    for tensor, grad in ((q2, q.grad), (k2, k.grad)):
        idx = (0, 1, 3)
        tensor[idx] += eps
        up = _captured_loss(q2, k2, v, mask).item()
        tensor[idx] -= 2 * eps
        down = _captured_loss(q2, k2, v, mask).item()
        tensor[idx] += eps
        assert (up - down) / (2 * eps) == pytest.approx(grad[idx].item(), rel=2e-2, abs=1e-9)
