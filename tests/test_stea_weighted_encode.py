"""Apply STEA Conditioning with a weighted class word ("(man:1.2)") costs one text encode,
as a weighted CLIPTextEncode does (issue 24, item 3).

The projector reads the class token's unweighted output, which used to take a second,
unit-weight encode. The reference below keeps that old way (two encode_from_tokens_scheduled
calls); the node's one-encode output must match it, on SD1.5 and on SDXL (PhotoMaker), and
every token but the class words must stay CLIPTextEncode's bit for bit.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from stea_fixtures import identity, model

PROMPTS = {
    "short": "a photo of a (man:1.2) in a park",
    # past 77 tokens, the class word in the second chunk, another weighted word in the first
    "long": ", ".join(["(highly detailed:0.8)"] + ["sharp focus"] * 30) + ", a photo of a (man:1.3) at dusk",
}


def two_encodes(clip, tokens: dict) -> tuple[list, list[torch.Tensor]]:
    """The old way: the weighted encode for the text, a second unit-weight one for psi."""
    unit = {k: [[(t[0], 1.0, *t[2:]) for t in chunk] for chunk in chunks] for k, chunks in tokens.items()}
    return (clip.encode_from_tokens_scheduled(tokens),
            [cond for cond, _ in clip.encode_from_tokens_scheduled(unit)])


@pytest.fixture(scope="module")
def encode_module(pack_nodes):
    return importlib.import_module("portraitbooth_pack_under_test.nodes.stea_encode")


@pytest.fixture
def old_way(encode_module, monkeypatch):
    """Switches Apply STEA back to two encodes, for the reference output."""
    photomaker = importlib.import_module("portraitbooth_pack_under_test.nodes.stea_photomaker")

    def use():
        monkeypatch.setattr(encode_module, "encode_weighted_once", two_encodes)
        monkeypatch.setattr(photomaker, "encode_weighted_once", two_encodes)
    return use


def count_forwards(monkeypatch, encoders: dict) -> dict[str, list[int]]:
    """{name: batch size of each forward} of each CLIP text model (SDClipModel.encode)."""
    seen: dict[str, list[int]] = {name: [] for name in encoders}
    for name, enc in encoders.items():
        def counted(batch, _enc=enc, _name=name, _real=enc.encode):
            seen[_name].append(len(batch))
            return _real(batch)
        monkeypatch.setattr(enc, "encode", counted)
    return seen


def assert_same_conditioning(new: list, old: list, class_positions: list[int], atol: float) -> None:
    assert len(new) == len(old)
    for (cond, extra), (ref, ref_extra) in zip(new, old):
        assert cond.shape == ref.shape and set(extra) == set(ref_extra)
        torch.testing.assert_close(cond, ref, atol=atol, rtol=atol)
        keep = [i for i in range(cond.shape[1]) if i not in class_positions]
        assert torch.equal(cond[:, keep], ref[:, keep])  # the text tokens: CLIPTextEncode's, bit for bit
        assert torch.equal(extra["pooled_output"], ref_extra["pooled_output"])
        assert {k: v for k, v in extra.items() if k != "pooled_output"} \
            == {k: v for k, v in ref_extra.items() if k != "pooled_output"}


# ---------------------------------------------------------------- SD1.5


@pytest.fixture(scope="module")
def sd15_clip(sd15_parts):
    return sd15_parts[1]


@pytest.fixture(scope="module")
def sd15_apply(pack_nodes, sd15_clip, tmp_path_factory):
    node, pb = pack_nodes["PortraitBoothApplySTEA"], model(tmp_path_factory.mktemp("pb-weighted"))

    def run(text, *faces, start=0.0, end=1.0):
        extra = {f"face_{n}": f for n, f in enumerate(faces[1:], start=2)}
        return node.execute(sd15_clip, pb, faces[0], text, "", 0, 1.0, start, end, **extra).args[0]
    return run


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_one_encode_equals_clip_text_encode_and_the_unit_weight_encode_sd15(sd15_clip, encode_module, prompt):
    tokens = sd15_clip.tokenize(PROMPTS[prompt])
    conds, units = encode_module.encode_weighted_once(sd15_clip, tokens)
    ref, ref_units = two_encodes(sd15_clip, tokens)
    assert len(conds) == len(ref) == len(units) == 1
    assert torch.equal(conds[0][0], ref[0][0]) and torch.equal(conds[0][1]["pooled_output"], ref[0][1]["pooled_output"])
    assert set(conds[0][1]) == set(ref[0][1])
    torch.testing.assert_close(units[0], ref_units[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_weighted_class_word_gives_the_two_encode_conditioning_sd15(sd15_apply, old_way, prompt):
    new = sd15_apply(PROMPTS[prompt], identity(3), start=0.2, end=0.9)
    old_way()
    old = sd15_apply(PROMPTS[prompt], identity(3), start=0.2, end=0.9)
    positions = new[0][1]["portraitbooth"]["class_positions"]
    assert prompt != "long" or positions[0] >= 77
    assert_same_conditioning(new, old, positions, atol=1e-5)


def test_two_weighted_subjects_give_the_two_encode_conditioning_sd15(sd15_apply, old_way):
    text = "a (woman:0.9) and a (man:1.25) at a (cafe:1.1)"
    new = sd15_apply(text, identity(1), identity(2))
    old_way()
    old = sd15_apply(text, identity(1), identity(2))
    assert_same_conditioning(new, old, new[0][1]["portraitbooth"]["class_positions"], atol=1e-5)


def test_a_weighted_class_word_runs_clip_once_like_clip_text_encode_sd15(sd15_clip, sd15_apply, monkeypatch):
    import nodes  # ComfyUI's nodes.py

    csm = sd15_clip.cond_stage_model
    seen = count_forwards(monkeypatch, {"l": getattr(csm, csm.clip)})
    text = PROMPTS["long"]
    nodes.CLIPTextEncode().encode(sd15_clip, text)
    plain = seen["l"][:]
    seen["l"].clear()
    sd15_apply(text, identity(4))
    assert plain == [3]  # two chunks and ComfyUI's empty-prompt chunk, one forward
    assert seen["l"] == plain


# ---------------------------------------------------------------- SDXL (PhotoMaker)


@pytest.fixture(scope="module")
def sdxl_clip(sdxl_parts):
    return sdxl_parts[1]


@pytest.fixture(scope="module")
def sdxl_apply(pack_nodes, sdxl_clip, tmp_path_factory):
    from portraitbooth_core.weights.file import load_portraitbooth
    from test_photomaker_stea import write_head

    root = tmp_path_factory.mktemp("pm-weighted")
    heads = {v: load_portraitbooth(write_head(root / f"pm-{v}.safetensors", v, seed=n))
             for n, v in enumerate(("v1", "v2"))}
    node = pack_nodes["PortraitBoothApplySTEA"]

    def run(text, version, face):
        return node.execute(sdxl_clip, heads[version], face, text, "", 0, 1.0, 0.0, 1.0).result[0]
    return run


@pytest.mark.slow
def test_one_encode_equals_clip_text_encode_and_the_unit_weight_encode_sdxl(sdxl_clip, encode_module):
    tokens = sdxl_clip.tokenize(PROMPTS["long"])
    conds, units = encode_module.encode_weighted_once(sdxl_clip, tokens)
    ref, ref_units = two_encodes(sdxl_clip, tokens)
    assert conds[0][0].shape == ref[0][0].shape == (1, 154, 2048)
    assert torch.equal(conds[0][0], ref[0][0]) and torch.equal(conds[0][1]["pooled_output"], ref[0][1]["pooled_output"])
    torch.testing.assert_close(units[0], ref_units[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("version,prompt", [("v1", "short"), ("v2", "long")])
def test_weighted_class_word_gives_the_two_encode_conditioning_sdxl(sdxl_apply, old_way, version, prompt):
    from test_photomaker_stea import photos

    text = PROMPTS[prompt].replace("(man:1.2)", "(man:1.2) img").replace("(man:1.3)", "(man:1.3) img")
    face = photos(2, 31, version)
    new = sdxl_apply(text, version, face)
    old_way()
    old = sdxl_apply(text, version, face)
    copies = [p for c in new[0][1]["portraitbooth"]["class_copies"] for p in c]
    assert prompt != "long" or min(copies) >= 77
    assert_same_conditioning(new, old, copies, atol=2e-4)


@pytest.mark.slow
def test_a_weighted_class_word_runs_each_sdxl_encoder_once(sdxl_clip, sdxl_apply, monkeypatch):
    from test_photomaker_stea import photos

    csm = sdxl_clip.cond_stage_model
    seen = count_forwards(monkeypatch, {"l": csm.clip_l, "g": csm.clip_g})
    sdxl_apply("a photo of a (man:1.2) img, (smiling:1.1)", "v1", photos(1, 32, "v1"))
    assert seen == {"l": [2], "g": [2]}  # the prompt's chunk and the empty prompt's, one forward each


@pytest.mark.slow
def test_encoders_with_different_weights_fall_back_to_two_encodes(sdxl_clip, encode_module, monkeypatch):
    tokens = sdxl_clip.tokenize("a photo of a (man:1.2)")
    # A weight only one encoder sees: one weight per token cannot serve both.
    tokens["g"] = [[(t[0], 1.0, *t[2:]) for t in chunk] for chunk in tokens["g"]]
    csm = sdxl_clip.cond_stage_model
    seen = count_forwards(monkeypatch, {"l": csm.clip_l, "g": csm.clip_g})
    conds, units = encode_module.encode_weighted_once(sdxl_clip, tokens)
    assert seen == {"l": [2, 1], "g": [1, 1]}
    ref, ref_units = two_encodes(sdxl_clip, tokens)
    assert torch.equal(conds[0][0], ref[0][0]) and torch.equal(units[0], ref_units[0])


def test_scheduled_clip_hooks_keep_one_entry_per_schedule_as_two_encodes_do(sd15_clip, encode_module):
    import comfy.hooks
    from comfy_extras.nodes_hooks import SetClipHooks

    state = sd15_clip.cond_stage_model.state_dict()
    key = next(k for k in state if k.endswith("layers.0.mlp.fc1.weight"))
    hooks = comfy.hooks.create_hook_model_as_lora(
        None, {key: torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0))}, 1.0, 1.0)
    schedule = comfy.hooks.HookKeyframeGroup()
    schedule.add(comfy.hooks.HookKeyframe(1.0, 0.0))
    schedule.add(comfy.hooks.HookKeyframe(0.2, 0.5))
    hooks.set_keyframes_on_hooks(schedule)
    clip = SetClipHooks().apply_hooks(sd15_clip, True, False, hooks)[0]  # CLIP Set Hooks, schedule_clip on
    tokens = clip.tokenize(PROMPTS["long"])
    conds, units = encode_module.encode_weighted_once(clip, tokens)
    ref, ref_units = two_encodes(clip, tokens)
    assert len(conds) == len(ref) == len(units) == 2  # one entry per keyframe range
    assert not torch.equal(conds[0][0], conds[1][0])
    for (cond, extra), (want, want_extra), unit, ref_unit in zip(conds, ref, units, ref_units):
        assert torch.equal(cond, want) and torch.equal(extra["pooled_output"], want_extra["pooled_output"])
        assert {k: v for k, v in extra.items() if k != "pooled_output"} \
            == {k: v for k, v in want_extra.items() if k != "pooled_output"}
        torch.testing.assert_close(unit, ref_unit, atol=1e-5, rtol=1e-5)
