"""Where the class words ("man", "woman", ...) sit in a tokenized prompt.

Matching works on BPE token ids, never on `text.split(" ")`: ComfyUI's word ids count
weighted segments, punctuation sticks to words, and long prompts come in chunks of 77.
CLIP's BPE marks the last piece of every pre-token word with "</w>", so a class word
matches only where a word starts (the previous piece ended a word) and its own pieces,
tokenized alone, appear in order: "man" -> [man</w>] never matches "woman</w>",
"mankind</w>" or the tail of "super" + "man</w>".

The identity goes to the *last* piece of a multi-piece class word: CLIP's text encoder
is causal, so that position is the only one that has seen the whole word.
The words themselves are in `portraitbooth_core.vocabulary`.
"""
from __future__ import annotations

import numbers
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

class ClassWordError(ValueError):
    """The prompt cannot carry the requested identities."""


@dataclass(frozen=True)
class ClassHit:
    word: str
    chunk: int      # which 77-token chunk
    index: int      # position of the word's last BPE piece inside the chunk
    position: int   # flat position in the concatenated conditioning
    weight: float   # ComfyUI prompt weight of that piece


class ClassWordMatcher:
    """Finds accepted class words in token chunks of one tokenizer.

    tokenize_word(word) -> the word's BPE ids without start/end/padding;
    ends_word(id) -> whether that piece ends a word ("</w>" in CLIP's vocabulary);
    special: start/end/pad ids, skipped (chunk borders do not split words).
    """

    def __init__(self, words: Iterable[str], tokenize_word: Callable[[str], list[int]],
                 ends_word: Callable[[int], bool], special: Iterable[int]):
        self.words = tuple(dict.fromkeys(w.strip().lower() for w in words if w.strip()))
        if not self.words:
            raise ValueError("no class words given")
        self.word_ids = {w: tuple(tokenize_word(w)) for w in self.words}
        for word, ids in self.word_ids.items():
            if not ids:
                raise ValueError(f"class word {word!r} tokenizes to nothing")
        self.ends_word = ends_word
        self.special = frozenset(special)

    def find(self, chunks: Sequence[Sequence[tuple]]) -> list[ClassHit]:
        """Every class-word occurrence in prompt order. chunks: ComfyUI's per-chunk lists
        of (token, weight[, word_id]); non-integer tokens (embeddings) end a word."""
        stream: list[tuple[int | None, int, int, float]] = []  # (id or None, chunk, index, weight)
        offsets, offset = [], 0
        for c, chunk in enumerate(chunks):
            offsets.append(offset)
            offset += len(chunk)
            for i, entry in enumerate(chunk):
                token, weight = entry[0], float(entry[1])
                if isinstance(token, numbers.Integral):  # the test ComfyUI itself uses
                    if int(token) in self.special:
                        continue
                    stream.append((int(token), c, i, weight))
                else:
                    stream.append((None, c, i, weight))
        ids = [s[0] for s in stream]
        # Longest words first, so "woman" would win over a hypothetical shorter prefix.
        by_length = sorted(self.word_ids.items(), key=lambda kv: -len(kv[1]))
        hits = []
        for j, token in enumerate(ids):
            if token is None:
                continue
            prev = ids[j - 1] if j else None
            if j and prev is not None and not self.ends_word(prev):
                continue  # inside a word
            for word, pieces in by_length:
                if tuple(ids[j:j + len(pieces)]) == pieces:
                    _, c, i, weight = stream[j + len(pieces) - 1]
                    hits.append(ClassHit(word, c, i, offsets[c] + i, weight))
                    break
        return hits


def parse_words(text: str) -> list[str]:
    """'man, woman' -> ['man', 'woman'] (for a node's class-word input)."""
    return [w.strip().lower() for w in text.replace(";", ",").split(",") if w.strip()]


