"""ComfyUI glue of Apply STEA Conditioning for PhotoMaker files (SDXL): CLIP in, CONDITIONING out.

The class word of each subject becomes K copies (K = photos x the head's tokens per photo)
in both of SDXL's token streams, PhotoMaker's trigger `img` after it is dropped, the prompt
is encoded by ComfyUI's own SDXL CLIP, and copy k of subject s is replaced by the head's
fusion of that copy with identity token k of s. The pooled output is left as the encoder
gave it. Token edits and fusion are portraitbooth_core's (stea.stacked_prompt, stea.photomaker).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import torch

from portraitbooth_core.ecac.expression_words import matches
from portraitbooth_core.face.photomaker_photos import PHOTOMAKER_V1_KIND, PHOTOMAKER_V2_FAMILY
from portraitbooth_core.face.types import Identity
from portraitbooth_core.stea.class_words import ClassWordError, parse_words, select_subjects, tokenizer_words
from portraitbooth_core.stea.photomaker import PHOTOMAKER_V1, PHOTOMAKER_V2, splice_photomaker
from portraitbooth_core.stea.stacked_prompt import TRIGGER_WORD, StackSite, stack_class_tokens, trigger_after
from portraitbooth_core.weights.family import FAMILY_NAMES
from portraitbooth_core.weights.file import PortraitBoothModel
from portraitbooth_core.weights.meta import EmbeddingMismatchError, check_embedding, check_schedule
from portraitbooth_core.vocabulary import expression_words

from .contracts import STEAEntry, write_stea
from .stea_encode import AUTO, auto_class_words, encode_weighted_once, identity_ranges

log = logging.getLogger("portraitbooth")
SDXL_KEYS = ("g", "l")  # ComfyUI's SDXL tokenizer: OpenCLIP bigG and CLIP-L
MODES = {PHOTOMAKER_V1: "PhotoMaker v1", PHOTOMAKER_V2: "PhotoMaker v2"}  # CLIP Vision Identity's modes


def check_photomaker_identity(model: PortraitBoothModel, face: Identity) -> str | None:
    """Refuse an identity the file's head cannot read, naming the node setting that makes
    the right one; returns check_embedding's warning (e.g. another insightface pack)."""
    kind = model.info.projector.kind
    mode = MODES[kind]
    family = face.kind.split(":", 1)[0]
    want = PHOTOMAKER_V1_KIND.split(":", 1)[0] if kind == PHOTOMAKER_V1 else PHOTOMAKER_V2_FAMILY
    if face.clip_hidden is None or family != want:
        made = ("CLIP Vision Identity in mode 'PhotoMaker v1'" if family == "clip_vision" and face.clip_hidden is not None
                else "CLIP Vision Identity in mode 'PhotoMaker v2'" if family == PHOTOMAKER_V2_FAMILY
                else "CLIP Vision Identity in mode 'FastComposer'" if family == "clip_vision"
                else f"a face recognizer ('{face.kind}', Analyze Faces)")
        how = (f"mode '{mode}'" + ("" if kind == PHOTOMAKER_V1 else
                                   " with Load FaceEncoder (insightface buffalo_l) connected"))
        raise EmbeddingMismatchError(
            f"{model.info.projector.kind} file: its head reads PhotoMaker's {mode} identity, but this identity comes "
            f"from {made} ('{face.kind}', {face.dim}-d). Make it with CLIP Vision Identity (PortraitBooth) in {how}, "
            f"fed the CLIP vision file the PhotoMaker import wrote.")
    if face.clip_hidden.shape[0] != face.count:
        raise EmbeddingMismatchError(f"identity '{face.kind}' holds {face.count} embeddings but "
                                     f"{face.clip_hidden.shape[0]} CLIP outputs; re-make it with CLIP Vision Identity")
    return check_embedding(model.info, face.kind, face.dim, normalized=face.normalized)


def head_features(model: PortraitBoothModel, face: Identity) -> dict[str, torch.Tensor]:
    """The keyword inputs of fuse_class_tokens for one subject's photos."""
    if model.info.projector.kind == PHOTOMAKER_V1:
        return {"last_hidden_state": face.clip_hidden}
    return {"last_hidden_state": face.clip_hidden, "id_embeds": face.embeddings}


def _sites(tokens: dict, key: str, words: Sequence[str], accepted: Sequence[str], subjects: int, occurrence: int,
           clip) -> tuple[list, list[int], list[tuple]]:
    """(chosen class-word hits, their trigger token counts, the other triggers' (hit, count))
    for one encoder key."""
    lookup = tokenizer_words(clip.tokenizer, key)
    hits = lookup.matcher(accepted).find(tokens[key])
    trigger = lookup.ids_of(TRIGGER_WORD)
    end_id = lookup.start_end_pad[1]
    counts = [trigger_after(tokens[key], h, trigger, end_id) for h in hits]
    marked = [h for h, n in zip(hits, counts) if n]
    # With triggers, the class words they mark are the subjects (as PhotoMaker's prompts say).
    chosen = select_subjects(marked or hits, subjects, lookup.matcher(accepted).words, words, occurrence)
    # A trigger is markup, not text: it goes after every class word, chosen or not.
    others = [(h.chunk, h.index, n) for h, n in zip(hits, counts) if n and h not in chosen]
    return chosen, [counts[hits.index(h)] for h in chosen], others


