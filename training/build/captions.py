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

from portraitbooth_core.bounded_json import read_json_file
from portraitbooth_core.ecac.expression_words import TokenMatch, matches
from portraitbooth_core.stea.class_words import TokenizerWords
from portraitbooth_core.vocabulary import CLASS_WORDS, expression_words

from .captioner import clean_generated

CLIP_KEY = "l"


CHUNK = 77


class CaptionError(ValueError):
    """A caption that cannot train the identity token; the message is the skip reason."""


class ClassSynonymsError(ValueError):
    """A class-word synonyms file that cannot be used; the message names the file and the fix."""


_WORD = re.compile(r"^[a-z][a-z'-]*$")


_PHRASE = re.compile(r"^[a-z][a-z' -]*[a-z]$|^[a-z]$")


def load_class_synonyms(path: str | Path) -> dict[str, list[str]]:
    """A class-word table from JSON: {"man": ["guy", "gentleman"], "woman": ["lady"], ...}.

    Each key is a class word the model learns (one word), each value the other words
    captions use for it (words or short phrases). The file replaces the default table
    (`portraitbooth_core.vocabulary.CLASS_WORDS`). Returns {word: [word, *synonyms]}.
    """
    path = Path(path)
    fix = (f'; write {path} as a JSON object of class word -> list of synonyms, e.g. '
           '{"man": ["guy", "gentleman"], "woman": ["lady", "girl"]}')
    if not path.is_file():
        raise ClassSynonymsError(f"class-word synonyms file not found: {path}{fix}")
    try:
        data = read_json_file(path, f"class-word synonyms file {path}", max_bytes=16 << 20)
    except ValueError as exc:
        raise ClassSynonymsError(f"{exc}{fix}") from None
    return validate_class_synonyms(data, str(path), fix)


def validate_class_synonyms(data, where: str = "class synonyms", fix: str = "") -> dict[str, list[str]]:
    """`load_class_synonyms`'s checks on an already parsed table."""
    if not isinstance(data, dict) or not data:
        raise ClassSynonymsError(f"{where}: expected a non-empty object of class word -> list of synonyms, "
                                 f"got {type(data).__name__}{fix}")
    table: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for key, syns in data.items():
        word = str(key).strip().lower()
        if not _WORD.match(word):
            raise ClassSynonymsError(f"{where}: class word {key!r} must be one word of letters (the word the "
                                     f"model learns, used in prompts){fix}")
        if not isinstance(syns, list) or not all(isinstance(s, str) for s in syns):
            raise ClassSynonymsError(f"{where}: the synonyms of {key!r} must be a list of strings, got "
                                     f"{json.dumps(syns)}{fix}")
        words = [word]
        for syn in syns:
            syn = " ".join(syn.strip().lower().split())
            if not _PHRASE.match(syn):
                raise ClassSynonymsError(f"{where}: synonym {syn!r} of {key!r} must be letters (a word or a short "
                                         f"phrase){fix}")
            if syn not in words:
                words.append(syn)
        for w in words:
            if owner.get(w, word) != word:  # one word for two classes: its meaning would be a guess
                raise ClassSynonymsError(f"{where}: {w!r} is listed under both {owner[w]!r} and {key!r}; keep it "
                                         f"under one class word{fix}")
            owner[w] = word
        table[word] = words
    return table


def read_caption(image: Path) -> str | None:
    """The sidecar caption of an image: <stem>.txt, or <stem>.json with a "caption" key."""
    txt, js = image.with_suffix(".txt"), image.with_suffix(".json")
    if txt.is_file():
        return txt.read_text(encoding="utf-8").strip() or None
    if js.is_file():
        data = read_json_file(js, f"caption sidecar {js}", max_bytes=1 << 20)
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

    def find(self, chunks, words) -> list[TokenMatch]:
        """`expression_words.find_word_tokens` with this finder's matcher for `words`, built
        once per word list (building one tokenizes every word: ~170 for the expressions)."""
        words = tuple(w for w in dict.fromkeys(w.strip().lower() for w in words) if w)
        return matches(self.matcher(words), chunks) if words else []

    def positions(self, caption: str, identity_word: str) -> tuple[list[int], list[str], list[int]]:
        """(identity positions, expression words, expression positions) in the first chunk."""
        chunks = self.tokenize(caption, disable_weights=True)[:1]
        ident = [m.position for m in self.find(chunks, [identity_word]) if m.position < CHUNK]
        if not ident:
            raise CaptionError(f"class word '{identity_word}' is not within the first {CHUNK - 2} tokens "
                               f"of the caption")
        expr = [m for m in self.find(chunks, expression_words()) if m.position < CHUNK]
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


# Words a generated caption uses for a person without naming a class ("a person sitting",
# "a close up of someone"); the first one becomes the class word.
# "face" only when no word for a person is there ("a close up of a face").
GENERIC_SUBJECTS = ("person", "someone", "somebody", "human", "individual", "adult", "teenager", "teen",
                    "child", "kid", "baby", "toddler")


