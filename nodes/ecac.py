"""ECAC nodes: ECAC Attention Patch (expression control + map capture) and Attention
Map Preview. ComfyUI glue only; the math is in portraitbooth_core.

The patch takes the identity and expression positions that Apply STEA Conditioning
stores in its CONDITIONING (a `contracts.STEAEntry`; expression words as the model lists
them) when that is connected; otherwise it finds the words by BPE ids in the prompt text
(the same text as the positive prompt) with the whole vocabulary. The capture store
rides in model_options, so the preview node, given the same MODEL after the sampler
ran, shows what that sampler's run attended to.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from comfy_api.latest import io

from portraitbooth_core.ecac.capture import AttentionCapture, AttentionStore
from portraitbooth_core.ecac.control import ControlSettings, ExpressionControl
from portraitbooth_core.ecac.preview import overlay_maps
from portraitbooth_core.stea.class_words import parse_words, tokenizer_words
from portraitbooth_core.ecac.expression_words import TokenMatch, matches
from portraitbooth_core.vocabulary import DEFAULT_CLASS_WORDS, expression_words
from portraitbooth_core.ecac.layers import cross_attention_layers, install_on_layers, select_layers

from .base import CheckedNode
from .contracts import read_stea

log = logging.getLogger("portraitbooth")
CATEGORY = "PortraitBooth/ecac"
STORE_KEY = "portraitbooth_ecac"  # model_options key of the AttentionStore
CLIP_KEY = "l"
LAYER_CHOICES = {"16x16 layers (recommended)": "mid", "all cross-attention layers": "all"}


def prompt_positions(clip, text: str, identity_words: Sequence[str],
                     emotion_words: Sequence[str] | None = None) -> tuple[list[TokenMatch], list[TokenMatch]]:
    """(identity matches, expression matches) of `text` under this CLIP's tokenizer.
    emotion_words: a model's list (categories or single words); None: the whole vocabulary."""
    words = tokenizer_words(clip.tokenizer, CLIP_KEY)  # caches a matcher per word list
    chunks = clip.tokenize(text)[CLIP_KEY]
    identity_words = [w for w in identity_words if w.strip()]
    return (matches(words.matcher(identity_words), chunks) if identity_words else [],
            matches(words.matcher(expression_words(emotion_words)), chunks))


def word_positions(clip, text: str, identity_words: Sequence[str], stea_conditioning=None
                   ) -> tuple[list[int], list[int], dict[str, list[int]]]:
    """(identity positions, expression positions, capture labels) for the patch.

    From Apply STEA's entry when the conditioning has one (no tokenizing: Apply STEA
    found them, with the model's emotion words); else from `text` with the vocabulary."""
    entry = read_stea(stea_conditioning)
    if entry is not None and entry.class_positions:
        # every token carrying an identity: PhotoMaker's stacked copies on SDXL, one per subject on SD1.5
        identity = [p for group in entry.subject_tokens() for p in group]
        labels = {"identity": list(identity)}
        for word, positions in entry.expression_labels().items():
            labels.setdefault(word, []).extend(positions)
        return identity, list(entry.expression_positions), labels
    if stea_conditioning:
        log.warning("ECAC: stea_conditioning carries no Apply STEA Conditioning output; finding the words in "
                    "the text input instead.")
    id_hits, expr_hits = prompt_positions(clip, text, identity_words)
    identity = [h.position for h in id_hits]
    labels = {" + ".join(dict.fromkeys(h.word for h in id_hits)): identity} if identity else {}
    for hit in expr_hits:
        labels.setdefault(hit.word, []).append(hit.position)
    return identity, [h.position for h in expr_hits], labels


def apply_ecac(model, identity: Sequence[int], expression: Sequence[int], labels: dict[str, list[int]],
               settings: ControlSettings, mask: torch.Tensor | None = None, layers: str = "mid",
               capture: bool = True):
    """A clone of `model` with the control (when strength > 0) and the capture on `layers`.
    Returns (model, store or None)."""
    patched = model.clone()
    unet = patched.get_model_object("diffusion_model")
    chosen = select_layers(cross_attention_layers(unet), layers)
    to = patched.model_options.setdefault("transformer_options", {})
    replace = to.setdefault("patches_replace", {})
    attn2 = replace.setdefault("attn2", {})
    store = None
    if settings.strength > 0:
        control = ExpressionControl(identity, expression, settings, mask)
        install_on_layers(attn2, chosen, lambda _l: control)
    if capture and labels:
        store = AttentionStore(list(labels))
        hook = AttentionCapture(labels, store)
        install_on_layers(attn2, chosen, lambda _l: hook)
        patched.model_options[STORE_KEY] = store
    return patched, store