def restack(clip, tokens: dict, sites: Sequence[StackSite]) -> tuple[dict, list[list[int]]]:
    """Both encoders' tokens with the sites stacked, and the copies' positions (checked equal)."""
    stacked, copies = {}, None
    for key in SDXL_KEYS:
        stacked[key], positions = stack_class_tokens(tokens[key], sites,
                                                     *tokenizer_words(clip.tokenizer, key).start_end_pad)
        if copies is not None and positions != copies:
            raise ClassWordError("SDXL's two tokenizers disagree on the stacked class tokens' positions")
        copies = positions
    return stacked, copies


def encode_stacked(clip, text: str, identities: Sequence[Identity], model: PortraitBoothModel,
                   class_word: str = "", occurrence: int = 0, strength: float = 1.0, start_percent: float = 0.0,
                   end_percent: float = 1.0) -> list:
    """CONDITIONING for `text` with each identity's stacked tokens fused into its class word."""
    if clip is None:
        raise RuntimeError("clip input is invalid: None (does the checkpoint contain a text encoder?)")
    check_schedule(start_percent, end_percent)
    info = model.info
    tokens = clip.tokenize(text)
    if set(tokens) != set(SDXL_KEYS):
        raise ValueError(f"{MODES[info.projector.kind]} files are made for {FAMILY_NAMES['sdxl']}, whose CLIP has the "
                         f"text encoders g and l; this CLIP has {', '.join(sorted(tokens))} "
                         f"({'SD1.5' if set(tokens) == {'l'} else 'another family'}). Connect the CLIP of an SDXL "
                         f"checkpoint, or use a PortraitBooth/FastComposer file with SD1.5.")
    for face in identities:
        warning = check_photomaker_identity(model, face)
        if warning:
            log.warning("PortraitBooth: %s", warning)
    words = (auto_class_words(identities, info.accepted_words) if class_word.strip().lower() == AUTO
             else parse_words(class_word))
    per_key = {key: _sites(tokens, key, words, info.accepted_words, len(identities), occurrence, clip)
               for key in SDXL_KEYS}
    (hits, triggers, others), (g_hits, g_triggers, g_others) = per_key["l"], per_key["g"]
    if [(h.chunk, h.index, h.word) for h in hits] != [(h.chunk, h.index, h.word) for h in g_hits] \
            or triggers != g_triggers or others != g_others:
        raise ClassWordError("SDXL's two tokenizers placed the class words differently; rewrite the prompt "
                             "around the class word (e.g. 'a photo of a man img, ...').")
    per_photo = model.projector.tokens_per_photo
    sites = [StackSite(h.chunk, h.index, face.count * per_photo, t) for h, face, t in zip(hits, identities, triggers)]
    sites += [StackSite(chunk, index, 1, n) for chunk, index, n in others]
    stacked, copies = restack(clip, tokens, sites)
    copies = copies[:len(hits)]
    # Before start_percent PhotoMaker uses the text alone: the trigger dropped, one class word.
    text_only = None
    if start_percent > 0.0 or end_percent < 1.0:
        text_only = clip.encode_from_tokens_scheduled(restack(clip, tokens, [replace(s, copies=1) for s in sites])[0])
    weights = [h.weight for h in hits]
    text_conds, raw_conds = (encode_weighted_once(clip, stacked) if any(w != 1.0 for w in weights)
                             else (clip.encode_from_tokens_scheduled(stacked), None))
    expressions = matches(tokenizer_words(clip.tokenizer, "l").matcher(expression_words(info.emotion_words)),
                          stacked["l"])
    entry = STEAEntry(base="sdxl", class_positions=tuple(p[-1] for p in copies),
                      class_copies=tuple(tuple(p) for p in copies),
                      expression_positions=tuple(m.position for m in expressions),
                      expression_words=tuple(m.word for m in expressions), emotion_words=info.emotion_words)
    out = []
    for n, (cond, extra) in enumerate(text_conds):
        id_cond = cond
        with torch.no_grad():
            for face, positions, weight in zip(identities, copies, weights):
                psi = raw_conds[n][:, positions] if raw_conds is not None else None
                id_cond = splice_photomaker(id_cond, positions, model.projector, strength=strength, psi=psi,
                                            weights=[weight] * len(positions), **head_features(model, face))
        plain = text_only[min(n, len(text_only) - 1)] if text_only is not None else None
        out += identity_ranges([id_cond, write_stea(extra, entry)], plain, start_percent, end_percent)
    return out


__all__ = ["check_photomaker_identity", "encode_stacked"]
