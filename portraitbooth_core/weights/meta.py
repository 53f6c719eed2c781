"""What a PortraitBooth weight file says about itself, and the errors loading can raise.

The metadata lives in the safetensors header under "portraitbooth" as one JSON object,
so it can be read (and a wrong file rejected) without touching any tensor.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..stea.projector import PROJECTOR_KINDS, ProjectorConfig, UnknownProjectorKindError
from ..stea.projector_config import PROJECTOR_BASES
from ..vocabulary import DEFAULT_CLASS_WORDS, DEFAULT_EMOTION_WORDS, accepted_class_words

FORMAT_VERSION = 1
METADATA_KEY = "portraitbooth"
PROJECTOR_PREFIX = "stea."


class WeightFileError(ValueError):
    """Base of every problem with a PortraitBooth weight file."""


class NotPortraitBoothFileError(WeightFileError):
    pass


class CorruptWeightFileError(WeightFileError):
    pass


class MissingKeysError(WeightFileError):
    pass


class NewerFormatError(WeightFileError):
    pass


class WrongBaseModelError(WeightFileError):
    pass


class EmbeddingMismatchError(WeightFileError):
    pass


@dataclass(frozen=True)
class FaceEncoderSpec:
    """The face recognizer whose embeddings the projector was trained on."""

    kind: str          # portraitbooth_core.face Identity.kind, e.g. "arcface:antelopev2/glintr100.onnx"
    dim: int
    feature: str = "final"  # which recognizer output: the final normalized embedding
    description: str = ""   # for people, e.g. "CLIP ViT-L/14 image embedding"
    # Whether the model was trained on L2-normalised embeddings (Identity.normalized). None
    # (files written before it was recorded): normalised, except CLIP image embeddings (raw).
    normalized: bool | None = None
    # The face order (portraitbooth_core.face FACE_ORDERS) its training photos were picked
    # with; "" when not recorded.
    face_order: str = ""

    @property
    def family(self) -> str:
        return self.kind.split(":", 1)[0]

    @property
    def wants_normalized(self) -> bool:
        return self.normalized if self.normalized is not None else self.family != "clip_vision"


# Apply STEA's start_percent: a value below 0 (the node offers -1) means "what the file says".
FROM_FILE = -1.0
# The paper conditions on the identity from the first step; a file with no stored start gets this.
PAPER_START_PERCENT = 0.0


def check_schedule(start: float, end: float, start_note: str = "") -> None:
    """The one range check of the part of the schedule that carries the identity, wherever
    the start came from (the node, the API, a file): 0 <= start < end <= 1."""
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start < end <= 1.0):
        raise ValueError(f"need 0 <= start_percent < end_percent <= 1, got start_percent {start:g}{start_note} "
                         f"and end_percent {end:g}")


@dataclass(frozen=True)
class InferenceDefaults:
    """The inference settings a file says its model was made for (the metadata's "defaults",
    e.g. FastComposer's delayed identity: start_percent 0.3, CFG 5). None: the file says nothing."""

    start_percent: float | None = None
    cfg: float | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "InferenceDefaults":
        """Parse and range-check; ValueError names the bad entry."""
        def number(key: str) -> float | None:
            value = data.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"defaults.{key} is {value!r}, expected a number")
            return float(value)

        start, cfg = number("start_percent"), number("cfg")
        if start is not None:
            try:
                check_schedule(start, 1.0)
            except ValueError:
                raise ValueError(f"defaults.start_percent is {start:g}, expected 0 <= start_percent < 1") from None
        if cfg is not None and cfg <= 0:
            raise ValueError(f"defaults.cfg is {cfg:g}, expected a positive number")
        return cls(start, cfg)

    def start_percent_for(self, requested: float) -> tuple[float, str]:
        """(start_percent to use, where it came from) for a node input that may say FROM_FILE:
        a value of 0 or more is used as given; below 0 the file's start, else the paper's."""
        if requested >= 0 or math.isnan(requested):  # check_schedule refuses NaN with the others
            return float(requested), "set on the node"
        if self.start_percent is not None:
            return self.start_percent, "from the file"
        return PAPER_START_PERCENT, "the paper's default; the file stores none"


