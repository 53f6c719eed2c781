"""CelebV-Text (Yu et al., CVPR 2023) as a caption source and as a source of people.

Layout as the dataset's text archives unpack (github.com/celebv-text/CelebV-Text, "Text
Descriptions"; downstream loaders read the same tree):

    ROOT/texts/face40_details_new/<clip>.txt   general + detailed appearance
    ROOT/texts/emotion/<clip>.txt              emotion, over the clip's duration
    ROOT/texts/action_dur/<clip>.txt           actions
    ROOT/texts/light_dir/<clip>.txt            light direction
    ROOT/texts/light_intensity/<clip>.txt      light intensity
    ROOT/texts/light_color_temp/<clip>.txt     light colour temperature (some copies unpack
                                               it misspelt as light_colot_temp)
    ROOT/videos/celebvtext_6/<clip>.mp4        the clips (any folder under videos/)

<clip> is the clip id ("zYeLz4c4qYc_15_0"); each text file holds one description per line
(several generated variants of the same annotation). The emotion annotation (8 categories:
neutral, happy, sad, anger, fear, surprise, contempt, disgust) is released only inside the
emotion descriptions ("... is happy at first and then surprised"): there is no separate
per-clip label file (CelebV-Text issue #17), and annotations.pkl holds actions and
appearance only (it is a pickle, so it is not read here: unpickling runs code).

Captions: one appearance sentence (picked per sample by a stable hash, so a video's
samples see different wordings and a rebuild writes the same ones) followed by
"looking <emotion>", where <emotion> is the pack's own category word (ECAC's expression
token), read from the emotion description with the pack's vocabulary. A clip whose
emotion changes gets the label at the sample's position in the clip when the caller knows
it, and none otherwise: a wrong expression token would teach ECAC the wrong face.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

from portraitbooth_core.vocabulary import WORD_TO_EMOTION

from .person import VIDEO_EXTS, Person

# aspect -> folder names under texts/, first the released name
ASPECT_FOLDERS: dict[str, tuple[str, ...]] = {
    "appearance": ("face40_details_new", "face40_details"),
    "emotion": ("emotion",),
    "action": ("action_dur",),
    "light_direction": ("light_dir",),
    "light_intensity": ("light_intensity",),
    "light_color_temperature": ("light_color_temp", "light_colot_temp"),
}
# What a caption is made of by default: appearance (the emotion clause is added on its own).
# Actions are left out: CelebV-Text's actions include "smile", "laugh", "frown", expression
# words that may disagree with the sample's frame.
DEFAULT_ASPECTS: tuple[str, ...] = ("appearance",)
SOURCE_PREFIX = "celebv-text:"

_EMOTION_WORD = re.compile(r"\b(" + "|".join(sorted(map(re.escape, WORD_TO_EMOTION), key=len, reverse=True))
                           + r")\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class CelebVTextError(ValueError):
    """A folder that is not CelebV-Text's layout, or an unusable option."""


def emotion_labels(text: str) -> list[str]:
    """The pack's emotion categories a description names, in order, repeats merged
    ("happy at first, then surprised and surprised" -> ["happy", "surprised"])."""
    out: list[str] = []
    for found in _EMOTION_WORD.finditer(text):
        cat = WORD_TO_EMOTION[found.group(1).lower()]
        if not out or out[-1] != cat:
            out.append(cat)
    return out


def _pick(lines: Sequence[str], key: str) -> str:
    if not key:
        return lines[0]
    digest = hashlib.sha256(key.encode("utf-8")).digest()  # not hash(): stable across processes
    return lines[int.from_bytes(digest[:8], "big") % len(lines)]


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0].rstrip(" .")


