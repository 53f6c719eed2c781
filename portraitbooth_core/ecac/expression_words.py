"""Where ECAC's expression words (and any other words) sit in a tokenized prompt.

The words themselves (11 emotion categories with the synonyms and inflections people
actually write) are in `portraitbooth_core.vocabulary`. Training reads a caption's
expression token with the same function the inference patch uses, so the attention the
loss shaped is the attention the patch later steers.

Matching works on BPE ids through `ClassWordMatcher` (word-start aware, chunk aware),
never on `text.split()`: ComfyUI's word ids count weighted segments, not words.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..stea.class_words import ClassWordMatcher
from ..vocabulary import emotion_of, expression_words


@dataclass(frozen=True)
class TokenMatch:
    """One occurrence of a word: `position` indexes the concatenated conditioning
    (chunk * 77 + index for ComfyUI's chunks); `emotion` is its category, if any."""
    word: str
    position: int
    emotion: str | None = None


def _as_entries(chunks: Sequence[Sequence]) -> list[list[tuple]]:
    # Accept plain ids per chunk as well as ComfyUI's (token, weight[, word_id]) tuples.
    return [[(t, 1.0) if isinstance(t, numbers.Integral) else tuple(t) for t in chunk] for chunk in chunks]


def find_word_tokens(chunks: Sequence[Sequence], words: Iterable[str], ids_of: Callable[[str], Sequence[int]],
                     ends_word: Callable[[int], bool] | None = None,
                     special: Iterable[int] = ()) -> list[TokenMatch]:
    """Every occurrence of `words` in token chunks, in prompt order.

    ids_of(word) -> the word's BPE ids (no start/end/pad). ends_word(id) tells whether a
    piece ends a word; without it a match may start inside a word (tokenizers that do not
    mark word ends). special: start/end/pad ids to skip.
    """
    words = [w for w in dict.fromkeys(w.strip().lower() for w in words) if w]
    if not words:
        return []
    matcher = ClassWordMatcher(words, lambda w: list(ids_of(w)), ends_word or (lambda _t: True), special)
    return matches(matcher, chunks)


def matches(matcher: ClassWordMatcher, chunks: Sequence[Sequence]) -> list[TokenMatch]:
    """`find_word_tokens` with a ready matcher (e.g. `TokenizerWords.matcher`, cached per
    word list, so a node does not re-tokenize a vocabulary of ~170 words per run)."""
    hits = matcher.find(_as_entries(chunks))
    # A word found inside a longer one ("happy" in "un"+"happy") is dropped: without
    # word-end marks the matcher cannot tell on its own.
    claimed: set[int] = set()
    kept = []
    for h in sorted(hits, key=lambda h: -len(matcher.word_ids[h.word])):
        if h.position not in claimed:
            claimed.update(range(h.position - len(matcher.word_ids[h.word]) + 1, h.position + 1))
            kept.append(h)
    return [TokenMatch(h.word, h.position, emotion_of(h.word)) for h in sorted(kept, key=lambda h: h.position)]


def find_expression_tokens(chunks: Sequence[Sequence], ids_of: Callable[[str], Sequence[int]],
                           ends_word: Callable[[int], bool] | None = None,
                           special: Iterable[int] = (), emotion_words: Iterable[str] | None = None
                           ) -> list[TokenMatch]:
    """The expression words of a prompt, in prompt order. emotion_words: a model's list
    (category names stand for all their words, see `vocabulary.expression_words`);
    None: every word of the vocabulary."""
    return find_word_tokens(chunks, expression_words(emotion_words), ids_of, ends_word, special)
