"""What the pack's nodes pass between each other: socket types, the defaults a PortraitBooth
file gives Apply STEA through Load PortraitBooth Model (`ModelDefaults`), and the PortraitBooth
entry Apply STEA Conditioning writes into a CONDITIONING for ECAC and the region sampler.

The entry is the only contract between those nodes: writers and readers go through
`write_stea` / `read_stea` / `stea_of` / `identity_item`, never through the dict key.
It is stored as a plain dict of ints and strings so it survives ComfyUI's conditioning
copies (ConditioningSetTimestepRange & co. copy the outer dict and keep ours as is).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

from comfy_api.latest import io

from portraitbooth_core.vocabulary import DEFAULT_EMOTION_WORDS
from portraitbooth_core.weights.file import PortraitBoothModel
from portraitbooth_core.weights.meta import InferenceDefaults

FaceEncoder = io.Custom("PB_FACE_ENCODER")   # portraitbooth_core.face.FaceEncoder
FaceEmbedding = io.Custom("PB_FACE_EMBEDDING")  # portraitbooth_core.face.Identity
Projector = io.Custom("PB_STEA_PROJECTOR")  # portraitbooth_core.weights.file.PortraitBoothModel

STEA_KEY = "portraitbooth"  # key of the entry in a conditioning's extra dict


@dataclass(frozen=True)
class ModelDefaults:
    """What a PortraitBooth file says its model was made for, passed with the projector from
    Load PortraitBooth Model to Apply STEA (whose "from file" settings take these values).

    file: the weight file's name, for messages; identity_kind: the embeddings its projector
    reads (e.g. "clip_vision:vit-l-14"); inference: start_percent and CFG hint (None: not stored).
    """
    file: str
    identity_kind: str
    inference: InferenceDefaults

    def describe(self) -> str:
        """One line for the UI, e.g. "identity clip_vision:vit-l-14; start 0.30, CFG 5"."""
        start, cfg = self.inference.start_percent, self.inference.cfg
        return (f"identity {self.identity_kind}; "
                + (f"start {start:.2f}" if start is not None else "no start stored (0.00, the paper's)")
                + (f", CFG {cfg:g}" if cfg is not None else ""))


def model_defaults(projector: PortraitBoothModel) -> ModelDefaults:
    """The defaults a Projector socket carries (its file's metadata, checked when it loaded)."""
    if not isinstance(projector, PortraitBoothModel):
        raise TypeError(f"projector carries {type(projector).__name__}; connect the projector output of "
                        f"Load PortraitBooth Model")
    return ModelDefaults(file=os.path.basename(projector.path or "") or "the PortraitBooth file",
                         identity_kind=projector.info.face_encoder.kind, inference=projector.info.inference)


class ConditioningContractError(ValueError):
    """A CONDITIONING carries a PortraitBooth entry this pack cannot read."""


@dataclass(frozen=True)
class STEAEntry:
    """Where Apply STEA put the identities, and what else it found in the prompt.

    Positions index the concatenated conditioning (chunk * 77 + index), as the tensor.
    class_positions: one per subject, in subject order (face, face_2, ...).
    expression_positions/words: the prompt's expression words, found with the model's
    emotion_words (its own list, or every word of the vocabulary).
    class_copies: PhotoMaker's stacked class tokens (SDXL), per subject every copy's
    position; empty where each subject has one token (class_positions is then all there is).
    """
    base: str
    class_positions: tuple[int, ...]
    class_copies: tuple[tuple[int, ...], ...] = ()
    expression_positions: tuple[int, ...] = ()
    expression_words: tuple[str, ...] = ()
    emotion_words: tuple[str, ...] = DEFAULT_EMOTION_WORDS

    def __post_init__(self):
        if len(self.expression_positions) != len(self.expression_words):
            raise ConditioningContractError(
                f"STEA entry has {len(self.expression_positions)} expression positions but "
                f"{len(self.expression_words)} expression words; they come in pairs")
        if self.class_copies and (len(self.class_copies) != len(self.class_positions)
                                  or any(p not in c for p, c in zip(self.class_positions, self.class_copies))):
            raise ConditioningContractError("STEA entry's class_copies do not hold one group per class position")

    def subject_tokens(self) -> tuple[tuple[int, ...], ...]:
        """Per subject, every token that carries its identity (one on SD1.5, the copies on SDXL)."""
        return self.class_copies or tuple((p,) for p in self.class_positions)

    def to_dict(self) -> dict[str, Any]:
        # Empty and default fields are left out: the dict stays as small as the prompt needs.
        out: dict[str, Any] = {"class_positions": [int(p) for p in self.class_positions], "base": self.base}
        if self.class_copies:
            out["class_copies"] = [[int(p) for p in group] for group in self.class_copies]
        if self.expression_positions:
            out["expression_positions"] = [int(p) for p in self.expression_positions]
            out["expression_words"] = [str(w) for w in self.expression_words]
        if tuple(self.emotion_words) != DEFAULT_EMOTION_WORDS:
            out["emotion_words"] = [str(w) for w in self.emotion_words]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "STEAEntry":
        if not isinstance(data, dict) or not isinstance(data.get("class_positions"), (list, tuple)):
            raise ConditioningContractError(
                f"the CONDITIONING's '{STEA_KEY}' entry is not Apply STEA Conditioning's (got "
                f"{type(data).__name__} without class_positions); re-encode the prompt with Apply STEA "
                f"Conditioning of this pack, or check that no other node pack writes '{STEA_KEY}'")
        try:
            return cls(base=str(data.get("base", "sd15")),
                       class_positions=tuple(int(p) for p in data["class_positions"]),
                       class_copies=tuple(tuple(int(p) for p in group) for group in data.get("class_copies", ())),
                       expression_positions=tuple(int(p) for p in data.get("expression_positions", ())),
                       expression_words=tuple(str(w) for w in data.get("expression_words", ())),
                       emotion_words=tuple(str(w) for w in data.get("emotion_words", DEFAULT_EMOTION_WORDS)))
        except (TypeError, ValueError) as exc:
            raise ConditioningContractError(f"the CONDITIONING's '{STEA_KEY}' entry is malformed ({exc}); "
                                            f"re-encode the prompt with Apply STEA Conditioning") from None

    def expression_labels(self) -> dict[str, list[int]]:
        """{expression word: its positions}, in prompt order (for capture labels)."""
        labels: dict[str, list[int]] = {}
        for word, position in zip(self.expression_words, self.expression_positions):
            labels.setdefault(word, []).append(position)
        return labels


def write_stea(extra: dict, entry: STEAEntry) -> dict:
    """A copy of a conditioning's extra dict with `entry` stored in it."""
    return {**extra, STEA_KEY: entry.to_dict()}


def stea_of(extra: dict) -> STEAEntry | None:
    """The entry of one conditioning item's extra dict, or None (e.g. plain CLIPTextEncode)."""
    return STEAEntry.from_dict(extra[STEA_KEY]) if STEA_KEY in extra else None


def read_stea(conditioning: Sequence | None) -> STEAEntry | None:
    """The entry of the first item of a CONDITIONING that has one, or None."""
    for _cond, extra in conditioning or ():
        entry = stea_of(extra)
        if entry is not None:
            return entry
    return None


def identity_item(conditioning: Sequence | None) -> tuple[Any, dict, STEAEntry] | None:
    """(tensor, extra, entry) of the first item whose entry places at least one identity."""
    for cond, extra in conditioning or ():
        entry = stea_of(extra)
        if entry is not None and entry.class_positions:
            return cond, extra, entry
    return None
