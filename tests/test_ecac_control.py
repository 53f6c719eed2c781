"""Expression control and capture at the level of one attn2 call (no UNet)."""
from __future__ import annotations

import pytest
import torch

from portraitbooth_core.ecac.capture import AttentionCapture, AttentionStore
from portraitbooth_core.ecac.control import ControlSettings, ExpressionControl, constrain_rows
from portraitbooth_core.ecac.dispatch import Attn2Dispatcher, apply_probs, attention_probs

HEADS, TOKENS, ID, EXPR = 2, 6, [2], [4]


def fused(q, k, v, heads, **_):
    # Stand-in for ComfyUI's fused attention (SDPA on the same inputs).
    b, n, inner = q.shape
    d = inner // heads
    split = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, inner)


class Recorder:
    """Hook that keeps the probabilities it is shown (after the hooks before it)."""

    def __init__(self):
        self.seen = []

    def wants(self, call):
        return True

    def modifies(self, call):
        return False

    def process(self, probs, call):
        self.seen.append(probs.clone())
        return probs


def qkv(b=2, h=4, w=6, seed=0, sharp=3.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h * w, HEADS * 8, generator=gen) * sharp
    k = torch.randn(b, TOKENS, HEADS * 8, generator=gen)
    v = torch.randn(b, TOKENS, HEADS * 8, generator=gen)
    return q, k, v


def options(b, h=4, w=6, cond_or_uncond=(0,), sigma=5.0):
    return {"n_heads": HEADS, "block": ("input", 1), "block_index": 0, "activations_shape": [b, 320, h, w],
            "original_shape": [b, 4, h, w], "cond_or_uncond": list(cond_or_uncond),
            "sigmas": torch.full((b,), sigma)}


def test_constrain_rows_caps_identity_floors_expression_keeps_proportions():
    rows = torch.tensor([[0.05, 0.05, 0.85, 0.03, 0.02, 0.00],   # identity too high, expression too low
                         [0.50, 0.10, 0.20, 0.05, 0.15, 0.00]])  # already within limits
    out = constrain_rows(rows, ID, EXPR, beta=0.8, gamma=0.1)
    assert torch.allclose(out.sum(-1), torch.ones(2))
    assert out[0, 2].item() == pytest.approx(0.8) and out[0, 4].item() == pytest.approx(0.1)
    free = [0, 1, 3, 5]
    assert torch.allclose(out[0, free] / out[0, free].sum(), rows[0, free] / rows[0, free].sum())
    assert torch.equal(out[1], rows[1])
    # targets that cannot all fit (beta + 2 gamma > 1) are scaled to fill the row exactly
    squeezed = constrain_rows(rows[:1], ID, [3, 4], beta=0.9, gamma=0.1)
    assert torch.allclose(squeezed.sum(-1), torch.ones(1)) and squeezed[0, [0, 1, 5]].sum() == 0


def _constrain_one_row(row: list[float], identity: list[int], expression: list[int], beta: float,
                       gamma: float) -> list[float]:
    """The definition, one row at a time in float64: the reference for the batched edit."""
    expression = sorted(set(expression))
    identity = sorted(set(identity) - set(expression))
    out = list(row)
    mass = sum(row[i] for i in identity)
    if mass > beta:
        for i in identity:
            out[i] = row[i] * beta / mass
    for e in expression:
        out[e] = max(row[e], gamma)
    if out == list(row):
        return out
    fixed = identity + expression
    wanted = sum(out[i] for i in fixed)
    free = [t for t in range(len(row)) if t not in fixed]
    if wanted > 1.0:
        return [out[t] / wanted if t in fixed else 0.0 for t in range(len(row))]
    free_mass = sum(row[t] for t in free)
    for t in free:
        out[t] = row[t] * (1.0 - wanted) / free_mass
    return out


