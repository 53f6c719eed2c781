"""One object per attn2 replace key that several attention patches can share.

ComfyUI keeps one callable per `patches_replace["attn2"][key]`. IPAdapter-style packs
look at that slot and call `.add(callback, **kwargs)` on whatever sits there (their
callbacks return a residual added to the attention output, gated by
kwargs["sigma_start"] >= sigma >= kwargs["sigma_end"]); a plain function in the slot
breaks them, and a later plain replace silently drops theirs. `Attn2Dispatcher`:

- accepts `.add()` with that exact contract, so such packs applied after ours stack on it;
- wraps whatever sat in the slot before us: IPAdapter's own `Attn2Replace` is adopted
  (its callbacks move over, exact), any other callable becomes `inner` and keeps its
  output, with our change added as a delta (out_inner + ours - fused);
- runs our hooks (capture, control), which see the cond rows' attention probabilities.
  Only calls where a hook is active pay for an explicit softmax; the rest take the same
  fused attention ComfyUI would have run, so an idle dispatcher is bit-identical;
- moves with the model as IPAdapter's `Attn2Replace` does (`.to(device)`: per-device
  copies of the callbacks' kwargs, picked by q's device), so adopting its callbacks
  does not pin them to one GPU.

Nothing here imports ComfyUI: the fused attention comes in as `attention_fn`
(signature of comfy.ldm.modules.attention.optimized_attention).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from einops import rearrange

COND = 0  # ComfyUI's cond_or_uncond value for the positive (cond) chunk
NO_SIGMA = 999999999.9  # what IPAdapter assumes when extra_options has no sigmas


@dataclass
class LayerCall:
    """What one attn2 call knows about itself, derived from extra_options."""
    block: tuple                  # ("input", 7) etc.
    block_index: int              # transformer index inside the block
    heads: int
    size: tuple[int, int]         # (h, w) of this layer's activations
    latent_size: tuple[int, int]  # (H, W) of the UNet input
    sigma: float | None           # current sigma, None outside a sampler (training)
    cond_rows: list[int]          # batch rows that belong to cond chunks
    chunk_size: int               # rows per chunk

    @property
    def name(self) -> str:
        return f"{self.block[0]}.{self.block[1]}.{self.block_index}"


def layer_call(q: torch.Tensor, extra_options: dict) -> LayerCall:
    b, n = q.shape[0], q.shape[1]
    latent = extra_options.get("original_shape")
    act = extra_options.get("activations_shape")
    if act is not None and act[-2] * act[-1] == n:
        size = (int(act[-2]), int(act[-1]))
    elif latent is not None:  # keep the latent's aspect ratio
        h = max(1, round(math.sqrt(n * latent[-2] / latent[-1])))
        size = (h, n // h)
    else:
        side = int(math.isqrt(n))
        size = (side, n // side)
    latent_size = (int(latent[-2]), int(latent[-1])) if latent is not None else size
    chunks = list(extra_options.get("cond_or_uncond") or [COND])
    per = b // max(len(chunks), 1)
    rows = [c * per + i for c, kind in enumerate(chunks) if kind == COND for i in range(per)]
    sigmas = extra_options.get("sigmas")
    sigma = float(sigmas.reshape(-1)[0]) if torch.is_tensor(sigmas) else None
    block = tuple(extra_options.get("block") or ("unknown", 0))
    return LayerCall(block, int(extra_options.get("block_index", 0)), int(extra_options["n_heads"]),
                     size, latent_size, sigma, rows, per)


class AttentionHook(Protocol):
    """A reader or editor of cross-attention probabilities (cond rows only)."""

    def wants(self, call: LayerCall) -> bool: ...
    def modifies(self, call: LayerCall) -> bool: ...
    def process(self, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """probs: (rows, heads, h*w, tokens) float32; return them (edited or not)."""


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, float32: (b, heads, n, tokens)."""
    qh = rearrange(q, "b n (h d) -> b h n d", h=heads).float()
    kh = rearrange(k, "b t (h d) -> b h t d", h=heads).float()
    return (qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(dim=-1)


def apply_probs(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (b, heads, n, tokens) applied to v (b, tokens, heads*d): (b, n, heads*d)."""
    vh = rearrange(v, "b t (h d) -> b h t d", h=probs.shape[1])
    return rearrange(probs.to(v.dtype) @ vh, "b h n d -> b n (h d)")


def _rows(t: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    return t if len(rows) == t.shape[0] else t[torch.as_tensor(rows, device=t.device)]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Tensors in a kwargs value, also inside dicts, lists and tuples (IPAdapter's cond_alt)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif type(value) in (list, tuple):
        for v in value:
            yield from _tensors(v)


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_moved(v, device) for v in value)
    return value


def _kwargs_for(kwargs: dict, device: torch.device) -> dict:
    """One callback's kwargs for calls on `device`: the same dict when all its tensors are
    there already (one GPU: no copies), else a copy with them moved; a module offering
    `create_multigpu_clone` (IPAdapter's adapter: its callback picks the clone by q's device)
    gets a clone there. Like IPAdapter, the tensors decide whether anything moves."""
    if all(t.device == device for t in _tensors(kwargs)):
        return kwargs
    for value in kwargs.values():
        if hasattr(value, "create_multigpu_clone"):
            value.create_multigpu_clone(device)
    return {key: _moved(value, device) for key, value in kwargs.items()}


class Attn2Dispatcher:
    """attn2 replace callable shared by our hooks and IPAdapter-style `.add()` patches."""

    def __init__(self, attention_fn: Callable, hooks: Sequence[AttentionHook] = (), inner: Callable | None = None):
        self.attention_fn = attention_fn
        self.hooks = list(hooks)
        self.inner = inner
        self.callback: list[Callable] = []  # IPAdapter's attribute names: others may read them
        self.kwargs: list[dict] = []
        self.multigpu_kwargs: dict[torch.device, list[dict]] = {}  # made by .to(), per device

    def get_multigpu_kwargs(self, device: torch.device) -> list[dict]:
        """The callbacks' kwargs for a call on `device` (IPAdapter's name for it)."""
        return self.multigpu_kwargs.get(device, self.kwargs)

    def add(self, callback: Callable, **kwargs: Any) -> None:
        """IPAdapter's contract: out += callback(out, q, k, v, extra_options, **kwargs) while
        kwargs['sigma_start'] >= sigma >= kwargs['sigma_end']."""
        self.callback.append(callback)
        self.kwargs.append(kwargs)
        for device, copies in self.multigpu_kwargs.items():  # added after .to(): it moves too
            copies.append(_kwargs_for(kwargs, device))

    def to(self, device: Any, *args: Any, **kwargs: Any) -> "Attn2Dispatcher":
        """ComfyUI's ModelPatcher.model_patches_to(x) calls `.to(x)` on each patch that has one
        (and skips the rest): with the load device on every load (with MultiGPU work units, once
        per GPU's copy of the model), then with the model's dtype, and with the offload device on
        unload. IPAdapter's Attn2Replace answers a device with per-device copies of its kwargs;
        the callbacks we adopted from it get the same here, by its rules: dtypes and the CPU are
        ignored (IPAdapter stays on its load device; copying its module to the CPU on every
        unload would only cost memory). Our hooks are shared by all layers and bring their
        tensors to q's device themselves, so they stay. ComfyUI puts the result back in the slot.
        """
        if self.inner is not None and hasattr(self.inner, "to"):  # as ComfyUI would have moved it
            self.inner = self.inner.to(device, *args, **kwargs)
        if isinstance(device, torch.device) and device.type != "cpu" and device not in self.multigpu_kwargs:
            self.multigpu_kwargs[device] = [_kwargs_for(kw, device) for kw in self.kwargs]
        return self

    def with_hook(self, hook: AttentionHook) -> "Attn2Dispatcher":
        """A copy with one more hook; the model we were cloned from keeps its own."""
        new = copy.copy(self)
        new.hooks = [*self.hooks, hook]
        new.callback, new.kwargs = list(self.callback), list(self.kwargs)
        new.multigpu_kwargs = {device: list(copies) for device, copies in self.multigpu_kwargs.items()}
        return new

    def _fused(self, q, k, v, extra_options: dict) -> torch.Tensor:
        return self.attention_fn(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                 transformer_options=extra_options)

    def _base(self, q, k, v, extra_options: dict) -> torch.Tensor:
        return self.inner(q, k, v, extra_options) if self.inner is not None else self._fused(q, k, v, extra_options)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        dtype = q.dtype
        call = layer_call(q, extra_options)
        active = [h for h in self.hooks if h.wants(call)] if call.cond_rows else []
        if not active:
            out = self._base(q, k, v, extra_options)
        elif self.inner is None and all(hasattr(h, "logit_bias") for h in active):
            out = self._biased(q, k, v, extra_options, call, active)
        else:
            out = self._hooked(q, k, v, extra_options, call, active)
        if self.callback:
            sigma = call.sigma if call.sigma is not None else NO_SIGMA
            on_device = self.get_multigpu_kwargs(q.device)
            for cb, kw, kw_here in zip(self.callback, self.kwargs, on_device):
                if kw.get("sigma_end", 0.0) <= sigma <= kw.get("sigma_start", NO_SIGMA):
                    out = out + cb(out, q, k, v, extra_options, **kw_here)
        return out.to(dtype)

    def _biased(self, q, k, v, extra_options, call: LayerCall, active: list) -> torch.Tensor:
        """Hooks that only re-weight tokens offer `logit_bias(call, tokens, device)`, an
        (h*w, tokens) log-weight added to the logits (what their `process` does to the
        probabilities). It rides on the fused kernel as an attention mask: no explicit
        softmax, one call for all rows (zero bias on the uncond rows)."""
        tokens = k.shape[1]
        bias = sum(h.logit_bias(call, tokens, q.device) for h in active).to(q.dtype)
        if len(call.cond_rows) == q.shape[0]:
            mask = bias[None, None]
        else:
            mask = torch.zeros(q.shape[0], 1, q.shape[1], tokens, dtype=q.dtype, device=q.device)
            mask[torch.as_tensor(call.cond_rows, device=q.device)] = bias
        return self.attention_fn(q, k, v, extra_options["n_heads"], mask=mask,
                                 attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)

    def _hooked(self, q, k, v, extra_options, call: LayerCall, active: list) -> torch.Tensor:
        rows = call.cond_rows
        qc, kc, vc = _rows(q, rows), _rows(k, rows), _rows(v, rows)
        probs = attention_probs(qc, kc, call.heads)
        editing = any(h.modifies(call) for h in active)
        for hook in active:
            probs = hook.process(probs, call)
        if not editing:  # readers only: the output stays ComfyUI's own
            return self._base(q, k, v, extra_options)
        ours = apply_probs(probs, vc)
        if self.inner is not None:  # keep the wrapped patch's contribution
            full = self.inner(q, k, v, extra_options)
            ours = _rows(full, rows) + ours - self._fused(qc, kc, vc, extra_options)
        elif len(rows) == q.shape[0]:
            return ours
        else:
            cond = set(rows)
            others = [r for r in range(q.shape[0]) if r not in cond]
            full = torch.zeros(q.shape[0], q.shape[1], ours.shape[-1], dtype=ours.dtype, device=ours.device)
            idx = torch.as_tensor(others, device=q.device)
            full = full.index_copy(0, idx, self._fused(_rows(q, others), _rows(k, others), _rows(v, others),
                                                        extra_options).to(ours.dtype))
        return full.index_copy(0, torch.as_tensor(rows, device=q.device), ours.to(full.dtype))