def select_subjects(hits: Sequence[ClassHit], subjects: int, accepted: Sequence[str],
                    words: Sequence[str] = (), occurrence: int = 0) -> list[ClassHit]:
    """The class-word hits that receive the `subjects` faces, in prompt order.

    words: restrict to these class words (empty: any accepted word).
    occurrence: 0 = from the first hit; k >= 1 = start at the k-th hit (of `words`), so
    one subject goes to "the second man", two subjects to the 2nd and 3rd hits.
    """
    unknown = [w for w in words if w not in accepted]
    if unknown:
        raise ClassWordError(f"class word(s) {', '.join(map(repr, unknown))} are not among the words this "
                             f"PortraitBooth model was trained with: {', '.join(accepted)}.")
    pool = [h for h in hits if not words or h.word in words]
    allowed = ", ".join(words or accepted)
    if not pool:
        raise ClassWordError(
            f"The prompt has no class word for the identity to attach to. Use one of: {allowed} "
            f"(e.g. 'a photo of a {(words or accepted)[0]} at the beach').")
    if occurrence < 0:
        raise ClassWordError(f"occurrence must be 0 (first) or a 1-based count, got {occurrence}")
    start = max(occurrence - 1, 0)
    if start >= len(pool):
        raise ClassWordError(f"occurrence {occurrence} asked for, but the prompt has only {len(pool)} "
                             f"class word(s) ({allowed}).")
    chosen = list(pool[start:start + subjects])
    if len(chosen) < subjects:
        found = ", ".join(f"'{h.word}'" for h in pool[start:]) or "none"
        raise ClassWordError(
            f"{subjects} faces were given but the prompt has only {len(chosen)} class-word occurrence(s) "
            f"from occurrence {max(occurrence, 1)} on ({found}). Write one class word per subject, "
            f"e.g. 'a man and a woman', faces are mapped in prompt order.")
    return chosen


class TokenizerWords:
    """Word lookups on a ComfyUI-style SD1.5 tokenizer, shared by nodes and training.

    Duck-typed so the core needs no ComfyUI: `tokenizer.tokenize_with_weights(text,
    disable_weights=...)` returns {key: chunks} and `tokenizer.untokenize([(id, w)])`
    returns [((id, w), piece)]. Only a weak reference is kept, so a cache of these
    never keeps a CLIP's tokenizer alive; the caller holds the tokenizer.
    """

    def __init__(self, tokenizer, key: str = "l"):
        self._tokenizer = weakref.ref(tokenizer)
        self.key = key
        empty = [int(t[0]) for t in self.tokenize("")[0]]  # "" tokenizes to [start, end, pad...]
        self.special = frozenset(empty)
        self.start_end_pad: tuple[int, ...] = tuple(empty[:3])
        self._pieces: dict[int, str] = {}
        self._matchers: dict[tuple[str, ...], ClassWordMatcher] = {}

    @property
    def tokenizer(self):
        tokenizer = self._tokenizer()
        if tokenizer is None:
            raise RuntimeError("the tokenizer behind this word lookup no longer exists")
        return tokenizer

    def tokenize(self, text: str, **kwargs) -> list[list[tuple]]:
        return self.tokenizer.tokenize_with_weights(text, **kwargs)[self.key]

    def ids_of(self, word: str) -> list[int]:
        return [int(t[0]) for chunk in self.tokenize(word, disable_weights=True) for t in chunk
                if int(t[0]) not in self.special]

    def ends_word(self, token: int) -> bool:
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.untokenize([(token, 1.0)])[0][1]
        return self._pieces[token].endswith("</w>")

    def matcher(self, words: Sequence[str]) -> ClassWordMatcher:
        """A cached matcher for `words`: building one tokenizes every word."""
        key = tuple(words)
        if key not in self._matchers:
            self._matchers[key] = ClassWordMatcher(words, self.ids_of, self.ends_word, self.special)
        return self._matchers[key]


_words_of: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_words(tokenizer, key: str = "l") -> TokenizerWords:
    """The (cached) TokenizerWords of one encoder key of a tokenizer (SDXL's has "l" and
    "g"); CLIP clones share their tokenizer."""
    per_key = _words_of.setdefault(tokenizer, {})
    if key not in per_key:
        per_key[key] = TokenizerWords(tokenizer, key)
    return per_key[key]
