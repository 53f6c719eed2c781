"""The emotion vocabulary and token finding, on ComfyUI's real CLIP-L tokenizer."""
from __future__ import annotations

import importlib

import pytest

from conftest import load_pack
from portraitbooth_core.ecac.expression_words import find_expression_tokens, find_word_tokens
from portraitbooth_core.vocabulary import EMOTIONS, emotion_of


class TokenizerOnlyClip:
    """The part of comfy.sd.CLIP the nodes use, with ComfyUI's SD1.5 tokenizer (no weights)."""

    def __init__(self):
        import comfy.sd1_clip

        self.tokenizer = comfy.sd1_clip.SD1Tokenizer()

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)


@pytest.fixture(scope="module")
def clip():
    return TokenizerOnlyClip()


@pytest.fixture(scope="module")
def ecac():
    load_pack()
    return importlib.import_module("portraitbooth_pack_under_test.nodes.ecac")


def word_at(clip, text, position):
    chunks = clip.tokenize(text)["l"]
    token = chunks[position // 77][position % 77][0]
    return clip.tokenizer.untokenize([(token, 1.0)])[0][1].replace("</w>", "")


def test_table_has_the_eleven_categories_and_inflections():
    assert len(EMOTIONS) == 11
    assert all(words[0] == name for name, words in EMOTIONS.items())
    assert emotion_of("Smiling") == "happy" and emotion_of("crying") == "sad" and emotion_of("frowning") == "angry"
    assert emotion_of("table") is None


def test_finds_identity_and_expression_words(clip, ecac):
    text = "a (photo:1.2) of a Smiling woman, crying, next to a superman poster"
    identity, expression = ecac.prompt_positions(clip, text, ["man", "woman"])
    assert [(h.word, word_at(clip, text, h.position)) for h in identity] == [("woman", "woman")]
    assert [(h.word, h.emotion) for h in expression] == [("smiling", "happy"), ("crying", "sad")]
    assert [word_at(clip, text, h.position) for h in expression] == ["smiling", "crying"]


def test_positions_in_later_chunks_count_77_per_chunk(clip, ecac):
    text = "portrait, " * 40 + "an angry man"
    identity, expression = ecac.prompt_positions(clip, text, ["man"])
    assert len(clip.tokenize(text)["l"]) == 2
    assert expression[0].position > 77 and word_at(clip, text, expression[0].position) == "angry"
    assert identity[0].position == expression[0].position + 1


def test_works_on_plain_ids_with_any_tokenizer():
    vocab = {"un": 7, "happy": 8, "woman": 9}
    ids_of = lambda word: [vocab[p] for p in ("un", "happy") ] if word == "unhappy" else (  # noqa: E731
        [vocab[word]] if word in vocab else [99])
    chunks = [[0, 9, 7, 8, 1], [0, 8, 1]]
    hits = find_expression_tokens(chunks, ids_of, special=(0, 1))
    # "unhappy" (sad) claims its pieces before "happy" can; chunk 2 starts at offset 5
    assert [(h.word, h.emotion, h.position) for h in hits] == [("unhappy", "sad", 3), ("happy", "happy", 6)]
    assert [h.position for h in find_word_tokens(chunks, ["woman"], ids_of)] == [1]
