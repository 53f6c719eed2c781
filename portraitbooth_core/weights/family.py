"""Which Stable Diffusion family a file or a loaded model belongs to; the one SD1.5 check.

Files: reads only the safetensors header (no weights), so it is cheap enough to run on
every file in a models folder and gives a precise error before anything is loaded.
Loaded models and conditionings: the text-context width tells the family.
"""
from __future__ import annotations

from pathlib import Path

from .safetensors_header import read_header

UNET = "model.diffusion_model."
SD15_CONTEXT = 768
# Text-context width -> family. 1280 is SDXL's refiner.
CONTEXT_FAMILIES = {768: "sd15", 1024: "sd2", 1280: "sdxl", 2048: "sdxl", 4096: "sd3/flux"}
FAMILY_NAMES = {"sd15": "SD1.5", "sd2": "SD2", "sdxl": "SDXL", "sd3/flux": "SD3/Flux"}


class NotSD15Error(ValueError):
    """A model or file of another family where PortraitBooth needs SD1.5."""


def context_family(context_dim: int | None) -> str:
    """'sd15', 'sd2', ... or 'unknown' for a text-context width."""
    return CONTEXT_FAMILIES.get(int(context_dim), "unknown") if context_dim else "unknown"


def family_label(context_dim: int | None) -> str:
    """A name for people: 'SD1.5', 'SDXL', or '<n>-channel' when unknown."""
    family = context_family(context_dim)
    return FAMILY_NAMES.get(family, f"{context_dim}-channel")


def model_context_dim(model) -> int | None:
    """Text-context width of a ComfyUI MODEL (ModelPatcher) or BaseModel, read duck-typed."""
    base = getattr(model, "model", model)
    config = getattr(getattr(base, "model_config", None), "unet_config", None) or {}
    return config.get("context_dim")


def require_sd15(context_dim: int | None, what: str, fix: str = "") -> None:
    """Raise NotSD15Error naming `what`, its family and `fix` unless the width is SD1.5's."""
    if context_dim != SD15_CONTEXT:
        raise NotSD15Error(f"{what} is not Stable Diffusion 1.5 ({family_label(context_dim)}, text context "
                           f"{context_dim}; SD1.5 has {SD15_CONTEXT}). PortraitBooth works with SD1.5 only"
                           + (f": {fix}" if fix else "."))


class WrongFamilyError(NotSD15Error):
    """A model of one family where a file made for another is used."""


def require_family(context_dim: int | None, base: str, what: str, file: str) -> None:
    """Raise WrongFamilyError naming both families unless the width is `base`'s ('sd15', 'sdxl')."""
    if context_family(context_dim) == base and (base != "sdxl" or context_dim == 2048):
        return
    want = FAMILY_NAMES.get(base, base)
    raise WrongFamilyError(f"{what} is {family_label(context_dim)} (text context {context_dim}), but {file} is made "
                           f"for {want}: connect the {what.removeprefix('the ')} of an {want} checkpoint, or a "
                           f"weight file made for {family_label(context_dim)}.")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(tensor name -> shape, metadata) from a .safetensors file's header (no size check;
    `read_header` from safetensors_header.py also refuses a truncated file)."""
    header = read_header(path, complete=False)
    return header.shapes, header.metadata


def family_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str = UNET) -> str:
    """'sd15', 'sd2', 'sdxl', or 'unknown' for a UNet state dict's shapes."""
    key = f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if f"{prefix}label_emb.0.0.weight" in shapes:
        return "sdxl"
    if key in shapes:
        context_dim = shapes[key][1]
        proj_in = shapes.get(f"{prefix}input_blocks.1.1.proj_in.weight", ())
        if context_dim == 768 and len(proj_in) == 4:
            return "sd15"
        if context_dim == 1024:
            return "sd2"
    if f"{prefix}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in shapes:
        dim = shapes[f"{prefix}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"][1]
        return context_family(dim)
    return "unknown"


def checkpoint_family(path: str | Path) -> str:
    shapes, _ = read_safetensors_header(path)
    return family_from_shapes(shapes)


def safetensors_expected_size(path: str | Path) -> int:
    """The byte size a complete .safetensors file with this header must have.

    Comparing it with the real size tells a truncated download from other corruption
    before any tensor is read. New code: `read_header(path)` makes that check itself.
    """
    return read_header(path, complete=False).expected_size
