"""The projector's description, stored in a weight file's metadata: which network (its
kind) and its sizes. Apart from projector.py, which builds every kind, so that each
kind's module can read it without importing the others."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProjectorConfig:
    """Everything needed to rebuild the projector; stored in the weight file's metadata."""

    text_dim: int = 768   # CLIP-L hidden size (SD1.5)
    face_dim: int = 512   # ArcFace; 128 for dlib; 768 for FastComposer's CLIP image embedding
    hidden_dim: int = 1024
    # Which network: PROJECTOR_KINDS. Files written before the field existed hold
    # PortraitBooth's MLP, hence the default.
    kind: str = "portraitbooth_mlp"
    # Further integer sizes a kind needs beyond the three above (PhotoMaker's: CLIP width,
    # resampler depth and heads, ...), as sorted (name, value) pairs; empty for the others,
    # whose metadata then stays exactly as before.
    options: tuple[tuple[str, int], ...] = ()

    def option(self, name: str) -> int:
        return dict(self.options)[name]

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("options")
        if self.options:
            data["options"] = dict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ProjectorConfig":
        kind = str(data.get("kind", "portraitbooth_mlp"))
        if kind not in PROJECTOR_KINDS:
            raise UnknownProjectorKindError(kind)
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise ValueError("projector options (expected an object of integers)")
        return cls(**{k: int(data[k]) for k in ("text_dim", "face_dim", "hidden_dim")}, kind=kind,
                   options=tuple(sorted((str(k), int(v)) for k, v in options.items())))


# kind -> what it is; build_projector makes the module for each.
PROJECTOR_KINDS = {
    "portraitbooth_mlp": "PortraitBooth STEA MLP (face-recognizer embedding)",
    "fastcomposer_postfuse": "FastComposer postfuse MLP (CLIP ViT-L/14 image embedding)",
    "photomaker_v1": "PhotoMaker v1 ID encoder head (CLIP ViT-L/14 pooled output; SDXL)",
    "photomaker_v2": "PhotoMaker v2 ID encoder head (ArcFace embedding + CLIP ViT-L/14 patch tokens; SDXL)",
}
# The base model family a kind's projector is made for; kinds not listed: SD1.5.
PROJECTOR_BASES = {"photomaker_v1": "sdxl", "photomaker_v2": "sdxl"}


class UnknownProjectorKindError(ValueError):
    """A weight file names a projector network this version of the pack does not have."""

    def __init__(self, kind: str):
        self.kind = kind
        super().__init__(f"projector kind '{kind}' is not one this pack knows ({', '.join(PROJECTOR_KINDS)})")
