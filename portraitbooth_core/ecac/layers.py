"""Which cross-attention layers a UNet has, and putting a hook on them without
evicting other packs' patches.

The UNet is walked by duck typing (class names of ComfyUI's openaimodel/attention
modules), so this stays ComfyUI-free and works for any depth or level count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .dispatch import Attn2Dispatcher, AttentionHook


@dataclass(frozen=True)
class CrossAttnLayer:
    block: str    # "input" | "middle" | "output"
    number: int   # block id as ComfyUI numbers it
    index: int    # transformer index inside the block
    depth: int    # transformers in that block
    factor: int   # activation downsampling vs the latent (1, 2, 4, 8)

    @property
    def name(self) -> str:
        return f"{self.block}.{self.number}.{self.index}"


def _scan(module, block: str, number: int, factor: int, out: list) -> int:
    """Record transformers of one block; return the factor after it (down/upsampling)."""
    for layer in module:
        kind = type(layer).__name__
        if kind == "SpatialTransformer":
            blocks = layer.transformer_blocks
            depth = len(blocks)
            for i, tb in enumerate(blocks):
                if getattr(tb, "attn2", None) is not None:
                    out.append(CrossAttnLayer(block, number, i, depth, factor))
        elif kind == "Downsample":
            factor *= 2
        elif kind == "Upsample":
            factor //= 2
    return factor


def cross_attention_layers(diffusion_model) -> list[CrossAttnLayer]:
    """Every attn2 of an openaimodel-style UNet (SD1.5, SDXL), in execution order."""
    layers: list[CrossAttnLayer] = []
    factor = 1
    for i, blk in enumerate(diffusion_model.input_blocks):
        factor = _scan(blk, "input", i, factor, layers)
    if diffusion_model.middle_block is not None:  # None in UNets without one (e.g. KOALA's)
        factor = _scan(diffusion_model.middle_block, "middle", 0, factor, layers)
    for i, blk in enumerate(diffusion_model.output_blocks):
        factor = _scan(blk, "output", i, factor, layers)
    return layers


def select_layers(layers: Sequence[CrossAttnLayer], which: str = "mid") -> list[CrossAttnLayer]:
    """'all', or 'mid': the 1/4-resolution layers (16x16 at 512 px, where FastComposer
    and prompt-to-prompt read word maps: coarse enough to be semantic, fine enough to
    outline a face); models without that level get their coarsest layers."""
    if which == "all" or not layers:
        return list(layers)
    if which != "mid":
        raise ValueError(f"layer selection must be 'mid' or 'all', got {which!r}")
    factors = {l.factor for l in layers}
    target = 4 if 4 in factors else max(factors)
    return [l for l in layers if l.factor == target]


def comfy_attention(q, k, v, heads, **kwargs):
    """ComfyUI's own attention (the nodes and training use this one function).

    Looked up per call, not at import: ComfyUI picks optimized_attention at start-up and
    from its flags, and the core must import without ComfyUI.
    """
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(q, k, v, heads, **kwargs)


def install_hook(attn2: dict, layer: CrossAttnLayer, hook: AttentionHook,
                 attention_fn: Callable = comfy_attention) -> tuple:
    """Put `hook` on one layer of a patches_replace["attn2"] dict (edited in place: pass
    the copy ModelPatcher.clone made). Returns the key used.

    ComfyUI looks up (block, number, index) first, then (block, number) for every
    transformer of the block. IPAdapter uses the 2-tuple for SD1.5, so for one-transformer
    blocks we use it too, or a later IPAdapter would create a 2-tuple patch that our
    3-tuple one shadows. What already sits in the effective slot gets wrapped.
    """
    key2, key3 = (layer.block, layer.number), (layer.block, layer.number, layer.index)
    existing_key = key3 if key3 in attn2 else key2 if key2 in attn2 else None
    target = key2 if layer.depth == 1 and existing_key != key3 else key3
    existing = attn2.get(existing_key) if existing_key is not None else None
    if isinstance(existing, Attn2Dispatcher):
        attn2[target] = existing.with_hook(hook)
    elif existing is None:
        attn2[target] = Attn2Dispatcher(attention_fn, [hook])
    elif _is_ipadapter_replace(existing):
        ours = Attn2Dispatcher(attention_fn, [hook])
        for cb, kw in zip(existing.callback, existing.kwargs):
            ours.add(cb, **kw)
        attn2[target] = ours
    else:
        attn2[target] = Attn2Dispatcher(attention_fn, [hook], inner=existing)
    return target


def _is_ipadapter_replace(obj) -> bool:
    # IPAdapter_plus's Attn2Replace: fused attention + residual callbacks, nothing else,
    # so adopting its callbacks is exact and saves a second fused attention.
    return (type(obj).__name__ == "Attn2Replace" and isinstance(getattr(obj, "callback", None), list)
            and isinstance(getattr(obj, "kwargs", None), list) and len(obj.callback) == len(obj.kwargs))


def install_on_layers(attn2: dict, layers: Iterable[CrossAttnLayer], make_hook: Callable[[CrossAttnLayer], AttentionHook],
                      attention_fn: Callable = comfy_attention) -> list[tuple]:
    return [install_hook(attn2, layer, make_hook(layer), attention_fn) for layer in layers]
