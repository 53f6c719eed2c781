"""PhotoMaker's stacked class tokens on ComfyUI's real SDXL tokenizer (no weights needed):
copies per photo, the `img` trigger dropped, both encoders' streams agreeing, long prompts
re-flowed into the next 77-token chunk, weights carried by the copies."""
from __future__ import annotations

import pytest

from portraitbooth_core.stea.class_words import ClassWordError, tokenizer_words
from portraitbooth_core.stea.stacked_prompt import StackSite, stack_class_tokens, trigger_after

IMG = 24157  # "img</w>" in CLIP's BPE vocabulary
MAN = 786    # "man</w>"


@pytest.fixture(scope="module")
def tokenizer():
    import comfy.sdxl_clip

    return comfy.sdxl_clip.SDXLTokenizer()


def specials(tokenizer, key):
    return tokenizer_words(tokenizer, key).start_end_pad


def content(chunk, end=49407):
    ids = [t[0] for t in chunk]
    return ids[1:ids.index(end, 1)]


def stack(tokenizer, text, copies, key="l", words=("man", "woman")):
    tokens = tokenizer.tokenize_with_weights(text)
    lookup = tokenizer_words(tokenizer, key)
    hits = lookup.matcher(words).find(tokens[key])
    trigger = lookup.ids_of("img")
    sites = [StackSite(h.chunk, h.index, c, trigger_after(tokens[key], h, trigger, 49407))
             for h, c in zip(hits, copies)]
    return tokens[key], stack_class_tokens(tokens[key], sites, *specials(tokenizer, key))


def test_the_trigger_is_dropped_and_the_class_token_repeated_per_identity_token(tokenizer):
    before, (after, positions) = stack(tokenizer, "a photo of a man img, smiling", [4])
    assert content(before[0])[:6] == [320, 1125, 539, 320, MAN, IMG]
    assert content(after[0])[:8] == [320, 1125, 539, 320, MAN, MAN, MAN, MAN]
    assert IMG not in content(after[0])
    assert positions == [[5, 6, 7, 8]]
    assert content(after[0])[8:] == content(before[0])[6:]  # the rest follows unchanged


def test_the_class_word_alone_works_without_the_trigger(tokenizer):
    _, (after, positions) = stack(tokenizer, "a man reading", [2])
    before = content(tokenizer.tokenize_with_weights("a man reading")["l"][0])
    assert content(after[0]) == [320, MAN, MAN, before[-1]]  # "reading" keeps its place after the copies
    assert positions == [[2, 3]]


def test_both_encoders_streams_stack_to_the_same_positions(tokenizer):
    text = "a woman img and a man img at the beach, (smiling:1.2)"
    (_, (l_chunks, l_pos)), (_, (g_chunks, g_pos)) = (stack(tokenizer, text, [2, 4], key=k) for k in ("l", "g"))
    assert l_pos == g_pos == [[2, 3], [6, 7, 8, 9]]  # a woman woman and a man x4
    assert content(l_chunks[0]) == content(g_chunks[0])
    # each stream keeps its own padding: CLIP-L pads with the end token, bigG with 0
    assert l_chunks[0][-1][0] == 49407 and g_chunks[0][-1][0] == 0


def test_copies_carry_the_class_words_weight(tokenizer):
    _, (after, positions) = stack(tokenizer, "a photo of a (man:1.3) img", [3])
    assert [after[0][p][1] for p in positions[0]] == [1.3, 1.3, 1.3]
    assert after[0][1][1] == 1.0


def test_an_overflowing_chunk_pushes_its_tail_into_a_new_chunk(tokenizer):
    words = " ".join(["red"] * 70)
    before, (after, positions) = stack(tokenizer, f"{words} a man img", [8])
    assert len(before) == 1 and len(content(before[0])) == 73
    assert len(after) == 2 and all(len(c) == 77 for c in after)
    flat = content(after[0]) + content(after[1])
    assert flat == content(before[0])[:-1] + [MAN] * 7  # "img" gone, "man" x 8 in all
    assert len(content(after[0])) == 75
    assert positions == [[72, 73, 74, 75, 78, 79, 80, 81]]  # chunk 1's tokens start at 77 + 1
    assert [after[p // 77][p % 77][0] for p in positions[0]] == [MAN] * 8


def test_an_overflow_into_an_existing_chunk_keeps_every_later_token_in_order(tokenizer):
    text = " ".join(["red"] * 74) + " man img " + " ".join(["blue"] * 10)
    before, (after, positions) = stack(tokenizer, text, [3])
    flat_before = [t for c in before for t in content(c)]
    flat_after = [t for c in after for t in content(c)]
    i = flat_before.index(MAN)
    assert flat_after == flat_before[:i] + [MAN] * 3 + flat_before[i + 2:]
    assert [after[p // 77][p % 77][0] for p in positions[0]] == [MAN] * 3


def test_two_subjects_on_one_word_or_outside_the_prompt_are_refused(tokenizer):
    tokens = tokenizer.tokenize_with_weights("a man")["l"]
    with pytest.raises(ClassWordError, match="same class word"):
        stack_class_tokens(tokens, [StackSite(0, 2, 1), StackSite(0, 2, 2)], *specials(tokenizer, "l"))
    with pytest.raises(ClassWordError, match="outside the prompt"):
        stack_class_tokens(tokens, [StackSite(3, 2, 1)], *specials(tokenizer, "l"))