@dataclass(frozen=True)
class PortraitBoothInfo:
    projector: ProjectorConfig
    face_encoder: FaceEncoderSpec
    class_words: tuple[str, ...] = DEFAULT_CLASS_WORDS
    emotion_words: tuple[str, ...] = DEFAULT_EMOTION_WORDS
    training: dict = field(default_factory=dict)
    # class word -> the synonyms its training captions used ("man" -> ["boy"]): the model
    # accepts those too. Optional in the file; absent in files written before it existed.
    class_synonyms: dict = field(default_factory=dict)
    unet_patch: dict = field(default_factory=lambda: {"format": "none", "tensors": 0})
    # Inference defaults the model was made for, e.g. {"start_percent": 0.3} (FastComposer's
    # delayed conditioning), and where the weights came from. Optional in the file.
    defaults: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    base: str = "sd15"
    format_version: int = FORMAT_VERSION

    @property
    def inference(self) -> InferenceDefaults:
        """The typed view of `defaults` (checked when the file was read)."""
        return InferenceDefaults.from_dict(self.defaults)

    @property
    def accepted_words(self) -> tuple[str, ...]:
        """Every word Apply STEA attaches an identity to: class words, then their synonyms."""
        return accepted_class_words(self.class_words, self.class_synonyms)

    def to_json(self) -> str:
        return json.dumps({
            "format_version": self.format_version,
            "base": self.base,
            "face_encoder": {"kind": self.face_encoder.kind, "dim": self.face_encoder.dim,
                             "feature": self.face_encoder.feature,
                             **({"description": self.face_encoder.description}
                                if self.face_encoder.description else {}),
                             **({"normalized": self.face_encoder.normalized}
                                if self.face_encoder.normalized is not None else {}),
                             **({"face_order": self.face_encoder.face_order}
                                if self.face_encoder.face_order else {})},
            "projector": self.projector.to_dict(),
            "class_words": list(self.class_words),
            "emotion_words": list(self.emotion_words),
            **({"class_synonyms": {k: list(v) for k, v in self.class_synonyms.items()}}
               if self.class_synonyms else {}),
            "unet_patch": self.unet_patch,
            "training": self.training,
            **({"defaults": self.defaults} if self.defaults else {}),
            **({"source": self.source} if self.source else {}),
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> "PortraitBoothInfo":
        """Parse and validate; the format version is checked before anything else so a
        newer file says "upgrade" instead of failing on a field it renamed."""
        from ..bounded_json import load_json_bytes
        from ..paths import BadInputError

        try:  # bounded: a deeply nested text is refused, not a RecursionError
            data = load_json_bytes(text, f"{source}: its PortraitBooth metadata", max_bytes=100_000_000)
        except BadInputError as exc:
            raise CorruptWeightFileError(str(exc)) from None
        if not isinstance(data, dict):
            raise CorruptWeightFileError(f"{source}: its PortraitBooth metadata is not a JSON object.")
        version = data.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise CorruptWeightFileError(f"{source}: format_version is {version!r}, expected a positive integer.")
        if version > FORMAT_VERSION:
            raise NewerFormatError(
                f"{source} uses PortraitBooth file format {version}, but this node pack reads only up to "
                f"format {FORMAT_VERSION}. Update the PortraitBooth node pack (ComfyUI Manager or git pull).")
        base = str(data.get("base", ""))
        projector = data.get("projector")
        kind = str(projector.get("kind", "portraitbooth_mlp")) if isinstance(projector, dict) else ""
        # Each projector kind is made for one base: PortraitBooth's own and FastComposer's for
        # SD1.5, PhotoMaker's heads for SDXL.
        if kind in PROJECTOR_BASES and base != PROJECTOR_BASES[kind]:
            raise WrongBaseModelError(
                f"{source} says base model '{base or 'unknown'}', but its '{kind}' projector is made for "
                f"'{PROJECTOR_BASES[kind]}'. The file is damaged or was edited; import it again.")
        if kind not in PROJECTOR_BASES and base != "sd15":
            raise WrongBaseModelError(
                f"{source} was made for base model '{base or 'unknown'}', but PortraitBooth works with "
                f"Stable Diffusion 1.5 only. Use a PortraitBooth file trained on SD1.5.")
        try:
            face = data["face_encoder"]
            info = cls(
                projector=ProjectorConfig.from_dict(data["projector"]),
                face_encoder=FaceEncoderSpec(str(face["kind"]), int(face["dim"]), str(face.get("feature", "final")),
                                             str(face.get("description", "")), _optional_bool(face, "normalized"),
                                             str(face.get("face_order", ""))),
                class_words=tuple(str(w) for w in data["class_words"]),
                emotion_words=tuple(str(w) for w in data.get("emotion_words", DEFAULT_EMOTION_WORDS)),
                class_synonyms=_synonyms(data.get("class_synonyms", {})),
                training=dict(data.get("training", {})),
                unet_patch=dict(data.get("unet_patch", {"format": "none", "tensors": 0})),
                defaults=dict(data.get("defaults", {})), source=dict(data.get("source", {})),
                base=base, format_version=version)
        except UnknownProjectorKindError as exc:
            raise NewerFormatError(
                f"{source} holds a '{exc.kind}' projector, which this node pack does not know (it knows "
                f"{', '.join(PROJECTOR_KINDS)}). Update the PortraitBooth node pack (ComfyUI Manager or git pull).") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptWeightFileError(f"{source}: its PortraitBooth metadata is incomplete or malformed "
                                         f"(problem with {exc}).") from None
        if info.face_encoder.dim != info.projector.face_dim:
            raise CorruptWeightFileError(
                f"{source}: metadata says the face encoder gives {info.face_encoder.dim}-d embeddings but the "
                f"projector takes {info.projector.face_dim}-d.")
        if not info.class_words:
            raise CorruptWeightFileError(f"{source}: its metadata lists no class words.")
        try:  # a bad default is refused with the file, not later inside a node
            InferenceDefaults.from_dict(info.defaults)
        except ValueError as exc:
            raise CorruptWeightFileError(f"{source}: its metadata's {exc}. Re-export or import the file again.") \
                from None
        return info


def _optional_bool(data: dict, key: str) -> bool | None:
    value = data.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"face_encoder.{key} (expected true or false)")
    return value


def _synonyms(raw) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict) or not all(isinstance(v, list) and all(isinstance(w, str) for w in v)
                                            for v in raw.values()):
        raise ValueError("class_synonyms (expected an object of word lists)")
    return {str(k): tuple(v) for k, v in raw.items()}


