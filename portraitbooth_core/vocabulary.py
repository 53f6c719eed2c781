"""The words PortraitBooth knows: class words (who the identity attaches to) with their
synonyms, and the 11 ECAC emotions with the words that name them.

One table for Apply STEA, ECAC, training captions, export and the README (a test checks
the README's tables against this module). Token finding lives elsewhere
(`stea.class_words`, `ecac.expression_words`); this module holds only words.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

# Canonical class word -> the words captions use for it, canonical first. Training
# rewrites a caption's subject word to the canonical one (the model learns one token per
# class) and records which synonyms it saw; export lists those so the model accepts them.
CLASS_WORDS: dict[str, tuple[str, ...]] = {
    "man": ("man", "guy", "gentleman", "male", "boy", "dude"),
    "woman": ("woman", "lady", "female", "girl", "gal"),
}

# What a PortraitBooth file accepts when it lists no class words of its own (and what the
# ECAC node looks for in a plain prompt): the canonical words and the common synonyms.
DEFAULT_CLASS_WORDS: tuple[str, ...] = ("man", "woman", "boy", "girl", "person", "child", "lady", "guy")

# Emotion category -> words that name it. The category name itself comes first. Words
# that are ambiguous across categories ("tears of joy") are left out rather than guessed.
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

# What a PortraitBooth file lists when nothing else is given: every category.
DEFAULT_EMOTION_WORDS: tuple[str, ...] = tuple(EMOTIONS)

WORD_TO_EMOTION: dict[str, str] = {w: cat for cat, words in EMOTIONS.items() for w in words}
SYNONYM_TO_CLASS: dict[str, str] = {w: cls for cls, words in CLASS_WORDS.items() for w in words}
# Import-time checks: a word in two entries would make its meaning depend on dict order.
assert len(WORD_TO_EMOTION) == sum(len(w) for w in EMOTIONS.values()), "an emotion word is listed twice"
assert len(SYNONYM_TO_CLASS) == sum(len(w) for w in CLASS_WORDS.values()), "a class word is listed twice"
assert all(words[0] == name for name, words in (*EMOTIONS.items(), *CLASS_WORDS.items()))


def emotion_of(word: str) -> str | None:
    """The emotion category a word names ('Smiling' -> 'happy'), or None."""
    return WORD_TO_EMOTION.get(word.strip().lower())


def class_of(word: str, synonyms: Mapping[str, Sequence[str]] = CLASS_WORDS) -> str | None:
    """The canonical class word a word stands for ('Lady' -> 'woman'), or None."""
    word = word.strip().lower()
    return next((cls for cls, words in synonyms.items() if word == cls or word in words), None)


def expression_words(emotion_words: Iterable[str] | None = None) -> tuple[str, ...]:
    """The words to look for in a prompt, given a model's `emotion_words` list.

    A category name ("happy") stands for every word of that category; any other entry
    ("pensive") is taken as a single word. None or an empty list means the whole table.
    """
    names = [w.strip().lower() for w in (emotion_words or ()) if w.strip()]
    if not names:
        return tuple(WORD_TO_EMOTION)
    out: dict[str, None] = {}
    for name in names:
        out.update(dict.fromkeys(EMOTIONS.get(name, (name,))))
    return tuple(out)


def accepted_class_words(class_words: Sequence[str], synonyms: Mapping[str, Sequence[str]] | None = None
                         ) -> tuple[str, ...]:
    """A model's class words followed by the synonyms it records for them (no repeats)."""
    words = [w.strip().lower() for w in class_words if w.strip()]
    for cls in class_words:
        words += [w.strip().lower() for w in (synonyms or {}).get(cls, ()) if w.strip()]
    return tuple(dict.fromkeys(words))


# Below this estimated age a face is named with the young word of its class ("boy", "girl")
# when the synonym table has one; the canonical word stays what the model learns.
ADULT_AGE = 18.0
_MALE = {"m", "male", "man", "boy", "1"}
_FEMALE = {"f", "female", "woman", "girl", "0"}


def class_word_for(gender: str | int | None, age: float | None, default: str = "person",
                   synonyms: Mapping[str, Sequence[str]] = CLASS_WORDS) -> str:
    """The word naming a face's subject in a caption that has none, from a face model's
    gender/age estimate (insightface's genderage: gender 1 = male, 0 = female, or "M"/"F").

    A child is "boy"/"girl" when `synonyms` lists that word (it normalizes to its class word
    and is recorded as a synonym the model accepts), an adult "man"/"woman" when listed.
    Without a gender, or when the table has none of these words: `default`.
    """
    if gender is None or isinstance(gender, bool):
        return default
    key = str(int(gender)) if isinstance(gender, (int, float)) else str(gender).strip().lower()
    young = age is not None and float(age) < ADULT_AGE
    if key in _MALE:
        candidates = ("boy", "man") if young else ("man",)
    elif key in _FEMALE:
        candidates = ("girl", "woman") if young else ("woman",)
    else:
        return default
    known = {w.strip().lower() for cls, words in synonyms.items() for w in (cls, *words)}
    return next((w for w in candidates if w in known), default)