class ECACAttentionPatch(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PortraitBoothECACPatch",
            display_name="ECAC Attention Patch",
            category=CATEGORY,
            description="Emotion-aware cross-attention control: inside the face, the identity word may take at "
                        "most beta of the attention and each expression word ('smiling', 'angry', ...) at least "
                        "gamma, so the face follows both. Also records word maps for Attention Map Preview. "
                        "Works beside IPAdapter-style patches on the same model.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the prompt; used only to find the words "
                                              "(not used when stea_conditioning is connected)."),
                io.String.Input("text", multiline=True, default="a photo of a smiling woman",
                                tooltip="The positive prompt, as given to the text encoder (not used when "
                                        "stea_conditioning is connected: Apply STEA already found the words)."),
                io.String.Input("identity_words", default=", ".join(DEFAULT_CLASS_WORDS),
                                tooltip="Words that stand for the person, comma separated (not used when "
                                        "stea_conditioning is connected)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="0 leaves sampling bit-identical to the unpatched model."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("end_percent", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Layout and expression are set early; later steps refine texture."),
                io.Float.Input("beta", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Cap on the identity word's attention inside the face."),
                io.Float.Input("gamma", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Floor on each expression word's attention inside the face."),
                io.Combo.Input("layers", options=list(LAYER_CHOICES), default=next(iter(LAYER_CHOICES)),
                               tooltip="Where to steer and record: the cross-attention layers at a quarter of "
                                       "the latent's resolution (16x16 at 512 px on SD1.5: 5 of 16 layers; "
                                       "32x32 at 1024 px on SDXL: 60 of 70), coarse enough to be about words, "
                                       "fine enough to outline a face; or every layer."),
                io.Boolean.Input("capture_maps", default=True, tooltip="Record word maps for the preview node."),
                io.Mask.Input("face_mask", optional=True,
                              tooltip="Where the face goes. Without it, the identity word's own attention at "
                                      "the previous step decides (from the second step on)."),
                io.Conditioning.Input("stea_conditioning", optional=True,
                                      tooltip="Apply STEA Conditioning's output: its class-word positions are "
                                              "the identity tokens and its expression words (those the "
                                              "PortraitBooth model lists) are the ones steered toward."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, clip, text, identity_words, strength, start_percent, end_percent, beta, gamma,
                layers, capture_maps, face_mask=None, stea_conditioning=None) -> io.NodeOutput:
        if face_mask is not None:
            _check_face_mask(face_mask)
        identity, expression, labels = word_positions(clip, text, parse_words(identity_words), stea_conditioning)
        if not identity:
            log.warning("ECAC: no identity word (%s) in the prompt; only expression words are steered.",
                        identity_words)
        if not expression:
            log.warning("ECAC: the prompt has no expression word (e.g. smiling, sad, angry); nothing to steer "
                        "toward, the identity cap still applies.")
        sampling = model.get_model_object("model_sampling")
        settings = ControlSettings(strength=strength, beta=beta, gamma=gamma,
                                   sigma_start=sampling.percent_to_sigma(start_percent),
                                   sigma_end=sampling.percent_to_sigma(end_percent))
        patched, _ = apply_ecac(model, identity, expression, labels, settings, face_mask,
                                LAYER_CHOICES[layers], capture_maps)
        return io.NodeOutput(patched)


def _check_face_mask(mask: torch.Tensor) -> None:
    """The same rule as the region sampler's masks: an empty mask would silently steer nothing."""
    from portraitbooth_core.regions.layout import EMPTY, emptiness

    peak = float(mask.detach().float().max()) if mask.numel() else 0.0
    if not peak >= EMPTY:  # also NaN
        raise ValueError(f"face_mask is {emptiness(peak) if peak == peak else 'not a number (NaN)'}: paint where "
                         f"the face is, or leave face_mask unconnected to let the identity word's own attention "
                         f"find the face.")


def _label(images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Write each word in the top-left corner (PIL's built-in font: no font files needed)."""
    from PIL import Image, ImageDraw

    out = []
    for img, text in zip(images, texts):
        pil = Image.fromarray((img.cpu().numpy() * 255).round().astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        box = draw.textbbox((4, 4), text)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
        draw.text((4, 4), text, fill=(255, 255, 255))
        out.append(torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0))
    return torch.stack(out).to(images.device)


class AttentionMapPreview(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PortraitBoothAttentionPreview",
            display_name="Attention Map Preview",
            category=CATEGORY,
            description="Shows where the identity and expression words landed in the last sampling run of a "
                        "model patched by ECAC Attention Patch (maps averaged over steps and layers).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of ECAC Attention Patch that the sampler used."),
                io.Image.Input("image", tooltip="The decoded image of that run."),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05),
            ],
            outputs=[io.Image.Output(tooltip="One overlay per image and word, the word written on it.")],
        )

    @classmethod
    def execute(cls, model, image, opacity) -> io.NodeOutput:
        store = model.model_options.get(STORE_KEY)
        if store is None:
            raise ValueError("Attention Map Preview needs the MODEL output of 'ECAC Attention Patch' with "
                             "capture_maps on.")
        maps = store.mean()
        if maps is None:
            raise ValueError("No attention maps recorded yet: connect this node's image input to the decoded "
                             "output of a sampler that used this same MODEL.")
        overlays = overlay_maps(image, maps, opacity)
        return io.NodeOutput(_label(overlays, store.labels * image.shape[0]))


NODES = [ECACAttentionPatch, AttentionMapPreview]
