"""Region layouts, the regional-attention hook and multidiffusion fusion, without ComfyUI."""
from __future__ import annotations

import math

import pytest
import torch

from portraitbooth_core.ecac.dispatch import LayerCall
from portraitbooth_core.regions.multidiffusion import active_paths, fuse
from portraitbooth_core.regions.attention import RegionalAttention, TokenGroup, extend_context
from portraitbooth_core.regions.layout import Box, RegionError, fit_mask, layout, side_by_side


def call(size=(4, 6), sigma=None) -> LayerCall:
    return LayerCall(("input", 1), 0, 2, size, size, sigma, [0], 1)


def test_side_by_side_columns_cross_fade_and_cover_the_image():
    cols = side_by_side(3, 4, 60, feather=0.2)
    assert cols.shape == (3, 4, 60)
    torch.testing.assert_close(cols.sum(0), torch.ones(4, 60))  # no gap, no double weight
    assert cols[0, :, :15].eq(1).all() and cols[1, :, 25:35].eq(1).all() and cols[2, :, 45:].eq(1).all()
    border = cols[:, 0, 18:22]  # around x = 20, the first inner border: a ramp, not a step
    assert ((border > 0) & (border < 1)).any()


def test_mask_at_image_size_is_resized_silently_and_other_aspects_are_reported():
    mask = torch.zeros(1, 128, 256)
    mask[:, :, :128] = 1.0  # left half, drawn at image size (8x the latent)
    fitted, note = fit_mask(mask, 16, 32)
    assert note is None and fitted.shape == (16, 32)
    assert fitted[:, :16].eq(1).all() and fitted[:, 16:].eq(0).all()
    square, note = fit_mask(torch.ones(64, 64), 16, 32, "region 2's mask")
    assert square.shape == (16, 32) and "region 2's mask is 64x64" in note and "stretched" in note


def test_empty_masks_fail_with_what_to_do():
    with pytest.raises(RegionError, match="region 1's mask is empty.*automatic side-by-side"):
        layout([torch.zeros(64, 64)], [1.0], 8, 8, labels=["region 1"])
    speck = torch.zeros(512, 512)
    speck[0, 0] = 1.0  # one pixel: nothing left of it at 1/8 size
    with pytest.raises(RegionError, match="selects almost nothing once resized"):
        fit_mask(speck, 64, 64)
    with pytest.raises(RegionError, match="no regions given"):
        layout([], [], 8, 8)


def test_overlapping_regions_blend_by_weight_and_leave_the_rest_to_the_background():
    left, right = Box(0.0, 0.0, 0.75, 1.0), Box(0.25, 0.0, 0.75, 1.0)  # overlap in the middle half
    result = layout([left, right], [3.0, 1.0], 4, 8)
    s, bg = result.shares, result.background
    assert any("overlap" in n for n in result.notes)
    torch.testing.assert_close(s[:, 0, 3], torch.tensor([0.75, 0.25]))  # overlap: 3:1
    assert s[0, 0, 0] == 1.0 and s[1, 0, 7] == 1.0  # alone: all of it
    torch.testing.assert_close(s.sum(0) + bg, torch.ones(4, 8))
    light = layout([Box(0.0, 0.0, 0.5, 1.0)], [0.4], 4, 8)
    assert light.shares[0, 0, 0] == pytest.approx(0.4) and light.background[0, 0] == pytest.approx(0.6)


def test_auto_regions_take_columns_in_order_and_blend_with_placed_ones():
    mask = torch.zeros(8, 8)
    mask[:4] = 1  # region 2: the top half; regions 1 and 3 share the automatic layout: two columns
    s = layout([None, mask, None], [1, 1, 1], 8, 8, feather=0.0).shares
    assert s[0, 4:, :4].eq(1).all() and s[0, :, 4:].eq(0).all() and s[2, 4:, 4:].eq(1).all()
    torch.testing.assert_close(s[:, 0, 0], torch.tensor([0.5, 0.5, 0.0]))  # top left: 1 and 2 blend
    torch.testing.assert_close(s[:, 0, 7], torch.tensor([0.0, 0.5, 0.5]))
    assert s[1, 4:].eq(0).all()
    with pytest.raises(RegionError, match="weights must be > 0"):
        layout([None], [0.0], 8, 8)


def test_extend_context_pads_to_whole_chunks_and_reports_positions():
    context = torch.randn(2, 77, 8)
    ext, positions, hidden = extend_context(context, [torch.randn(1, 1, 8), torch.randn(1, 2, 8)])
    assert ext.shape == (2, 154, 8) and torch.equal(ext[:, :77], context)
    assert positions == [[77], [78, 79]] and hidden == list(range(80, 154))
    with pytest.raises(ValueError, match="do not fit a 8-channel context"):
        extend_context(context, [torch.randn(1, 1, 4)])


