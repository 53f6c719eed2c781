"""The emotion vocabulary of ECAC and where its words sit in a tokenized prompt.

One table for nodes and training: the 11 emotion categories with the synonyms and
inflections people actually write ("smiling", "in tears", ...). Training reads a
caption's expression token with the same function the inference patch uses, so the
attention the loss shaped is the attention the patch later steers.

Matching works on BPE ids through `ClassWordMatcher` (word-start aware, chunk aware),
never on `text.split()`: ComfyUI's word ids count weighted segments, not words.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..stea.class_words import ClassWordMatcher

# category -> words that name it. The category name itself comes first. Words that are
# ambiguous across categories ("tears of joy") are left out rather than guessed.
EMOTIONS: dict[str, tuple[str, ...]] = {
    "happy": ("happy", "happily", "happiness", "smile", "smiles", "smiling", "smiled", "grin", "grins",
              "grinning", "laugh", "laughs", "laughing", "laughed", "joyful", "joy", "cheerful", "glad",
              "delighted", "beaming"),
    "sad": ("sad", "sadly", "sadness", "unhappy", "cry", "cries", "crying", "cried", "tears", "tearful",
            "weep", "weeping", "sobbing", "sorrowful", "upset", "gloomy", "depressed", "melancholic"),
    "angry": ("angry", "angrily", "anger", "mad", "furious", "fury", "rage", "raging", "enraged", "frown",
              "frowns", "frowning", "scowl", "scowling", "annoyed", "irritated", "shouting", "yelling"),
    "surprised": ("surprised", "surprise", "astonished", "amazed", "shocked", "startled", "stunned",
                  "wide-eyed", "gasping"),
    "fearful": ("fearful", "fear", "afraid", "scared", "frightened", "terrified", "horrified", "anxious",
                "nervous", "worried"),
    "disgusted": ("disgusted", "disgust", "grossed out", "repulsed", "revolted", "grimacing", "grimace"),
    "contemptuous": ("contemptuous", "contempt", "scornful", "scorn", "sneer", "sneering", "disdainful",
                     "smirk", "smirking"),
    "neutral": ("neutral", "expressionless", "emotionless", "impassive", "blank expression",
                "straight-faced", "poker face"),
    "excited": ("excited", "excitement", "thrilled", "enthusiastic", "ecstatic", "elated"),
    "calm": ("calm", "calmly", "relaxed", "peaceful", "serene", "tranquil", "composed"),
    "confused": ("confused", "confusion", "puzzled", "perplexed", "bewildered", "baffled"),
}

WORD_TO_EMOTION: dict[str, str] = {w: cat for cat, words in EMOTIONS.items() for w in words}
assert len(WORD_TO_EMOTION) == sum(len(w) for w in EMOTIONS.values()), "a word is listed twice"


def emotion_of(word: str) -> str | None:
    """The emotion category a word names ('Smiling' -> 'happy'), or None."""
    return WORD_TO_EMOTION.get(word.strip().lower())


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
                           special: Iterable[int] = ()) -> list[TokenMatch]:
    """The expression words of a prompt (any word of EMOTIONS), in prompt order."""
    return find_word_tokens(chunks, WORD_TO_EMOTION, ids_of, ends_word, special)
