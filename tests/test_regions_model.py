"""The Multi-Subject Region Sampler on a real (tiny, random) SD1.5 model, in-process.

Subjects are STEA conditionings from the random CLIP-L with a stand-in projector, so
each region's identity token really differs by face. Locality is measured on the
sampled latent: swap one subject's face and compare how much each half changes.
"""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

import stea_fixtures
from conftest import load_pack
from portraitbooth_core.regions.layout import Box, RegionError

LEFT, RIGHT = Box(0.0, 0.0, 0.5, 1.0), Box(0.5, 0.0, 0.5, 1.0)
LATENT = (1, 4, 16, 32)  # a 128x256 image: two 16x16 halves
# Outside its region a subject may move the latent by at most this fraction of what it
# moves inside. Regional attention confines only the identity token; the UNet's
# convolutions and self-attention then carry some change across the border (measured
# 0.19 here, 1.0 with the hook's masks disabled). Multidiffusion fuses predictions by
# mask, leaving only what later steps pick up from the changed latent (measured 0.013).
LEAK = {"regional attention": 0.35, "multidiffusion": 0.1}


@pytest.fixture(scope="module")
def mods():
    load_pack()
    return (importlib.import_module("portraitbooth_pack_under_test.nodes.regions"),
            importlib.import_module("portraitbooth_pack_under_test.nodes.region_sampling"),
            importlib.import_module("portraitbooth_pack_under_test.nodes.stea_encode"))


@pytest.fixture(scope="module")
def parts(sd15_parts, tmp_path_factory):
    model, clip, _ = sd15_parts
    return model, clip, stea_fixtures.model(tmp_path_factory.mktemp("pb"), seed=0)


def stea(mods, parts, text: str, *faces: int, **kwargs) -> list:
    _, clip, pb = parts
    return mods[2].encode_with_identity(clip, text, [stea_fixtures.identity(f) for f in faces], pb, **kwargs)


def plain(parts, text: str) -> list:
    clip = parts[1]
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def regions_of(mods, conds_and_places, weights=None) -> list:
    node = mods[0].PortraitBoothRegion
    regions = None
    for i, (cond, place) in enumerate(conds_and_places):
        box = place if isinstance(place, Box) else Box(0, 0, 1, 1)
        use_box = isinstance(place, Box)
        mask = place if torch.is_tensor(place) else None
        w = weights[i] if weights else 1.0
        regions = node.execute(cond, w, box.x, box.y, box.width if use_box else 0.0,
                               box.height if use_box else 0.0, mask, regions).args[0]
    return regions


def run(mods, parts, regions, mode, positive=None, steps=3, latent=LATENT, cfg=5.0, model=None):
    model = model or parts[0]
    positive = positive or plain(parts, "two men in a park, photo")
    out = mods[0].MultiSubjectRegionSampler.execute(
        model, positive, plain(parts, "blurry"), regions, {"samples": torch.zeros(latent)}, 7, steps, cfg,
        "euler", "normal", 1.0, mode)
    return out.args[0]["samples"]


@pytest.mark.parametrize("mode", ["regional attention", "multidiffusion"])
def test_a_subject_changes_its_own_region_and_hardly_the_other(mods, parts, mode):
    text = "a photo of a man"
    base = run(mods, parts, regions_of(mods, [(stea(mods, parts, text, 1), LEFT), (stea(mods, parts, text, 2), RIGHT)]),
               mode)
    swapped = run(mods, parts, regions_of(mods, [(stea(mods, parts, text, 3), LEFT),
                                                 (stea(mods, parts, text, 2), RIGHT)]), mode)
    delta = (swapped - base).abs().mean(dim=(0, 1))
    inside, outside = float(delta[:, :16].mean()), float(delta[:, 16:].mean())
    assert inside > 1e-3, f"{mode}: the left subject's face did not change its region ({inside})"
    assert outside < LEAK[mode] * inside, f"{mode}: left face moved the right half {outside:.4g} vs {inside:.4g}"
    assert torch.isfinite(base).all()


