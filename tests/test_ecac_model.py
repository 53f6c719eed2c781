"""ECAC on a real (tiny, random) SD1.5 UNet through ComfyUI's sampler and patch machinery."""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import load_pack
from portraitbooth_core.ecac.control import ControlSettings
from portraitbooth_core.ecac.layers import cross_attention_layers, select_layers

ID, EXPR = [5], [3]  # "a photo of a smiling woman": woman at 5, smiling at 4 -> any fixed ids do here
LABELS = {"woman": ID, "smiling": EXPR}


@pytest.fixture(scope="module")
def ecac():
    load_pack()
    return importlib.import_module("portraitbooth_pack_under_test.nodes.ecac")


def sample(model, latent_shape=(1, 4, 8, 8), steps=2, cfg=5.0, seed=0):
    import comfy.sample

    gen = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(1, 77, 768, generator=gen), {}]]
    neg = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed,
                               disable_pbar=True)


def test_layers_of_the_tiny_and_the_full_sd15_unet(tiny_model):
    tiny = cross_attention_layers(tiny_model.get_model_object("diffusion_model"))
    assert [(l.block, l.number, l.factor) for l in tiny] == [("input", 1, 1), ("middle", 0, 1), ("output", 0, 1),
                                                              ("output", 1, 1)]
    assert select_layers(tiny, "mid") == tiny  # one level: its coarsest layers are all of them

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from benchmarks.ecac_cost import SD15_FULL

    full = cross_attention_layers(UNetModel(**SD15_FULL, device="meta", operations=comfy.ops.disable_weight_init))
    assert [(l.block, l.number) for l in full] == ([("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)]
                                                   + [("output", i) for i in range(3, 12)])
    mid = select_layers(full, "mid")
    assert [(l.block, l.number) for l in mid] == [("input", 7), ("input", 8), ("output", 3), ("output", 4),
                                                  ("output", 5)]


def test_strength_zero_is_bit_identical_and_strength_one_is_not(tiny_model, ecac):
    base = sample(tiny_model)
    zero, store = ecac.apply_ecac(tiny_model, ID, EXPR, LABELS, ControlSettings(strength=0.0))
    assert torch.equal(sample(zero), base)
    assert store.mean() is not None  # the capture ran, and still nothing changed
    mask = torch.ones(64, 64)
    one, _ = ecac.apply_ecac(tiny_model, ID, EXPR, LABELS, ControlSettings(strength=1.0, beta=0.01, gamma=0.3),
                             mask=mask, capture=False)
    assert not torch.allclose(sample(one), base, atol=1e-4)


def test_capture_batch_two_cfg_non_square(tiny_model, ecac):
    patched, store = ecac.apply_ecac(tiny_model, ID, EXPR, LABELS, ControlSettings(strength=0.0))
    sample(patched, latent_shape=(2, 4, 6, 10), steps=3)
    maps = store.mean()
    assert maps.shape == (2, 2, 6, 10)  # cond rows only (CFG's uncond half skipped), latent-sized
    assert store.steps == 3 and torch.isfinite(maps).all() and (maps > 0).all() and (maps < 1).all()
    assert not torch.allclose(maps[0], maps[1])  # two different samples, two different maps


class Attn2Replace:
    """Stand-in for another pack, following IPAdapter_plus's CrossAttentionPatch pattern:
    fused attention plus residual callbacks, `.add()` on whatever sits at the key."""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = extra_options["sigmas"].detach().cpu()[0].item() if "sigmas" in extra_options else 999999999.9
        for cb, kw in zip(self.callback, self.kwargs):
            if kw["sigma_end"] <= sigma <= kw["sigma_start"]:
                out = out + cb(out, q, k, v, extra_options, **kw)
        return out.to(q.dtype)


CALLS = []


def other_pack_residual(out, q, k, v, extra_options, weight=1.0, **_):
    CALLS.append(extra_options["block"])
    return weight * v.mean(dim=1, keepdim=True).expand_as(out)


def apply_other_pack(model, weight=0.3):
    model = model.clone()
    to = model.model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    attn2 = to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
    for key in (("input", 1), ("middle", 0), ("output", 0), ("output", 1)):  # IPAdapter's SD1.5 2-tuple keys
        kwargs = dict(weight=weight, sigma_start=999999999.9, sigma_end=0.0)
        if key not in attn2:
            attn2[key] = Attn2Replace(other_pack_residual, **kwargs)
        else:
            attn2[key].add(other_pack_residual, **kwargs)
    model.model_options["transformer_options"] = to
    return model


def test_coexists_with_an_ipadapter_style_patch_in_either_order(tiny_model, ecac):
    settings = ControlSettings(strength=1.0, beta=0.01, gamma=0.3)
    mask = torch.ones(64, 64)
    base, other = sample(tiny_model), sample(apply_other_pack(tiny_model))
    ours = sample(ecac.apply_ecac(tiny_model, ID, EXPR, LABELS, settings, mask)[0])
    CALLS.clear()
    ours_then_other, store = ecac.apply_ecac(tiny_model, ID, EXPR, LABELS, settings, mask)
    a = sample(apply_other_pack(ours_then_other))
    assert len(CALLS) == 4 * 2 and store.mean() is not None  # theirs: 4 layers x 2 steps (CFG batched); ours ran
    other_then_ours, store2 = ecac.apply_ecac(apply_other_pack(tiny_model), ID, EXPR, LABELS, settings, mask)
    b = sample(other_then_ours)
    assert store2.mean() is not None
    assert torch.allclose(a, b, atol=1e-5)  # same composition whichever pack came first
    for alone in (base, other, ours):
        assert not torch.allclose(a, alone, atol=1e-4)


def test_wraps_a_plain_replace_function_without_losing_it(tiny_model, ecac):
    from comfy.ldm.modules.attention import optimized_attention

    def plain(q, k, v, extra_options):  # a pack that replaces attention outright
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    plain_model = tiny_model.clone()
    plain_model.set_model_attn2_replace(plain, "input", 1)
    alone = sample(plain_model)
    # Our idle hooks (strength 0, capture only) keep the wrapped function's output exactly.
    wrapped, store = ecac.apply_ecac(plain_model, ID, EXPR, LABELS, ControlSettings(strength=0.0))
    assert torch.equal(sample(wrapped), alone) and store.mean() is not None
    attn2 = wrapped.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert attn2[("input", 1)].inner is not None
    steered, _ = ecac.apply_ecac(plain_model, ID, EXPR, LABELS, ControlSettings(beta=0.01, gamma=0.3),
                                 mask=torch.ones(64, 64))
    assert not torch.allclose(sample(steered), alone, atol=1e-4)