def check_embedding(info: PortraitBoothInfo, kind: str | None, dim: int | None, normalized: bool | None = None,
                    face_order: str | None = None) -> str | None:
    """Raise when embeddings of (kind, dim) cannot feed this projector.

    A different dimension or recognizer family (arcface vs dlib) is an error: the
    projector would read noise. So is a normalised identity for a model trained on raw
    embeddings or the reverse (`normalized`): the vector's scale differs about twentyfold.
    Same family and dimension but another model file (e.g. buffalo_l's w600k_r50 vs
    antelopev2's glintr100), or photos picked by another face order than the model's
    training photos, still run, so those only return a warning for the caller to log.
    """
    want = info.face_encoder
    if dim is not None and int(dim) != want.dim:
        raise EmbeddingMismatchError(
            f"This PortraitBooth model expects {want.dim}-d face embeddings from '{want.kind}', but the face "
            f"encoder gives {dim}-d embeddings{f' ({kind})' if kind else ''}. Choose the '{want.kind}' face "
            f"encoder in the face nodes, or use a PortraitBooth file trained for this encoder.")
    if kind and kind.split(":", 1)[0] != want.family and "clip_vision" in (want.family, kind.split(":", 1)[0]):
        raise EmbeddingMismatchError(
            f"This PortraitBooth model ({info.projector.kind}) was trained on '{want.kind}' embeddings"
            f"{f' ({want.description})' if want.description else ''}, but the identity comes from '{kind}'. "
            + ("Make the identity with the CLIP vision encoder (a CLIP ViT-L/14 image embedding of the photo), "
               "not a face recognizer." if want.family == "clip_vision" else
               "Make the identity with a face recognizer (face analysis nodes), not the CLIP vision encoder; "
               "CLIP image embeddings feed FastComposer's projector only."))
    if kind and kind.split(":", 1)[0] != want.family:
        raise EmbeddingMismatchError(
            f"This PortraitBooth model was trained on '{want.kind}' embeddings, but the face embedding comes "
            f"from '{kind}'. Choose a '{want.family}' face encoder, or a PortraitBooth file trained for it.")
    if normalized is not None and bool(normalized) != want.wants_normalized:
        forms = {True: "L2-normalised", False: "raw (unnormalised)"}
        setting = ("embedding 'normalised' in Analyze Faces" if want.wants_normalized
                   else "embedding 'raw' in Analyze Faces" if want.family != "clip_vision"
                   else "the CLIP Vision Identity node")
        raise EmbeddingMismatchError(
            f"This PortraitBooth model was trained on {forms[want.wants_normalized]} '{want.kind}' embeddings, "
            f"but the identity holds {forms[bool(normalized)]} ones. Make the identity with {setting}, or use a "
            f"PortraitBooth file trained on {forms[bool(normalized)]} embeddings.")
    notes = []
    if kind and kind != want.kind:
        notes.append(f"face embeddings come from '{kind}' but this PortraitBooth model was trained on "
                     f"'{want.kind}'; same size, but identity may transfer less well")
    if face_order and want.face_order and face_order != want.face_order:
        notes.append(f"the identity's photos were picked by face order '{face_order}', this model's training "
                     f"photos by '{want.face_order}'; in photos with one face it makes no difference")
    return "; ".join(notes) or None
