"""Captions of training samples: where they come from, the class word normalized to one of
the configured identity words (synonyms from `portraitbooth_core.vocabulary`; the word as
written is kept too, so export can list it), and the token positions of identity and
expression words.

Positions are found on BPE ids with the core's matcher (the same code the nodes use),
under SD1.5's CLIP tokenizer from ComfyUI, and only in the first 77-token chunk: the
trainer encodes that chunk.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from portraitbooth_core.stea.class_words import TokenizerWords
from portraitbooth_core.ecac.expression_words import find_expression_tokens, find_word_tokens
from portraitbooth_core.vocabulary import CLASS_WORDS

CLIP_KEY = "l"
CHUNK = 77


class CaptionError(ValueError):
    """A caption that cannot train the identity token; the message is the skip reason."""


def read_caption(image: Path) -> str | None:
    """The sidecar caption of an image: <stem>.txt, or <stem>.json with a "caption" key."""
    txt, js = image.with_suffix(".txt"), image.with_suffix(".json")
    if txt.is_file():
        return txt.read_text(encoding="utf-8").strip() or None
    if js.is_file():
        data = json.loads(js.read_text(encoding="utf-8"))
        caption = data.get("caption") if isinstance(data, dict) else None
        return str(caption).strip() if caption else None
    return None


def normalize_class_word(caption: str, synonyms: Mapping[str, Sequence[str]] = CLASS_WORDS
                         ) -> tuple[str, str, str]:
    """(caption with its first subject word replaced by the identity word, that identity
    word, the subject word as written, lower-cased: "Lady" -> "lady").

    Only whole words count ("woman" is never read as "man"); the first one in the caption
    is the subject. Raises CaptionError when there is none.
    """
    table = {syn.lower(): word for word, syns in synonyms.items() for syn in (word, *syns)}
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, table), key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)
    found = pattern.search(caption)
    if found is None:
        raise CaptionError(f"no class word in caption (expected one of: {', '.join(sorted(table))})")
    written = found.group(1).lower()
    word = table[written]
    return caption[:found.start()] + word + caption[found.end():], word, written


class TokenFinder(TokenizerWords):
    """Identity/expression positions of a caption under a ComfyUI SD1.5 tokenizer."""

    def __init__(self, tokenizer=None):
        if tokenizer is None:
            import comfy.sd1_clip

            tokenizer = comfy.sd1_clip.SD1Tokenizer()
        self._own_tokenizer = tokenizer  # TokenizerWords keeps only a weak reference
        super().__init__(tokenizer, CLIP_KEY)

    def positions(self, caption: str, identity_word: str) -> tuple[list[int], list[str], list[int]]:
        """(identity positions, expression words, expression positions) in the first chunk."""
        chunks = self.tokenize(caption, disable_weights=True)[:1]
        ident = [m.position for m in find_word_tokens(chunks, [identity_word], self.ids_of, self.ends_word,
                                                      self.special) if m.position < CHUNK]
        if not ident:
            raise CaptionError(f"class word '{identity_word}' is not within the first {CHUNK - 2} tokens "
                               f"of the caption")
        expr = [m for m in find_expression_tokens(chunks, self.ids_of, self.ends_word, self.special)
                if m.position < CHUNK]
        return ident[:1], [m.word for m in expr], [m.position for m in expr]


@dataclass(frozen=True)
class CaptionInfo:
    caption: str
    identity_word: str
    identity_positions: list[int]
    expression_words: list[str]
    expression_positions: list[int]
    subject_word: str = ""  # the caption's own word for the subject before normalizing ("boy")


def caption_info(raw: str | None, finder: TokenFinder, template: str = "", default_word: str = "",
                 synonyms: Mapping[str, Sequence[str]] = CLASS_WORDS) -> CaptionInfo:
    """Everything the trainer needs from one caption; raises CaptionError to skip it."""
    if not raw:
        if not template:
            raise CaptionError("no caption sidecar (.txt/.json) and no caption template")
        if "{word}" in template and not default_word:
            raise CaptionError("no caption sidecar and no class word for the template (set default_word "
                               "or a class.txt in the person's folder)")
        raw = template.format(word=default_word)
    caption, word, written = normalize_class_word(raw, synonyms)
    ident, expr_words, expr_pos = finder.positions(caption, word)
    return CaptionInfo(caption, word, ident, expr_words, expr_pos, written)