class CelebVText:
    """Captions of CelebV-Text clips. root: the dataset root (with texts/) or texts/ itself.

    aspects: which descriptions make the caption's sentences, in order (keys of
    ASPECT_FOLDERS, the emotion aside: it is always the "looking <emotion>" clause).
    """

    def __init__(self, root: str | Path, aspects: Sequence[str] = DEFAULT_ASPECTS):
        root = Path(root)
        if not root.is_dir():
            raise CelebVTextError(f"CelebV-Text folder not found: {root}")
        self.root = root
        self.texts = root / "texts" if (root / "texts").is_dir() else root
        unknown = [a for a in aspects if a not in ASPECT_FOLDERS]
        if unknown:
            raise CelebVTextError(f"unknown CelebV-Text aspect(s) {', '.join(unknown)}; known: "
                                  f"{', '.join(ASPECT_FOLDERS)}")
        self.folders: dict[str, Path] = {}
        for aspect, names in ASPECT_FOLDERS.items():
            found = next((self.texts / n for n in names if (self.texts / n).is_dir()), None)
            if found is not None:
                self.folders[aspect] = found
        if not self.folders:
            raise CelebVTextError(
                f"{root} is not CelebV-Text's text layout: expected {self.texts}/<aspect>/<clip>.txt with aspect "
                f"folders {', '.join(n[0] for n in ASPECT_FOLDERS.values())} (unpack the text description "
                f"archives there)")
        self.aspects = tuple(a for a in aspects if a != "emotion")
        self._lines: dict[tuple[str, str], list[str]] = {}  # a video's frames ask for the same clip in a row

    def lines(self, clip: str, aspect: str) -> list[str]:
        """The descriptions of one clip for one aspect, one per line, empty lines dropped."""
        if (clip, aspect) in self._lines:
            return self._lines[(clip, aspect)]
        folder = self.folders.get(aspect)
        path = folder / f"{clip}.txt" if folder is not None else None
        lines = [] if path is None or not path.is_file() else \
            [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        if len(self._lines) > 64:
            self._lines.clear()
        self._lines[(clip, aspect)] = lines
        return lines

    def has(self, clip: str) -> bool:
        return any((folder / f"{clip}.txt").is_file() for folder in self.folders.values())

    def emotions(self, clip: str) -> list[str]:
        """The clip's emotion labels in the pack's categories, in the order the clip shows them."""
        for line in self.lines(clip, "emotion"):
            labels = emotion_labels(line)
            if labels:
                return labels
        return []

    def emotion_at(self, clip: str, position: float | None = None) -> str | None:
        """The emotion label for a frame at `position` (0..1 through the clip); without a
        position only a clip with one emotion has one."""
        labels = self.emotions(clip)
        if len(labels) == 1:
            return labels[0]
        if not labels or position is None:
            return None
        # The descriptions say the order, not the times: the clip is split evenly.
        return labels[min(int(max(position, 0.0) * len(labels)), len(labels) - 1)]

    def caption(self, clip: str, pick: str = "", position: float | None = None) -> str | None:
        """A caption for one sample of a clip, or None when the clip has no descriptions.

        pick: a key choosing among the variant lines (the sample's name; "": the first). The subject is
        whatever the description calls it; "a person" when only the emotion is known
        (the builder puts the class word in its place).
        """
        sentences = [_first_sentence(_pick(lines, f"{pick}|{aspect}" if pick else ""))
                     for aspect in self.aspects if (lines := self.lines(clip, aspect))]
        emotion = self.emotion_at(clip, position)
        if not sentences and emotion is None:
            return None
        head = sentences[0] if sentences else "a photo of a person"
        if emotion is not None:
            head = f"{head}, looking {emotion}"
        return ". ".join([head, *sentences[1:]])

    def caption_for(self, path: str | Path, pick: str = "", position: float | None = None) -> str | None:
        """The caption of a photo or video whose file name is a clip id (`<clip>.mp4`, or a
        frame exported as `<clip>.jpg`), None for any other file."""
        return self.caption(Path(path).stem, pick, position)

    def describe(self) -> str:
        return f"{SOURCE_PREFIX}{self.root} ({', '.join(self.aspects) or 'emotion only'})"


def is_celebv_text_root(path: str | Path) -> bool:
    """A CelebV-Text root: texts/ with at least one aspect folder, and videos/."""
    path = Path(path)
    return (path / "videos").is_dir() and any((path / "texts" / n).is_dir()
                                              for names in ASPECT_FOLDERS.values() for n in names)


def _videos(root: str | Path) -> Path:
    videos = Path(root) / "videos"
    if not videos.is_dir():
        raise CelebVTextError(f"no videos/ folder in the CelebV-Text root {root}")
    return videos


def list_clips(root: str | Path) -> list[str]:
    """The clip ids of ROOT/videos/**, sorted: the people of a CelebV-Text root.

    Each clip is one person: a clip shows one subject, and clips that show the same
    celebrity are not marked as such in the dataset, so they are never merged. The
    reference face comes from another frame of the clip, as for any video."""
    seen: dict[str, Path] = {}
    for clip in _videos(root).rglob("*"):
        if clip.suffix.lower() in VIDEO_EXTS and clip.is_file():
            if clip.stem in seen:
                raise CelebVTextError(f"clip {clip.stem} is in the CelebV-Text videos twice ({seen[clip.stem]} and "
                                      f"{clip}); keep one")
            seen[clip.stem] = clip
    return sorted(seen)


def scan_clip(root: str | Path, name: str) -> Person | None:
    """One clip of a CelebV-Text root as a person with one video; None when it is gone."""
    videos = _videos(root)
    found = sorted(p for pattern in (f"{name}.*", f"*/{name}.*") for p in videos.glob(pattern)
                   if p.suffix.lower() in VIDEO_EXTS and p.is_file())
    return Person(name, found[0].parent, [], [found[0]], "") if found else None


def load_caption_source(spec: str, aspects: Sequence[str] = DEFAULT_ASPECTS) -> CelebVText:
    """A caption source from a command-line spec: "celebv-text:DIR"."""
    if not spec.startswith(SOURCE_PREFIX) or not spec[len(SOURCE_PREFIX):]:
        raise CelebVTextError(f"caption source {spec!r} is not {SOURCE_PREFIX}DIR (the CelebV-Text root, with "
                              f"texts/ in it)")
    return CelebVText(spec[len(SOURCE_PREFIX):], aspects)
