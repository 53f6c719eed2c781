"""One person folder -> samples: every photo or video frame analyzed (face crop, mask,
embedding, caption), each target paired with a reference face from another photo or frame
of the same person. Runs in the builder's process or in a worker (build.pool)."""
from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..dataset.samples import encode_image, npy_bytes
from .captions import CaptionError, CaptionRequest, CaptionSources, TokenFinder, caption_info
from .face_crops import FaceCrop, analyze_face, embed_pending
from .person import Person, SkipError
from .settings import BuildSettings
from .sources import TARGET_FRACTIONS, VideoFrameStream, load_image, video_frames


# -- one person -> samples (in this process or a worker) -------------------------------------
@dataclass
class PersonResult:
    """What one person folder gives: samples in order, and what goes to the report."""

    name: str
    samples: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    words: dict[str, list[str]] = field(default_factory=dict)  # identity word -> words the captions used


@dataclass
class _Face:
    """An analyzed face, its images already encoded (a long video keeps many of them)."""

    crop: FaceCrop
    jpg: bytes = b""
    mask: bytes = b""
    ref: bytes = b""


def _encoded(crop: FaceCrop) -> _Face:
    face = _Face(crop, encode_image(crop.image, "JPEG", quality=95), encode_image(crop.mask),
                 encode_image(crop.aligned))
    crop.image = crop.mask = None  # the arrays are not needed again
    return face


def _memoize_word_ids(finder) -> None:
    # The finder looks up the ids of every expression word for every caption (~60
    # tokenizer calls, ~30 ms); the ids of a word never change, so they are kept.
    if getattr(finder, "_builder_memo", False) or not callable(getattr(finder, "ids_of", None)):
        return
    lookup, cache = finder.ids_of, {}

    def ids_of(word: str) -> list[int]:
        if word not in cache:
            cache[word] = tuple(lookup(word))
        return list(cache[word])

    finder.ids_of, finder._builder_memo = ids_of, True


_finder: list[TokenFinder] = []


def default_finder() -> TokenFinder:
    """The process's SD1.5 token finder, made once (loading the tokenizer takes seconds)."""
    if not _finder:
        _finder.append(TokenFinder())
    return _finder[0]