def test_hook_equals_a_masked_softmax_and_leaves_unregioned_pixels_global():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 24, 10)  # (rows, heads, 4x6 pixels, tokens)
    share = torch.zeros(4, 6)
    share[:, :3] = 1.0  # identity token 7 may only appear in the left half
    hook = RegionalAttention([TokenGroup((7,), share)], hidden=[8, 9])
    out = hook.process(logits.softmax(-1), call())
    mask = torch.zeros(24, 10)
    mask[:, [8, 9]] = -math.inf
    mask[share.reshape(-1) == 0, 7] = -math.inf
    torch.testing.assert_close(out, (logits + mask).softmax(-1))
    right = share.reshape(-1) == 0  # outside the region: exactly the prompt without token 7
    global_only = torch.nn.functional.pad(logits[:, :, right, :7].softmax(-1), (0, 3))
    torch.testing.assert_close(out[:, :, right], global_only)


def test_hook_fades_soft_edges_and_hides_tokens_outside_their_schedule_window():
    probs = torch.full((1, 1, 4, 4), 0.25)
    share = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    hook = RegionalAttention([TokenGroup((3,), share, sigma_start=5.0, sigma_end=1.0)])
    inside = hook.process(probs, call((2, 2), sigma=2.0))
    torch.testing.assert_close(inside[0, 0, :, 3], torch.tensor([0.25, 0.25 * 0.5 / 0.875, 0.0, 0.25]))
    early = hook.process(probs, call((2, 2), sigma=9.0))  # before the identity's start: token hidden
    assert early[..., 3].eq(0).all()
    torch.testing.assert_close(early.sum(-1), torch.ones(1, 1, 4))


def test_fuse_is_the_mask_weighted_average_of_the_paths():
    a, b, c = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    bg = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    s1 = torch.tensor([[0.0, 1.0], [0.5, 0.0]])
    s2 = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    out = fuse([a, b, c], [bg, s1, s2])
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 1.0], [1.5, 0.0]]))  # last pixel: no weight, path 0
    assert active_paths(torch.zeros(2, 2), torch.stack([s1, torch.zeros(2, 2)])) == [1]
    with pytest.raises(ValueError, match="one map per path"):
        fuse([a, b], [bg])


def test_fuse_normalises_weights_that_do_not_sum_to_one():
    """Weights made for another latent or rounded may sum to 0.8 or 4: the fused value is
    still the weighted average (a convex blend), never a scaled prediction."""
    a, b = torch.full((1, 4, 2, 2), 1.0), torch.full((1, 4, 2, 2), 3.0)
    wa = torch.tensor([[0.2, 2.0], [0.1, 0.0]])
    wb = torch.tensor([[0.6, 2.0], [0.0, 0.3]])
    out = fuse([a, b], [wa, wb])
    expected = torch.tensor([[(0.2 * 1 + 0.6 * 3) / 0.8, 2.0], [1.0, 3.0]])
    torch.testing.assert_close(out[0, 0], expected)
    assert out.min() >= 1.0 and out.max() <= 3.0


def test_fused_fast_path_gives_what_the_explicit_softmax_gives():
    """The dispatcher runs RegionalAttention as a logit mask on the fused kernel; a hook with
    only `process` takes the explicit-softmax path. Both must agree, uncond rows untouched."""
    from portraitbooth_core.ecac.dispatch import Attn2Dispatcher

    def sdpa(q, k, v, heads, mask=None, **_):
        b, n, c = q.shape
        split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, n, c)

    class ProbsOnly:  # the same hook without logit_bias
        def __init__(self, hook):
            self.wants, self.modifies, self.process = hook.wants, hook.modifies, hook.process

    torch.manual_seed(1)
    share = torch.zeros(4, 6)
    share[:, :2], share[:, 2] = 1.0, 0.5
    hook = RegionalAttention([TokenGroup((77,), share)], hidden=list(range(78, 154)))
    q, k, v = torch.randn(2, 24, 16), torch.randn(2, 154, 16), torch.randn(2, 154, 16)
    extra = {"n_heads": 2, "cond_or_uncond": [1, 0], "activations_shape": (2, 16, 4, 6)}
    fast = Attn2Dispatcher(sdpa, [hook])(q, k, v, extra)
    slow = Attn2Dispatcher(sdpa, [ProbsOnly(hook)])(q, k, v, extra)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[:1], sdpa(q[:1], k[:1], v[:1], 2))  # uncond row: plain attention