def count_unet_rows(model):
    """A clone whose UNet calls are recorded as batch sizes (one entry per pass)."""
    rows: list[int] = []
    patched = model.clone()

    def wrapper(apply_model, args):
        rows.append(int(args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(wrapper)
    return patched, rows


def test_regional_attention_is_one_pass_per_step_multidiffusion_one_path_per_region(mods, parts):
    text = "a photo of a man"
    regions = regions_of(mods, [(stea(mods, parts, text, 1), Box(0, 0, 0.4, 1)),
                                (stea(mods, parts, text, 2), Box(0.6, 0, 0.4, 1))])
    model, rows = count_unet_rows(parts[0])
    run(mods, parts, regions, "regional attention", steps=2, model=model)
    assert rows == [2, 2]  # cond + uncond in one batch: the 154-token cond still batches with 77
    rows.clear()
    run(mods, parts, regions, "multidiffusion", steps=2, model=model)
    assert rows == [4, 4]  # uncond + background + two regions, batched
    rows.clear()
    auto = regions_of(mods, [(stea(mods, parts, text, 1), None), (stea(mods, parts, text, 2), None)])
    run(mods, parts, auto, "multidiffusion", steps=1, model=model)
    assert rows == [3]  # the side-by-side layout covers everything: no background path


def test_occurrences_of_one_class_word_map_to_regions_in_order(mods, parts):
    """'a man and a man' with two faces: the first 'man' belongs to region 1, the second to 2."""
    rs = mods[1]
    glob = stea(mods, parts, "a man and a man", 1, 2)
    regions = regions_of(mods, [(stea(mods, parts, "a photo of a man", 1), LEFT),
                                (stea(mods, parts, "a photo of a man", 2), RIGHT)])
    positions = rs.check_class_words(glob, regions)
    assert positions == [(2,), (5,)]  # <start> a man and a man: one token per subject on SD1.5
    fused = rs.region_layout(regions, torch.zeros(LATENT), 0.15)
    patched, extended = rs.regional_attention(parts[0], glob, regions, fused.shares, positions)
    hook = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values())).hooks[-1]
    by_position = {g.positions: g.share for g in hook.groups}
    assert torch.equal(by_position[(2,)], fused.shares[0]) and torch.equal(by_position[(5,)], fused.shares[1])
    assert extended[0][0].shape[1] == 154 and set(by_position) >= {(77,), (78,)}
    with pytest.raises(RegionError, match="3 regions \\(faces\\) but the global positive names only 2"):
        rs.check_class_words(glob, regions + regions[:1])


def test_more_faces_than_class_words_is_refused_with_the_fix(mods, parts):
    from portraitbooth_core.stea.class_words import ClassWordError

    with pytest.raises(ClassWordError, match="2 faces were given but the prompt has only 1"):
        stea(mods, parts, "a photo of a man", 1, 2)


def test_regions_from_another_base_model_are_refused_where_they_are_joined(mods, parts):
    sdxl_like = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    sd15 = stea(mods, parts, "a photo of a man", 1)
    with pytest.raises(RegionError, match="region 2 was encoded for SDXL .* region 1 is SD1.5"):
        regions_of(mods, [(sd15, LEFT), (sdxl_like, RIGHT)])
    only_sdxl = regions_of(mods, [(sdxl_like, None)])
    with pytest.raises(RegionError, match="region 1 was encoded for SDXL.*the MODEL is SD1.5"):
        run(mods, parts, only_sdxl, "multidiffusion", steps=1)


def test_plain_text_region_needs_multidiffusion(mods, parts):
    regions = regions_of(mods, [(plain(parts, "a photo of a man"), LEFT)])
    with pytest.raises(RegionError, match="region 1's conditioning has no identity token.*'multidiffusion'"):
        run(mods, parts, regions, "regional attention", steps=1)
    assert torch.isfinite(run(mods, parts, regions, "multidiffusion", steps=1)).all()


def test_masks_of_another_shape_are_resized_and_reported(mods, parts, caplog):
    square = torch.zeros(1, 64, 64)
    square[:, :, :32] = 1.0
    regions = regions_of(mods, [(stea(mods, parts, "a photo of a man", 1), square)])
    with caplog.at_level(logging.WARNING, logger="portraitbooth"):
        out = run(mods, parts, regions, "regional attention", steps=1)
    assert out.shape == LATENT and "region 1's mask is 64x64" in caplog.text and "stretched" in caplog.text
    empty = regions_of(mods, [(stea(mods, parts, "a photo of a man", 1), torch.zeros(1, 128, 256))])
    with pytest.raises(RegionError, match="region 1's mask is empty"):
        run(mods, parts, empty, "multidiffusion", steps=1)


def test_regions_share_the_attention_dispatcher_with_ecac_and_drive_the_progress_bar(mods, parts):
    import comfy.utils

    from portraitbooth_core.ecac.control import ControlSettings

    ecac = importlib.import_module("portraitbooth_pack_under_test.nodes.ecac")
    with_ecac, store = ecac.apply_ecac(parts[0], [5], [4], {"man": [5]}, ControlSettings(strength=1.0),
                                       torch.ones(64, 64))
    regions = regions_of(mods, [(stea(mods, parts, "a photo of a man", 1), LEFT),
                                (stea(mods, parts, "a photo of a man", 2), RIGHT)])
    fused = mods[1].region_layout(regions, torch.zeros(LATENT), 0.15)
    patched, _ = mods[1].regional_attention(with_ecac, plain(parts, "two men"), regions, fused.shares, [])
    slots = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    kinds = {type(h).__name__ for d in slots.values() for h in d.hooks}
    assert kinds == {"ExpressionControl", "AttentionCapture", "RegionalAttention"}  # one dispatcher per slot
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        run(mods, parts, regions, "regional attention", steps=3, model=with_ecac)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert updates[-1] == (3, 3) and store.mean() is not None  # ECAC still captured during the region run