@pytest.mark.parametrize("seed", range(40))
def test_constrain_rows_matches_the_definition_row_by_row_also_on_sharp_and_overfilled_rows(seed):
    """Sharp rows (logits x12: probabilities far below 1e-12, free mass far below the fixed
    one), several identity and expression tokens, targets that overfill the row."""
    gen = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(3, 80, (1,), generator=gen))
    probs = (torch.randn(2, 3, tokens, generator=gen) * float(torch.rand(1, generator=gen)) * 12).softmax(-1)
    pick = lambda: sorted(set(torch.randint(0, tokens, (seed % 3 + 1,), generator=gen).tolist()))  # noqa: E731
    identity, expression = pick(), pick()
    beta, gamma = float(torch.rand(1, generator=gen)), float(torch.rand(1, generator=gen)) * 0.5
    out = constrain_rows(probs, identity, expression, beta, gamma)
    rows = probs.reshape(-1, tokens).double().tolist()
    expect = torch.tensor([_constrain_one_row(r, identity, expression, beta, gamma) for r in rows],
                          dtype=torch.float64).reshape(out.shape)
    assert torch.allclose(out.double(), expect, atol=2e-6, rtol=1e-4), (out.double() - expect).abs().max()
    untouched = [i for i, r in enumerate(rows) if _constrain_one_row(r, identity, expression, beta, gamma) == r]
    assert torch.equal(out.reshape(-1, tokens)[untouched], probs.reshape(-1, tokens)[untouched])


def test_control_changes_only_targeted_tokens_inside_the_region():
    b, h, w = 2, 4, 6
    q, k, v = qkv(b, h, w)
    mask = torch.zeros(h, w)
    mask[:, :3] = 1  # left half is the face
    control = ExpressionControl(ID, EXPR, ControlSettings(strength=1.0, beta=0.3, gamma=0.2), mask)
    before, after = Recorder(), Recorder()
    out = Attn2Dispatcher(fused, [before, control, after])(q, k, v, options(b))
    p0, p1 = before.seen[0], after.seen[0]  # (b, heads, h*w, tokens)
    inside = mask.flatten().bool()
    assert torch.equal(p0[:, :, ~inside], p1[:, :, ~inside])  # outside: bit-identical
    assert (p1[:, :, inside][..., ID].sum(-1) <= 0.3 + 1e-6).all()
    assert (p1[:, :, inside][..., EXPR] >= 0.2 - 1e-6).all()
    assert not torch.equal(p0[:, :, inside], p1[:, :, inside])
    free = [0, 1, 3, 5]
    r0, r1 = p0[:, :, inside][..., free], p1[:, :, inside][..., free]
    assert torch.allclose(r0 / r0.sum(-1, keepdim=True), r1 / r1.sum(-1, keepdim=True), atol=1e-5)
    # the output is the edited attention applied to v; outside the face it equals fused attention
    assert torch.allclose(out, apply_probs(p1, v), atol=1e-5)
    ref = fused(q, k, v, HEADS).reshape(b, h, w, -1)
    assert torch.allclose(out.reshape(b, h, w, -1)[:, :, 3:], ref[:, :, 3:], atol=1e-5)


def test_control_touches_cond_rows_only_and_respects_the_window():
    b = 4  # two chunks of 2: uncond then cond
    q, k, v = qkv(b)
    control = ExpressionControl(ID, EXPR, ControlSettings(beta=0.1, gamma=0.3, sigma_start=10.0, sigma_end=1.0),
                                torch.ones(4, 6))
    dispatcher = Attn2Dispatcher(fused, [control])
    ref = fused(q, k, v, HEADS)
    out = dispatcher(q, k, v, options(b, cond_or_uncond=(1, 0)))
    assert torch.equal(out[:2], fused(q[:2], k[:2], v[:2], HEADS))  # uncond rows: ComfyUI's own attention
    assert not torch.allclose(out[2:], ref[2:], atol=1e-3)
    for sigma in (20.0, 0.5):  # outside [sigma_end, sigma_start]: the fused path, bit-identical
        assert torch.equal(dispatcher(q, k, v, options(b, cond_or_uncond=(1, 0), sigma=sigma)), ref)
    zero = ExpressionControl(ID, EXPR, ControlSettings(strength=0.0), torch.ones(4, 6))
    assert torch.equal(Attn2Dispatcher(fused, [zero])(q, k, v, options(b)), fused(q, k, v, HEADS))


