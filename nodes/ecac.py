"""ECAC nodes: ECAC Attention Patch (expression control + map capture) and Attention
Map Preview. ComfyUI glue only; the math is in portraitbooth_core.

The patch finds the identity and expression words by BPE ids in the prompt text (the
same text as the positive prompt), or takes the identity positions that Apply STEA
Conditioning stores in its CONDITIONING (cond dict "portraitbooth" -> "class_positions")
when that is connected. The capture store rides in model_options, so the preview node,
given the same MODEL after the sampler ran, shows what that sampler's run attended to.
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
from portraitbooth_core.ecac.expression_words import find_expression_tokens, find_word_tokens
from portraitbooth_core.ecac.layers import cross_attention_layers, install_on_layers, select_layers

log = logging.getLogger("portraitbooth")
CATEGORY = "PortraitBooth/ecac"
STORE_KEY = "portraitbooth_ecac"  # model_options key of the AttentionStore
CLIP_KEY = "l"
LAYER_CHOICES = {"16x16 layers (recommended)": "mid", "all cross-attention layers": "all"}


def comfy_attention(q, k, v, heads, **kwargs):
    # Looked up per call: ComfyUI picks optimized_attention at start-up (and from flags).
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(q, k, v, heads, **kwargs)


def prompt_positions(clip, text: str, identity_words: Sequence[str]) -> tuple[list, list]:
    """(identity matches, expression matches) of `text` under this CLIP's tokenizer."""
    words = tokenizer_words(clip.tokenizer, CLIP_KEY)
    chunks = clip.tokenize(text)[CLIP_KEY]
    return (find_word_tokens(chunks, identity_words, words.ids_of, words.ends_word, words.special),
            find_expression_tokens(chunks, words.ids_of, words.ends_word, words.special))


def stea_class_positions(conditioning) -> list[int] | None:
    if not conditioning:
        return None
    positions = conditioning[0][1].get("portraitbooth", {}).get("class_positions")
    return [int(p) for p in positions] if positions else None


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
        install_on_layers(attn2, chosen, lambda _l: control, comfy_attention)
    if capture and labels:
        store = AttentionStore(list(labels))
        hook = AttentionCapture(labels, store)
        install_on_layers(attn2, chosen, lambda _l: hook, comfy_attention)
        patched.model_options[STORE_KEY] = store
    return patched, store


class ECACAttentionPatch(io.ComfyNode):
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
                io.Clip.Input("clip", tooltip="The CLIP that encodes the prompt; used only to find the words."),
                io.String.Input("text", multiline=True, default="a photo of a smiling woman",
                                tooltip="The positive prompt, as given to the text encoder."),
                io.String.Input("identity_words", default="man, woman, person, boy, girl",
                                tooltip="Words that stand for the person (ignored when a STEA conditioning "
                                        "with class positions is connected)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="0 leaves sampling bit-identical to the unpatched model."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("end_percent", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Layout and expression are set early; later steps refine texture."),
                io.Float.Input("beta", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Cap on the identity word's attention inside the face."),
                io.Float.Input("gamma", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Floor on each expression word's attention inside the face."),
                io.Combo.Input("layers", options=list(LAYER_CHOICES), default=next(iter(LAYER_CHOICES))),
                io.Boolean.Input("capture_maps", default=True, tooltip="Record word maps for the preview node."),
                io.Mask.Input("face_mask", optional=True,
                              tooltip="Where the face goes. Without it, the identity word's own attention at "
                                      "the previous step decides (from the second step on)."),
                io.Conditioning.Input("stea_conditioning", optional=True,
                                      tooltip="Apply STEA Conditioning's output: its class-word positions "
                                              "are the identity tokens."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, clip, text, identity_words, strength, start_percent, end_percent, beta, gamma,
                layers, capture_maps, face_mask=None, stea_conditioning=None) -> io.NodeOutput:
        id_hits, expr_hits = prompt_positions(clip, text, parse_words(identity_words))
        identity = stea_class_positions(stea_conditioning) or [h.position for h in id_hits]
        expression = [h.position for h in expr_hits]
        if not identity:
            log.warning("ECAC: no identity word (%s) in the prompt; only expression words are steered.",
                        identity_words)
        if not expression:
            log.warning("ECAC: the prompt has no expression word (e.g. smiling, sad, angry); nothing to steer "
                        "toward, the identity cap still applies.")
        labels: dict[str, list[int]] = {}
        if identity:
            labels[" + ".join(dict.fromkeys(h.word for h in id_hits)) or "identity"] = identity
        for hit in expr_hits:
            labels.setdefault(hit.word, []).append(hit.position)
        sampling = model.get_model_object("model_sampling")
        settings = ControlSettings(strength=strength, beta=beta, gamma=gamma,
                                   sigma_start=sampling.percent_to_sigma(start_percent),
                                   sigma_end=sampling.percent_to_sigma(end_percent))
        patched, _ = apply_ecac(model, identity, expression, labels, settings, face_mask,
                                LAYER_CHOICES[layers], capture_maps)
        return io.NodeOutput(patched)


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


class AttentionMapPreview(io.ComfyNode):
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
