"""Captioning training images that have no caption of their own.

A captioner turns a batch of RGB images into one caption each. The one shipped here is
BLIP image captioning on `transformers` (`BlipForConditionalGeneration`), loaded only from
a local folder (never downloaded), on the GPU in fp16 when there is one, batched.

What it writes is made to name the subject with a class word by the builder
(`captions.name_subject`): a caption with a class word or synonym is normalized as any
caption is; one without gets the word chosen from the face's gender/age estimate when the
face pack has that model (`vocabulary.class_word_for`), else the stated default.

    python -m training build photos/ data/ --captioner blip:models/blip-image-captioning-base
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from portraitbooth_core.bounded_json import read_json_file
from portraitbooth_core.optional import require

# Tokens BLIP models trained on web alt-text emit in place of a word ("arafed man");
# they mean nothing and would take a place in the 77-token window.
CAPTIONER_NOISE = ("arafed", "araffe", "arafe", "arafly", "araffy", "arald")


_NOISE = re.compile(r"\b(" + "|".join(CAPTIONER_NOISE) + r")\b\s*", re.IGNORECASE)


def clean_generated(caption: str) -> str:
    """A generated caption without captioner noise words and with single spaces."""
    return " ".join(_NOISE.sub("", caption).split())


class CaptionerError(ValueError):
    """A captioner that cannot be loaded or run; the message names the folder and the fix."""


@runtime_checkable
class Captioner(Protocol):
    """Anything that captions a batch of images."""

    name: str  # recorded in the samples it captioned ("blip:blip-image-captioning-base")

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        """One caption per H x W x 3 uint8 RGB image, in order."""
        ...


BLIP_HELP = ("put a BLIP image-captioning model there, as saved by transformers' save_pretrained: config.json, "
             "model.safetensors (or model.safetensors.index.json + its shards), preprocessor_config.json "
             "(or processor_config.json) and the tokenizer (tokenizer.json or vocab.txt, tokenizer_config.json), "
             "e.g. the files of Salesforce/blip-image-captioning-large or -base. Nothing is downloaded")


def check_blip_folder(folder: Path) -> None:
    """Raise CaptionerError naming what is missing from a BLIP folder, before transformers
    gets to fail with a message about the Hub."""
    if not folder.is_dir():
        raise CaptionerError(f"captioner folder not found: {folder}; {BLIP_HELP}.")
    have = {p.name for p in folder.iterdir()}
    needs = {"config.json": ("config.json",),
             "weights": ("model.safetensors", "model.safetensors.index.json"),
             "image processor config": ("preprocessor_config.json", "processor_config.json"),
             "tokenizer": ("tokenizer.json", "vocab.txt")}
    missing = [what for what, names in needs.items() if not have.intersection(names)]
    if missing:
        only_bin = "pytorch_model.bin" in have and "weights" in missing
        extra = (" (pytorch_model.bin is not loaded: weights are read from safetensors only; convert it with "
                 "save_pretrained(..., safe_serialization=True))") if only_bin else ""
        raise CaptionerError(f"captioner folder {folder} is incomplete: no {', no '.join(missing)}{extra}; "
                             f"{BLIP_HELP}.")
    try:
        model_type = read_json_file(folder / "config.json", str(folder / "config.json"),
                                    max_bytes=16 << 20).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise CaptionerError(f"{folder / 'config.json'} is not a readable model config ({exc}); {BLIP_HELP}.") from None
    if model_type != "blip":
        raise CaptionerError(f"{folder} holds a '{model_type}' model, not BLIP (config.json model_type must be "
                             f"'blip'); {BLIP_HELP}.")


class BlipCaptioner:
    """BLIP image captioning from a local folder.

    device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N". fp16 on a GPU unless
    `dtype` says otherwise. Greedy/beam decoding is deterministic: a rebuild writes the
    same captions. prompt: optional text the caption continues ("a photography of");
    it stays in the caption.
    """

    def __init__(self, folder: str | Path, device: str = "auto", batch_size: int = 16, max_new_tokens: int = 30,
                 num_beams: int = 3, prompt: str = "", dtype: str | None = None):
        self.folder = Path(folder)
        check_blip_folder(self.folder)
        if batch_size < 1:
            raise CaptionerError(f"captioner batch_size must be at least 1, got {batch_size}")
        torch = require("torch", "Captioning training images")
        transformers = require("transformers", "Captioning training images (--captioner blip:...)")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = dtype or ("fp16" if self.device.type == "cuda" else "fp32")
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        if dtype not in dtypes:
            raise CaptionerError(f"captioner dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
        self.dtype = dtypes[dtype]
        try:
            self.processor = transformers.BlipProcessor.from_pretrained(self.folder, local_files_only=True)
            blip = transformers.BlipForConditionalGeneration
            self.model = blip.from_pretrained(self.folder, local_files_only=True, use_safetensors=True, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise CaptionerError(f"could not load the BLIP captioner from {self.folder} "
                                 f"({type(exc).__name__}: {exc}); {BLIP_HELP}.") from exc
        self.model.to(self.device).eval()
        self.batch_size, self.max_new_tokens, self.num_beams = batch_size, max_new_tokens, num_beams
        self.prompt = prompt.strip()
        self.name = f"blip:{self.folder.name}"

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        import torch

        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [_rgb(im, start + i) for i, im in enumerate(images[start:start + self.batch_size])]
            kwargs = {"text": [self.prompt] * len(batch)} if self.prompt else {}
            inputs = self.processor(images=batch, return_tensors="pt", **kwargs).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                          do_sample=False)
            out += [clean_generated(t) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


def _rgb(image: np.ndarray, i: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise CaptionerError(f"image {i} to caption has shape {image.shape} and dtype {image.dtype}; "
                             f"expected H x W x 3 uint8 RGB")
    return image if image.flags.writeable else image.copy()  # torch warns on read-only arrays


CAPTIONERS = {"blip": BlipCaptioner}


def _parse(spec: str) -> tuple[str, str]:
    kind, sep, where = spec.partition(":")
    if not sep or kind not in CAPTIONERS or not where:
        raise CaptionerError(f"captioner {spec!r} is not KIND:FOLDER with KIND one of {', '.join(CAPTIONERS)} "
                             f"(e.g. blip:models/blip-image-captioning-large)")
    return kind, where


def check_captioner_spec(spec: str) -> None:
    """Raise CaptionerError when `spec` names no usable captioner folder, without loading it."""
    kind, where = _parse(spec)
    if kind == "blip":
        check_blip_folder(Path(where))


def load_captioner(spec: str, device: str = "auto", **options) -> Captioner:
    """A captioner from a command-line spec: "blip:FOLDER"."""
    kind, where = _parse(spec)
    return CAPTIONERS[kind](where, device=device, **options)