@pytest.mark.parametrize("order", [(1, 0), (0, 1)])
@pytest.mark.parametrize("window", ["whole schedule", "device gate"])
def test_cond_rows_get_the_edit_and_uncond_rows_comfyuis_attention_in_either_chunk_order(order, window):
    """The whole-schedule window is known on the host (the cond and uncond rows are joined
    without a gate); a window with an end is a gate on the device (written in place)."""
    b = 4
    q, k, v = qkv(b)
    end = 0.0 if window == "whole schedule" else 1.0
    control = ExpressionControl(ID, EXPR, ControlSettings(beta=0.1, gamma=0.3, sigma_end=end), torch.ones(4, 6))
    out = Attn2Dispatcher(fused, [control])(q, k, v, options(b, cond_or_uncond=order))
    cond, uncond = (slice(2, 4), slice(0, 2)) if order == (1, 0) else (slice(0, 2), slice(2, 4))
    assert torch.equal(out[uncond], fused(q[uncond], k[uncond], v[uncond], HEADS))
    edited = constrain_rows(attention_probs(q[cond], k[cond], HEADS), ID, EXPR, 0.1, 0.3)
    assert torch.allclose(out[cond], apply_probs(edited, v[cond]), atol=1e-5)


def test_region_comes_from_previous_step_identity_attention():
    b, h, w = 1, 4, 6
    q, k, v = qkv(b, h, w)
    control = ExpressionControl(ID, EXPR, ControlSettings(beta=0.05, gamma=0.3, region_threshold=0.5))
    rec = Recorder()
    dispatcher = Attn2Dispatcher(fused, [control, rec])
    dispatcher(q, k, v, options(b, h, w, sigma=10.0))  # first step: no region yet -> unchanged
    assert torch.allclose(rec.seen[0], attention_probs(q, k, HEADS))
    dispatcher(q, k, v, options(b, h, w, sigma=8.0))   # second step: region = where "identity" attended
    id_map = attention_probs(q, k, HEADS).mean(1)[0, :, ID[0]]
    norm = (id_map - id_map.min()) / (id_map.max() - id_map.min())
    region = norm > 0.5
    changed = (rec.seen[1] != rec.seen[0]).any(-1).any(1)[0]
    assert region.any() and not region.all()
    assert torch.equal(changed, region)
    dispatcher(q, k, v, options(b, h, w, sigma=12.0))  # sigma rose: new run, region forgotten
    assert torch.allclose(rec.seen[2], rec.seen[0])


def test_capture_batch_cfg_non_square_and_store_average():
    b, h, w = 4, 3, 5  # uncond x2 then cond x2, 3x5 activations of a 6x10 latent
    q, k, v = qkv(b, h, w)
    store = AttentionStore(["woman", "smiling"])
    capture = AttentionCapture({"woman": ID, "smiling": EXPR}, store)
    dispatcher = Attn2Dispatcher(fused, [capture])
    opts = options(b, h, w, cond_or_uncond=(1, 0))
    opts["original_shape"] = [b, 4, 6, 10]
    out = dispatcher(q, k, v, opts)
    assert torch.equal(out, fused(q, k, v, HEADS))  # reading does not change the output
    maps = store.mean()
    assert maps.shape == (2, 2, 6, 10)
    probs = attention_probs(q[2:], k[2:], HEADS).mean(1)  # cond rows
    expect = probs[..., ID[0]].reshape(2, 1, h, w)
    resized = torch.nn.functional.interpolate(expect, size=(6, 10), mode="bilinear", align_corners=False)
    assert torch.allclose(maps[:, :1], resized, atol=1e-6)
    dispatcher(q, k, v, {**opts, "sigmas": torch.full((b,), 3.0)})  # a later step averages in
    assert store.steps == 2 and torch.allclose(store.mean(), maps, atol=1e-6)
    dispatcher(q, k, v, {**opts, "sigmas": torch.full((b,), 9.0)})  # new run: starts over
    assert store.steps == 1