_GENERIC = [re.compile(r"\b(?:(a|an|the)\s+)?(" + "|".join(words) + r")\b", re.IGNORECASE)
            for words in (GENERIC_SUBJECTS, ("face",))]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def name_subject(caption: str, word: str, synonyms: Mapping[str, Sequence[str]] = CLASS_WORDS) -> str:
    """A generated caption made to name its subject with a class word.

    A caption that has a class word or synonym is returned as it is (caption_info then
    normalizes it). Otherwise its first generic word for a person ("a person", "someone",
    "the face") becomes `word` ("a woman"); a caption with neither gets "a <word>, " in front,
    where the identity token stays inside the first 77 tokens. Raises CaptionError when the
    caption needs `word` and `word` is not in `synonyms`.
    """
    caption = clean_generated(caption)
    try:
        normalize_class_word(caption, synonyms)
        return caption
    except CaptionError:
        pass
    normalize_class_word(word, synonyms)  # the word put in must be one the table knows
    found = next((m for m in (g.search(caption) for g in _GENERIC) if m is not None), None)
    if found is not None:
        art = found.group(1)
        lead = "the" if art and art.lower() == "the" else _article(word)
        if art and art[:1].isupper():
            lead = lead.capitalize()
        return caption[:found.start()] + f"{lead} {word}" + caption[found.end():]
    return f"{_article(word)} {word}, {caption}" if caption else f"a photo of {_article(word)} {word}"


@dataclass
class CaptionRequest:
    """One sample asking for its caption: the file its sidecar belongs to (photo or video),
    the sample's name, the image a captioner would see (the training crop), the person's
    class word (class.txt) and the face model's gender/age estimate when it has one."""
    path: Path
    name: str
    image: object = None           # H x W x 3 uint8 RGB, or its encoded file (JPEG/PNG bytes)
    class_word: str = ""
    gender: str | int | None = None
    age: float | None = None
    position: float | None = None  # where in its video the frame is (0..1), for a clip's emotion


@dataclass(frozen=True)
class RawCaption:
    text: str | None   # None: no caption here, the template applies
    source: str        # "sidecar", "celebv-text", "captioner" or "template"
    error: str = ""    # the reason to skip the sample, when there is one


class CaptionSources:
    """Where each sample's caption comes from, first found wins: its sidecar (.txt/.json);
    the caption source (CelebV-Text) when the file is named by one of its clips; the
    captioner, once per batch of requests; otherwise the template (text None).

    Generated captions (CelebV-Text, captioner) are made to name the subject
    (`name_subject`) with: the person's class.txt word, else the word for the face's
    gender/age estimate (`class_word_for`), else `default_word`, else "person". Sidecar
    captions are the user's own words and are taken as written.

    source: a caption source object or a spec ("celebv-text:DIR"); captioner: a Captioner
    or a spec ("blip:DIR"), both loaded on first use (a build worker loads its own).
    """

    def __init__(self, synonyms: Mapping[str, Sequence[str]] = CLASS_WORDS, default_word: str = "",
                 source=None, captioner=None):
        self.synonyms, self.default_word = synonyms, default_word
        self._source, self._captioner = source or None, captioner or None

    @property
    def source(self):
        if isinstance(self._source, str):
            from .celebv_text import load_caption_source

            self._source = load_caption_source(self._source)
        return self._source

    @property
    def captioner(self):
        if isinstance(self._captioner, str):
            from .captioner import load_captioner

            self._captioner = load_captioner(self._captioner)
        return self._captioner

    def subject_word(self, request: CaptionRequest) -> str:
        from portraitbooth_core.vocabulary import class_word_for

        return request.class_word or class_word_for(request.gender, request.age, self.default_word or "person",
                                                    self.synonyms)

    def _named(self, text: str, request: CaptionRequest, source: str) -> RawCaption:
        word = self.subject_word(request)
        try:
            return RawCaption(name_subject(text, word, self.synonyms), source)
        except CaptionError:  # names nobody, and the chosen word is no class word: say how to fix it
            return RawCaption(text, source, f"{source} caption {text!r} names no class word and the subject's word "
                                            f"{word!r} is not one of the class words ({', '.join(self.synonyms)}): give "
                                            f"the person a class.txt, a face pack with a gender/age model, "
                                            f"--default-word, or list {word!r} in --class-synonyms")

    def resolve(self, requests: Sequence[CaptionRequest]) -> list[RawCaption]:
        out: list[RawCaption | None] = []
        todo: list[int] = []
        for i, req in enumerate(requests):
            try:
                text = read_caption(Path(req.path))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                out.append(RawCaption(None, "sidecar", f"unreadable caption sidecar ({exc})"))
                continue
            if text is not None:
                out.append(RawCaption(text, "sidecar"))
                continue
            if self.source is not None:
                text = self.source.caption_for(req.path, pick=req.name, position=req.position)
                if text is not None:
                    out.append(self._named(text, req, "celebv-text"))
                    continue
            if self.captioner is not None and req.image is not None:
                todo.append(i)
                out.append(None)
                continue
            out.append(RawCaption(None, "template"))
        if todo:
            # One caption per file: a video's frames share the caption of its first frame here.
            first: dict[str, int] = {}
            for i in todo:
                first.setdefault(str(requests[i].path), i)
            order = list(first.values())
            texts = dict(zip(order, self.captioner.caption([_image_array(requests[i].image) for i in order])))
            for i in todo:
                out[i] = self._named(texts[first[str(requests[i].path)]], requests[i], "captioner")
        return out  # type: ignore[return-value]


def _image_array(image):
    if isinstance(image, (bytes, bytearray)):
        import io

        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(image)) as im:
            return np.array(im.convert("RGB"))  # writable: the processor makes a tensor of it
    return image
