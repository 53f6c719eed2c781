"""Apply STEA Conditioning on the real SD1.5 tokenizer (random CLIP-L weights).

The contract: the output equals CLIPTextEncode's bit for bit except at the class word's
position(s); the pooled output never changes.
"""
from __future__ import annotations

import pytest
import torch

from stea_fixtures import identity, model
from portraitbooth_core.stea.class_words import ClassWordError
from portraitbooth_core.stea.projector import splice_identity
from portraitbooth_core.weights.meta import EmbeddingMismatchError


@pytest.fixture(scope="module")
def clip(sd15_parts):
    return sd15_parts[1]


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    return model(tmp_path_factory.mktemp("pb"))


@pytest.fixture(scope="module")
def apply(pack_nodes, clip, pb):
    node = pack_nodes["PortraitBoothApplySTEA"]

    def run(text, *faces, class_word="", occurrence=0, strength=1.0, start=0.0, end=1.0):
        extra = {f"face_{n}": f for n, f in enumerate(faces[1:], start=2)}
        return node.execute(clip, pb, faces[0], text, class_word, occurrence, strength, start, end,
                            **extra).args[0]
    return run


def text_encode(clip, text):
    import nodes  # ComfyUI's nodes.py: the reference is the real CLIPTextEncode

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def changed_positions(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    assert a.shape == b.shape
    return (a != b).any(dim=-1)[0].nonzero().flatten().tolist()


def position_of(clip, text, piece="man</w>", nth=0) -> int:
    """Flat position of a BPE piece, found independently of the code under test."""
    chunks = clip.tokenize(text)["l"]
    found = [c * len(chunk) + i for c, chunk in enumerate(chunks) for i, (t, _) in enumerate(chunk)
             if clip.tokenizer.untokenize([(t, 1.0)])[0][1] == piece]
    return found[nth]


def test_only_the_class_word_changes_and_pooled_stays(clip, apply):
    text = "a photo of a man sitting on a bench, golden hour"
    ref, out = text_encode(clip, text), apply(text, identity(1))
    assert changed_positions(ref[0][0], out[0][0]) == [position_of(clip, text)]
    assert torch.equal(ref[0][1]["pooled_output"], out[0][1]["pooled_output"])
    # one key more: where the identity sits, for ECAC and the region sampler
    assert set(out[0][1]) == set(ref[0][1]) | {"portraitbooth"}
    assert out[0][1]["portraitbooth"] == {"class_positions": [position_of(clip, text)], "base": "sd15"}


def test_different_faces_give_different_conditioning_same_face_the_same(clip, apply):
    text = "portrait of a woman"
    a1, a2, b = apply(text, identity(1)), apply(text, identity(1)), apply(text, identity(2))
    assert torch.equal(a1[0][0], a2[0][0])
    assert changed_positions(a1[0][0], b[0][0]) == [position_of(clip, text, "woman</w>")]


def test_class_word_is_matched_by_whole_bpe_word(clip, apply):
    # None of these is the word "man": "woman" and "mankind" are single other pieces,
    # "zorgman" ends in the piece man</w> (z + org + man</w>) and "manlike" starts with
    # the piece "man" (no </w>): the word-start and word-end rules must both hold.
    text = "a woman reading about zorgman, manlike robots and mankind"
    with pytest.raises(ClassWordError, match="no class word.*man"):
        apply(text, identity(1), class_word="man")
    out = apply(text, identity(1))  # any accepted word: only "woman" qualifies
    assert changed_positions(text_encode(clip, text)[0][0], out[0][0]) == [position_of(clip, text, "woman</w>")]


def test_long_prompt_class_word_in_second_chunk(clip, apply):
    text = ", ".join(["highly detailed"] * 30) + ", a photo of a man"
    ref, out = text_encode(clip, text), apply(text, identity(3))
    assert ref[0][0].shape[1] >= 154
    pos = position_of(clip, text)
    assert pos >= 77
    assert changed_positions(ref[0][0], out[0][0]) == [pos]
    assert torch.equal(ref[0][1]["pooled_output"], out[0][1]["pooled_output"])


def test_weighted_class_word_scales_the_identity_like_any_token(clip, apply):
    plain, weighted = "a photo of a man in a park", "a photo of a (man:1.3) in a park"
    ref_p, out_p = text_encode(clip, plain)[0][0], apply(plain, identity(4))[0][0]
    ref_w, out_w = text_encode(clip, weighted)[0][0], apply(weighted, identity(4))[0][0]
    pos = position_of(clip, weighted)
    assert changed_positions(ref_w, out_w) == [pos]
    # ComfyUI weights every token affinely around the empty prompt: the identity's
    # offset from the text embedding scales by the same 1.3.
    torch.testing.assert_close(out_w[0, pos] - ref_w[0, pos], 1.3 * (out_p[0, pos] - ref_p[0, pos]),
                               atol=1e-4, rtol=1e-4)


def test_two_subjects_are_mapped_in_prompt_order(clip, apply):
    text = "a man and a woman at a cafe"
    man, woman = position_of(clip, text), position_of(clip, text, "woman</w>")
    ab = apply(text, identity(1), identity(2))[0][0]
    ac = apply(text, identity(1), identity(3))[0][0]
    assert changed_positions(text_encode(clip, text)[0][0], ab) == sorted([man, woman])
    assert torch.equal(ab[0, man], ac[0, man]) and not torch.equal(ab[0, woman], ac[0, woman])
    as_list = apply(text, [identity(1), identity(2)])[0][0]  # one socket carrying two identities
    assert torch.equal(as_list, ab)


def test_chosen_occurrence(clip, apply):
    text = "a man talking to another man"
    out = apply(text, identity(1), class_word="man", occurrence=2)
    assert changed_positions(text_encode(clip, text)[0][0], out[0][0]) == [position_of(clip, text, nth=1)]
    with pytest.raises(ClassWordError, match="occurrence 3.*only 2"):
        apply(text, identity(1), occurrence=3)


def test_errors_name_the_accepted_words_and_the_counts(apply):
    with pytest.raises(ClassWordError, match="man, woman, boy, girl, person"):
        apply("a castle on a hill", identity(1))
    with pytest.raises(ClassWordError, match="2 faces.*only 1 class-word"):
        apply("a photo of a man", identity(1), identity(2))
    with pytest.raises(ClassWordError, match="not among the words"):
        apply("a photo of a man", identity(1), class_word="wizard")


def test_strength_zero_equals_plain_text_encoding(clip, apply):
    text = "a (man:1.1) on the moon, " + ", ".join(["ultra detailed"] * 30)
    ref, out = text_encode(clip, text), apply(text, identity(5), strength=0.0)
    assert torch.equal(ref[0][0], out[0][0])
    assert torch.equal(ref[0][1]["pooled_output"], out[0][1]["pooled_output"])


def test_strength_blends_linearly(clip, apply):
    text = "a photo of a girl"
    ref = text_encode(clip, text)[0][0]
    full, half = apply(text, identity(6))[0][0], apply(text, identity(6), strength=0.5)[0][0]
    torch.testing.assert_close(half, ref + 0.5 * (full - ref), atol=1e-5, rtol=1e-5)


def test_delayed_identity_uses_text_outside_the_range(clip, apply):
    text = "a photo of a man"
    ref = text_encode(clip, text)[0][0]
    out = apply(text, identity(1), start=0.3, end=0.8)
    ranges = [(e[1]["start_percent"], e[1]["end_percent"]) for e in out]
    assert ranges == [(0.3, 0.8), (0.0, 0.3), (0.8, 1.0)]
    assert changed_positions(ref, out[0][0]) == [position_of(clip, text)]
    assert torch.equal(out[1][0], ref) and torch.equal(out[2][0], ref)
    assert [(e[1]["start_percent"], e[1]["end_percent"]) for e in apply(text, identity(1), start=0.5)] \
        == [(0.5, 1.0), (0.0, 0.5)]
    with pytest.raises(ValueError, match="start_percent < end_percent"):
        apply(text, identity(1), start=0.6, end=0.4)


def test_face_from_another_recognizer_is_refused(apply):
    with pytest.raises(EmbeddingMismatchError, match="expects 512-d.*gives 128-d"):
        apply("a photo of a man", identity(1, dim=128, kind="dlib:resnet128"))


def test_batched_conditioning_takes_each_items_own_faces(pb):
    cond = torch.randn(2, 77, 768)
    faces = torch.stack([identity(1).vector, identity(2).vector])[:, None]  # [B=2, S=1, D]
    both = splice_identity(cond, [5], faces, pb.projector)
    for b in range(2):
        one = splice_identity(cond[b:b + 1], [5], faces[b], pb.projector)
        torch.testing.assert_close(both[b:b + 1], one)
    assert torch.equal(both[:, :5], cond[:, :5]) and torch.equal(both[:, 6:], cond[:, 6:])