def _pick(key: str, n: int) -> int:
    """A fixed choice among n, from a name: the same on every run and every machine."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


class PersonAnalyzer:
    """One person folder -> PersonResult. The builder's process and every worker run this."""

    def __init__(self, source: Path, encoder, settings: BuildSettings, finder: TokenFinder, captioner=None):
        self.source, self.encoder, self.settings, self.finder = Path(source), encoder, settings, finder
        # sidecar, then CelebV-Text, then the captioner (loaded here on first use), then the template
        self.captions = CaptionSources(settings.synonyms, settings.default_word, settings.captions,
                                       captioner or settings.captioner)
        self._frame_counts: dict[str, int] = {}  # video -> frames, for where a frame lies in its clip
        # caption -> CaptionInfo (or the skip) for the whole run: a template caption is the
        # same for thousands of people, and tokenizing it is a good part of a person's time
        self._caption_infos: dict[tuple, object] = {}
        _memoize_word_ids(finder)

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.source))

    def _face(self, image: np.ndarray, name: str, result: PersonResult) -> _Face | None:
        try:
            return _encoded(analyze_face(self.encoder, image, self.settings.crops))
        except SkipError as exc:
            result.skipped.append({"file": name, "reason": str(exc)})
            return None

    def __call__(self, person: Person) -> PersonResult:
        result = PersonResult(person.name)
        photos: list[tuple[str, _Face]] = []
        for path in person.images:
            try:
                image = load_image(path)
            except SkipError as exc:
                result.skipped.append({"file": self._rel(path), "reason": str(exc)})
                continue
            face = self._face(image, self._rel(path), result)
            if face is not None:
                photos.append((self._rel(path), face))
        embed_pending(self.encoder, [f.crop for _, f in photos])  # one recognizer call for the person
        pairs = []  # (target name, target face, reference name, reference face, caption source path)
        for i, (name, face) in enumerate(photos):
            ref_name, ref = photos[(i + 1) % len(photos)]
            if len(photos) == 1:
                result.warnings.append(f"{name}: the only usable photo of '{person.name}'; its reference face "
                                       f"is the same photo (add another photo of this person)")
            pairs.append((name, face, ref_name, ref, self.source / name))
        for path in person.videos:
            stride = self.settings.video_stride or self.settings.video_fps
            pairs += (self._video_frames(path, result) if stride else self._video_ends(path, result))
        raws = self.captions.resolve([CaptionRequest(path, name, face.jpg, person.class_word,
                                                     getattr(face.crop, "gender", None),
                                                     getattr(face.crop, "age", None), self._position(name))
                                      for name, face, _, _, path in pairs])
        captions = self._caption_infos  # a video's frames and a template's people share one: analyzed once
        if len(captions) > 100_000:  # unique sidecar captions: bounded memory
            captions.clear()
        words: dict[str, set[str]] = {}
        for (name, face, ref_name, ref, caption_path), raw in zip(pairs, raws):
            key = (raw.text, raw.error, person.class_word or self.settings.default_word)
            if key not in captions:
                try:
                    if raw.error:
                        raise CaptionError(raw.error)
                    captions[key] = caption_info(raw.text, self.finder, self.settings.caption_template,
                                                 person.class_word or self.settings.default_word,
                                                 self.settings.synonyms)
                except CaptionError as exc:
                    captions[key] = exc
            info = captions[key]
            if isinstance(info, Exception):
                result.skipped.append({"file": name, "reason": str(info)})
                continue
            box, landmarks = face.crop.box.tolist(), face.crop.landmarks.tolist()
            meta = {"person": person.name, "source": name, "reference_source": ref_name,
                    "reference_same_image": ref_name == name, "caption": info.caption,
                    "identity_word": info.identity_word, "identity_positions": info.identity_positions,
                    "expression_words": info.expression_words, "expression_positions": info.expression_positions,
                    "subject_word": info.subject_word, "caption_source": raw.source, "box": box,
                    "landmarks": landmarks}
            words.setdefault(info.identity_word, set()).add(info.subject_word)
            result.samples.append({"jpg": face.jpg, "mask.png": face.mask, "ref.png": ref.ref,
                                   "emb.npy": npy_bytes(ref.crop.embedding), "json": json.dumps(meta).encode()})
        result.words = {w: sorted(s) for w, s in sorted(words.items())}
        return result

    def _position(self, name: str) -> float | None:
        """Where a video sample's frame lies in its clip (0..1); None for a photo."""
        video, _, frame = name.rpartition("#")
        if frame.startswith("target") and frame[6:].isdigit() and int(frame[6:]) < len(TARGET_FRACTIONS):
            return TARGET_FRACTIONS[int(frame[6:])]
        if frame.startswith("frame") and frame[5:].isdigit() and self._frame_counts.get(video):
            return int(frame[5:]) / self._frame_counts[video]
        return None

    def _video_ends(self, path: Path, result: PersonResult) -> list[tuple]:
        """The paper's sampling: targets near the start and the end, the middle frame as reference."""
        rel = self._rel(path)
        try:
            targets, middle = video_frames(path)
        except SkipError as exc:
            result.skipped.append({"file": rel, "reason": str(exc)})
            return []
        ref = self._face(middle, f"{rel}#middle", result)
        if ref is None:
            return []
        found = [(f"{rel}#target{k}", self._face(frame, f"{rel}#target{k}", result))
                 for k, frame in enumerate(targets)]
        found = [(name, face) for name, face in found if face is not None]
        embed_pending(self.encoder, [ref.crop] + [f.crop for _, f in found])
        return [(name, face, f"{rel}#middle", ref, path) for name, face in found]

    def _video_frames(self, path: Path, result: PersonResult) -> list[tuple]:
        """Every stride-th frame a target; its reference a frame of the clip at least
        video_reference_gap of the clip away, chosen from the frame's name (the same
        choice on every run)."""
        rel = self._rel(path)
        stream = VideoFrameStream(path, self.settings.video_stride, self.settings.video_fps)
        frames: list[tuple[int, _Face]] = []
        skipped: list[dict] = []
        try:
            for n, frame in stream:
                try:
                    frames.append((n, _encoded(analyze_face(self.encoder, frame, self.settings.crops))))
                except SkipError as exc:
                    skipped.append({"file": f"{rel}#frame{n}", "reason": str(exc)})
        except SkipError as exc:
            result.skipped.append({"file": rel, "reason": str(exc)})
            return []
        result.skipped += skipped
        self._frame_counts[rel] = stream.count
        embed_pending(self.encoder, [f.crop for _, f in frames])
        gap = max(2, math.ceil(self.settings.video_reference_gap * stream.count))
        numbers = [n for n, _ in frames]
        pairs = []
        for n, face in frames:
            before = bisect.bisect_right(numbers, n - gap)  # frames[:before] lie gap or more before n
            after = bisect.bisect_left(numbers, n + gap)    # frames[after:] lie gap or more after n
            choices = before + len(frames) - after
            if not choices:
                result.skipped.append({"file": f"{rel}#frame{n}", "reason": f"no usable reference frame at least "
                                       f"{gap} frames away in the clip ({stream.count} frames)"})
                continue
            k = _pick(f"{rel}#frame{n}", choices)
            m, ref = frames[k] if k < before else frames[after + k - before]
            pairs.append((f"{rel}#frame{n}", face, f"{rel}#frame{m}", ref, path))
        return pairs
