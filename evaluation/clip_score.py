"""CLIP text-image score and expression coefficient, from local CLIP weights only.

The paper (after FastComposer) reports CLIP ViT-L/14 cosine similarity between the prompt
and the image, and an expression coefficient: the similarity of the prompt's emotion
word and the image. Nothing here downloads: the weights are a local folder in Hugging
Face layout (config.json + model.safetensors, e.g. a copy of openai/clip-vit-large-patch14)
or a single .safetensors file of a CLIPModel state dict (ViT-L/14 shape assumed unless a
config.json sits beside it).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from portraitbooth_core.vocabulary import WORD_TO_EMOTION
from portraitbooth_core.optional import require

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# openai/clip-vit-large-patch14, for a bare state-dict file with no config.json beside it.
VIT_L14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, vocab_size=49408),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14),
    projection_dim=768,
)
TOKENIZER_FILES = ("vocab.json", "merges.txt")


class ClipWeightsError(FileNotFoundError):
    """The CLIP weights or tokenizer files are not where the user said."""


def _has_tokenizer(folder: Path) -> bool:
    return all((folder / f).is_file() for f in TOKENIZER_FILES)


def _features(out) -> torch.Tensor:
    # transformers 4 returns the projected features; 5 wraps them in pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def emotion_words(prompt: str) -> list[str]:
    """Emotion words of ECAC's vocabulary in a prompt, as written ('smiling', 'in tears')."""
    text = prompt.lower()
    found = []
    for word in sorted(WORD_TO_EMOTION, key=len, reverse=True):  # "grossed out" before "out"
        if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) and not any(word in f for f in found):
            found.append(word)
    return found


class ClipScorer:
    """Cosine similarities of CLIP text and image embeddings."""

    def __init__(self, model, tokenizer, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.image_size = int(model.config.vision_config.image_size)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 -> CLIP's input: shortest side resized (bicubic), center crop, normalized."""
        from PIL import Image

        s = self.image_size
        out = []
        for img in images:
            pil = Image.fromarray(np.asarray(img, np.uint8))
            scale = s / min(pil.size)
            pil = pil.resize((max(s, round(pil.width * scale)), max(s, round(pil.height * scale))),
                             Image.Resampling.BICUBIC)
            left, top = (pil.width - s) // 2, (pil.height - s) // 2
            arr = np.asarray(pil.crop((left, top, left + s, top + s)), np.float32) / 255.0
            out.append((arr - CLIP_MEAN) / CLIP_STD)
        return torch.from_numpy(np.stack(out).transpose(0, 3, 1, 2)).float()

    @torch.no_grad()
    def image_embeddings(self, images: list[np.ndarray]) -> torch.Tensor:
        feats = _features(self.model.get_image_features(pixel_values=self.preprocess(images).to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings,
                                return_tensors="pt")
        feats = _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                       attention_mask=tokens["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    def text_image(self, images: list[np.ndarray], texts: list[str]) -> list[float]:
        """Cosine of each image with its own text (pairs), as CLIP-T is reported: raw, not x100."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not images:
            return []
        sims = (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1)
        return [float(v) for v in sims]

    def expression(self, images: list[np.ndarray], prompts: list[str]) -> list[float | None]:
        """Cosine of each image with the first emotion word of its prompt; None without one."""
        words = [(emotion_words(p) or [None])[0] for p in prompts]
        keep = [i for i, w in enumerate(words) if w]
        sims = self.text_image([images[i] for i in keep], [words[i] for i in keep])
        out: list[float | None] = [None] * len(images)
        for i, v in zip(keep, sims):
            out[i] = v
        return out


def load_clip(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
              device: str = "cpu") -> ClipScorer:
    """CLIP from a local folder (Hugging Face layout) or one .safetensors file. Never downloads."""
    transformers = require("transformers", "The CLIP text-image score")
    path = Path(path).expanduser()
    if not path.exists():
        raise ClipWeightsError(
            f"No CLIP weights at {path}. Give a local folder with config.json and model.safetensors "
            "(a copy of openai/clip-vit-large-patch14) or a .safetensors file of a CLIPModel; "
            "nothing is downloaded.")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ClipWeightsError(f"{path} has no config.json; it is not a CLIPModel folder.")
        model = transformers.CLIPModel.from_pretrained(str(path), local_files_only=True)
    else:
        if path.suffix != ".safetensors":
            raise ClipWeightsError(f"{path}: expected a folder or a .safetensors file")
        from safetensors.torch import load_file

        config_file = folder / "config.json"
        config = (transformers.CLIPConfig.from_json_file(str(config_file)) if config_file.is_file()
                  else transformers.CLIPConfig(**VIT_L14))
        model = transformers.CLIPModel(config)
        state = load_file(str(path))
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # tensors of other shapes: another model size
            raise ClipWeightsError(f"{path} does not fit the CLIP shape of "
                                   f"{config_file if config_file.is_file() else 'ViT-L/14'}: {exc}") from None
        # position_ids are a buffer some exports leave out; anything else missing is a wrong file.
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ClipWeightsError(f"{path} is not a CLIPModel state dict of this shape: {len(missing)} missing "
                                   f"keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else folder
    if not _has_tokenizer(tok_dir):
        raise ClipWeightsError(f"No CLIP tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tok_dir}; "
                               "put them beside the weights or give their folder.")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return ClipScorer(model, tokenizer, device)
