"""ComfyUI glue of Apply STEA Conditioning: CLIP object in, CONDITIONING out.

The math (class-word matching, projector, splice) lives in portraitbooth_core; this
module only reads tokens and encodings from ComfyUI's CLIP the way CLIPTextEncode does,
so every token but the class words is bit-identical to CLIPTextEncode's output. What it
found (class and expression positions) goes into the output as a `contracts.STEAEntry`.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from portraitbooth_core.stea.class_words import (ClassWordError, ClassWordMatcher, parse_words, select_subjects,
                                             tokenizer_words)
from portraitbooth_core.ecac.expression_words import matches
from portraitbooth_core.face.types import Identity
from portraitbooth_core.stea.projector import splice_identity
from portraitbooth_core.weights.file import PortraitBoothModel
from portraitbooth_core.weights.meta import check_embedding, check_schedule
from portraitbooth_core.vocabulary import SYNONYM_TO_CLASS, class_word_for, expression_words

from .contracts import STEAEntry, write_stea

log = logging.getLogger("portraitbooth")
CLIP_KEY = "l"  # SD1.5 has one text encoder, CLIP-L, under tokenizer key "l"


def clip_matcher(clip, words: Sequence[str]) -> ClassWordMatcher:
    """A class-word matcher that uses this CLIP's own tokenizer and vocabulary (cached:
    building one tokenizes every class word, a measurable cost on a GPU)."""
    return tokenizer_words(clip.tokenizer, CLIP_KEY).matcher(words)


def as_identities(*faces) -> list[Identity]:
    """Face inputs (an Identity, a list of them, or None) flattened in order."""
    out: list[Identity] = []
    for face in faces:
        if face is None:
            continue
        out.extend(face if isinstance(face, (list, tuple)) else [face])
    if not out:
        raise ValueError("Apply STEA Conditioning needs at least one face embedding.")
    for face in out:
        if not isinstance(face, Identity):
            raise TypeError(f"face input carries {type(face).__name__}, expected a face embedding "
                            f"from Analyze Faces")
    return out


AUTO = "auto"  # class_word value: the words that fit each face's estimated gender


def auto_class_words(identities: Sequence[Identity], accepted: Sequence[str]) -> list[str]:
    """class_word 'auto': the accepted words that fit the identities' genders as a pack's
    gender/age model estimated them (all of 'woman', 'girl', 'lady', ... for a woman) plus
    the neutral ones ('person'). [] (any accepted word) when an identity has no estimate."""
    classes = set()
    for face in identities:
        word = class_word_for(face.gender, face.age, default="")
        if not word:
            return []
        classes.add(SYNONYM_TO_CLASS.get(word, word))
    fitting = [w for w in accepted if w not in SYNONYM_TO_CLASS or SYNONYM_TO_CLASS[w] in classes]
    return fitting if any(w in SYNONYM_TO_CLASS for w in fitting) else []


def unit_weights(tokens: dict) -> dict:
    """The same tokens with every prompt weight 1 (the class word's unweighted output)."""
    return {k: [[(t[0], 1.0, *t[2:]) for t in chunk] for chunk in chunks] for k, chunks in tokens.items()}


def _empty_chunk(clip, key: str, like: tuple, length: int) -> list | None:
    """The empty prompt's chunk of one encoder key as ComfyUI's gen_empty_tokens builds it
    (start, end, then pads to `length`), each entry shaped like `like` with weight 1; None
    when the tokenizer shows no start/end/pad to build it from."""
    special = tokenizer_words(clip.tokenizer, key).start_end_pad
    if len(special) < 3 or length < 2:
        return None
    start, end, pad = special
    return [(t, 1.0, *like[2:]) for t in [start, end] + [pad] * (length - 2)]


def _encode_twice(clip, tokens: dict) -> tuple[list, list[torch.Tensor]]:
    """The plain way: the weighted encode and a second, unit-weight one."""
    return (clip.encode_from_tokens_scheduled(tokens),
            [cond for cond, _ in clip.encode_from_tokens_scheduled(unit_weights(tokens))])


def encode_weighted_once(clip, tokens: dict) -> tuple[list, list[torch.Tensor]]:
    """(CONDITIONING of `tokens` as CLIPTextEncode gives it, the unit-weight output of each of
    its entries) from ONE forward of the text encoder(s).

    ComfyUI encodes a weighted prompt with one empty-prompt chunk appended to the batch and
    moves each weighted token around the empty prompt's output at its position,
    z = (z - z_empty) * w + z_empty; the pooled output is the first chunk's. Encoding the
    same batch with every weight 1 (the empty chunk as one more chunk) runs the same forward
    and gives both the unit-weight output the projector reads and z_empty, so the weighting
    is done here the way ComfyUI does it. Prompts whose layout this cannot reproduce
    (chunks of different lengths, encoders whose weights differ) take two encodes.
    """
    keys = list(tokens)
    chunks = tokens[keys[0]]
    length = max((len(c) for c in chunks), default=0)
    weights = [t[1] for c in chunks for t in c]
    same_layout = bool(chunks) and all(
        len(tokens[k]) == len(chunks) and all(len(c) == length for c in tokens[k])
        and [t[1] for c in tokens[k] for t in c] == weights for k in keys)
    empties = {k: _empty_chunk(clip, k, tokens[k][0][0], length) for k in keys} if same_layout else {}
    if not same_layout or any(e is None for e in empties.values()):
        return _encode_twice(clip, tokens)
    # SDXL's two encoders are concatenated feature-wise: one weight per token serves both.
    unit = unit_weights(tokens)
    for k in keys:
        unit[k].append(empties[k])
    encoded = clip.encode_from_tokens_scheduled(unit)
    size = len(weights)
    if any(cond.shape[-2] != size + length for cond, _ in encoded):
        log.debug("PortraitBooth: unexpected encoder output layout; encoding the weighted prompt twice")
        return _encode_twice(clip, tokens)
    text_conds, unit_conds = [], []
    for cond, extra in encoded:
        plain, empty = cond[:, :size], cond[:, size:].repeat(1, len(chunks), 1)
        w = torch.tensor(weights, dtype=cond.dtype, device=cond.device)[None, :, None]
        # Tokens of weight 1 are left untouched, as ComfyUI leaves them (bit for bit).
        moved = torch.tensor([x != 1.0 for x in weights], device=cond.device)[None, :, None]
        weighted = torch.where(moved, (plain - empty) * w + empty, plain)
        extra = dict(extra)
        if torch.is_tensor(extra.get("attention_mask")):  # flattened over the chunks, as ComfyUI returns it
            extra["attention_mask"] = extra["attention_mask"][..., :size]
        text_conds.append([weighted, extra])
        unit_conds.append(plain)
    return text_conds, unit_conds


def _with_range(entry: list, start: float, end: float) -> list:
    return [entry[0], {**entry[1], "start_percent": start, "end_percent": end}]


def identity_ranges(identity: list, plain: list, start_percent: float, end_percent: float) -> list:
    """CONDITIONING items: `identity` ([cond, extra]) inside [start, end] of the schedule and
    `plain` outside it, with the keys ConditioningSetTimestepRange sets."""
    if start_percent <= 0.0 and end_percent >= 1.0:
        return [identity]
    out = [_with_range(identity, start_percent, end_percent)]
    if start_percent > 0.0:
        out.append(_with_range(plain, 0.0, start_percent))
    if end_percent < 1.0:
        out.append(_with_range(plain, end_percent, 1.0))
    return out


def encode_with_identity(clip, text: str, identities: Sequence[Identity], model: PortraitBoothModel,
                         class_word: str = "", occurrence: int = 0, strength: float = 1.0,
                         start_percent: float = 0.0, end_percent: float = 1.0) -> list:
    """CONDITIONING for `text` with each identity spliced onto its class word.

    Outside [start_percent, end_percent] of the schedule the plain text conditioning is
    used (FastComposer's delayed subject conditioning: layout first, identity later),
    expressed with the same start_percent/end_percent keys ConditioningSetTimestepRange sets.
    """
    if clip is None:
        raise RuntimeError("clip input is invalid: None (does the checkpoint contain a text encoder?)")
    check_schedule(start_percent, end_percent)
    info = model.info
    kinds = {f.kind for f in identities}
    if len(kinds) > 1:
        raise ValueError(f"face embeddings come from different recognizers ({', '.join(sorted(kinds))}); "
                         f"use one FaceEncoder for every subject.")
    for face in identities:
        # A raw identity for a model trained on normalised ones (or the reverse) is refused here.
        warning = check_embedding(info, face.kind, face.dim, normalized=face.normalized,
                                  face_order=face.face_order or None)
        if warning:
            log.warning("PortraitBooth: %s", warning)
    tokens = clip.tokenize(text)
    if set(tokens) != {CLIP_KEY}:
        family = "SDXL" if set(tokens) == {"g", "l"} else "not SD1.5"
        raise ValueError(f"{model.info.projector.kind} files are made for SD1.5, whose CLIP is CLIP-L alone; this "
                         f"CLIP has text encoders {', '.join(sorted(tokens))} ({family}). Connect the CLIP of an "
                         f"SD1.5 checkpoint, or use a PhotoMaker file with SDXL.")
    # The class words plus the synonyms its training captions used ("boy" for "man").
    matcher = clip_matcher(clip, info.accepted_words)
    words = (auto_class_words(identities, info.accepted_words) if class_word.strip().lower() == AUTO
             else parse_words(class_word))
    hits = select_subjects(matcher.find(tokens[CLIP_KEY]), len(identities), matcher.words, words, occurrence)
    positions = [h.position for h in hits]
    weights = [h.weight for h in hits]
    faces = torch.stack([f.vector.detach().float().reshape(-1) for f in identities])

    # A weighted class word ("(man:1.2)") must feed the projector its unweighted CLIP output.
    text_conds, raw_conds = (encode_weighted_once(clip, tokens) if any(w != 1.0 for w in weights)
                             else (clip.encode_from_tokens_scheduled(tokens), None))
    # Readers downstream (ECAC, regions) need to know which tokens carry the identities and
    # the expressions (found with the model's own emotion words), so they never re-tokenize;
    # only the identity entries get it, the plain-text ranges below do not.
    expressions = matches(clip_matcher(clip, expression_words(info.emotion_words)), tokens[CLIP_KEY])
    entry = STEAEntry(base=info.base, class_positions=tuple(positions),
                      expression_positions=tuple(m.position for m in expressions),
                      expression_words=tuple(m.word for m in expressions), emotion_words=info.emotion_words)
    out = []
    for n, (cond, extra) in enumerate(text_conds):
        psi = raw_conds[n][:, positions] if raw_conds is not None else None
        with torch.no_grad():
            id_cond = splice_identity(cond, positions, faces, model.projector, strength, psi=psi, weights=weights)
        out += identity_ranges([id_cond, write_stea(extra, entry)], [cond, extra], start_percent, end_percent)
    return out


__all__ = ["ClassWordError", "as_identities", "clip_matcher", "encode_weighted_once", "encode_with_identity"]
