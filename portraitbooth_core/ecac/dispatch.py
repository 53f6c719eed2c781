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
- never waits for the device: sigma stays a tensor (`LayerCall.sigma`), schedule windows
  are decided on the device (`in_window`) and applied with `torch.where`, once per model
  evaluation (`PerEvaluation`), and index tensors are made once. On a GPU, where a UNet
  step at small batch is launch-bound, one `.item()` per layer stalls the whole queue;
- moves with the model as IPAdapter's `Attn2Replace` does (`.to(device)`: per-device
  copies of the callbacks' kwargs, picked by q's device), so adopting its callbacks
  does not pin them to one GPU.

Nothing here imports ComfyUI: the fused attention comes in as `attention_fn`
(signature of comfy.ldm.modules.attention.optimized_attention).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Protocol, Sequence, Union

import torch
from einops import rearrange

COND = 0  # ComfyUI's cond_or_uncond value for the positive (cond) chunk
NO_SIGMA = 999999999.9  # what IPAdapter assumes when extra_options has no sigmas
# ComfyUI's percent_to_sigma(0.0) is NO_SIGMA: a window starting there has no upper bound.

# A schedule decision: known on the host (a float sigma, no sigma, or a window that holds
# every sigma), or a 0-dim/1-element bool tensor on the device.
Gate = Union[bool, torch.Tensor]


@dataclass
class LayerCall:
    """What one attn2 call knows about itself, derived from extra_options."""
    block: tuple                  # ("input", 7) etc.
    block_index: int              # transformer index inside the block
    heads: int
    size: tuple[int, int]         # (h, w) of this layer's activations
    latent_size: tuple[int, int]  # (H, W) of the UNet input
    # Current sigma: a 1-element tensor on the device, the same object for every layer of
    # one model evaluation (never read on the host); a float when a caller gives one;
    # None outside a sampler (training).
    sigma: torch.Tensor | float | None
    cond_rows: list[int]          # batch rows that belong to cond chunks
    chunk_size: int               # rows per chunk

    @property
    def name(self) -> str:
        return f"{self.block[0]}.{self.block[1]}.{self.block_index}"


_last_sigma: tuple = (None, -1, None)  # (transformer_options["sigmas"], its version, its first element)


def _version(t: torch.Tensor) -> int:
    """t's in-place write counter; inference tensors (ComfyUI samples in inference mode)
    have none: -1, their identity alone tells evaluations apart."""
    return -1 if t.is_inference() else t._version


def _sigma_of(sigmas: torch.Tensor) -> torch.Tensor:
    """The evaluation's sigma as a 1-element tensor view, no host read. ComfyUI passes one
    sigma per latent (usually one); the first is the evaluation's, as before. The view is
    cached per sigmas tensor, so all layers of an evaluation share one object."""
    global _last_sigma
    if sigmas.numel() == 1:
        return sigmas
    held, version, first = _last_sigma
    if held is sigmas and version == _version(sigmas):
        return first
    first = sigmas.reshape(-1)[:1]
    _last_sigma = (sigmas, _version(sigmas), first)
    return first


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
    sigma = _sigma_of(sigmas) if torch.is_tensor(sigmas) else None
    block = tuple(extra_options.get("block") or ("unknown", 0))
    return LayerCall(block, int(extra_options.get("block_index", 0)), int(extra_options["n_heads"]),
                     size, latent_size, sigma, rows, per)


def in_window(sigma: torch.Tensor | float | None, start: float, end: float) -> Gate:
    """Whether end <= sigma <= start. Host bool when that is known without the device's
    value (no sigma: inside; a float; a window holding every sigma a sampler uses: end <= 0,
    start inf or ComfyUI's NO_SIGMA); else a bool tensor on sigma's device."""
    if sigma is None:
        return True
    if not torch.is_tensor(sigma):
        return end <= sigma <= start
    lower, upper = end > 0, start < NO_SIGMA  # sigmas are >= 0
    if not (lower or upper):
        return True
    if sigma.dtype not in (torch.float32, torch.float64):
        sigma = sigma.float()
    gate = sigma >= _bound(end, sigma.dtype, True) if lower else None
    if upper:
        below = sigma <= _bound(start, sigma.dtype, False)
        gate = below if gate is None else gate & below
    return gate


@functools.lru_cache(maxsize=256)
def _bound(value: float, dtype: torch.dtype, up: bool) -> float:
    """The nearest `dtype` value at or above (up) / below `value`. The device compares in
    sigma's dtype; against this bound it gives exactly the float64 comparison the host made
    before (sigma >= end <=> sigma >= the smallest dtype value >= end)."""
    exact = torch.tensor(value, dtype=torch.float64)
    rounded = exact.to(dtype)
    if (rounded.double() < exact) if up else (rounded.double() > exact):
        rounded = torch.nextafter(rounded, torch.tensor(math.inf if up else -math.inf, dtype=dtype))
    return float(rounded)


def like(x: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor:
    """x as a tensor on ref's device (a float, or another evaluation's sigma after the model
    moved); x itself, no op, when it already is one there."""
    if torch.is_tensor(x) and x.device == ref.device:
        return x
    return torch.as_tensor(x, dtype=ref.dtype, device=ref.device)


def gate_and(a: Gate, b: Gate) -> Gate:
    if a is False or b is False:
        return False
    if a is True:
        return b
    return a if b is True else a & b


def gate_or(gates: Sequence[Gate]) -> Gate:
    """Any of them: True/False when the host knows, else a device bool."""
    out: Gate = False
    for g in gates:
        if g is True:
            return True
        if g is not False:
            out = g if out is False else out | g
    return out


class PerEvaluation:
    """Values derived from one model evaluation's sigma, made at its first layer and reused
    by the rest. ComfyUI gives every layer of an evaluation the same sigmas tensor and makes
    a new one per evaluation, so the tensor's identity (and version, should it be written in
    place) marks the evaluation; nothing is read from the device. A float or None sigma is
    compared by value (direct callers, training)."""

    def __init__(self):
        self._started = False
        self._sigma: Any = None  # held: its identity cannot be reused while we compare with it
        self._version = -1
        self.values: dict[Hashable, Any] = {}

    def same(self, sigma: Any) -> bool:
        if not self._started:
            return False
        if torch.is_tensor(sigma) or torch.is_tensor(self._sigma):
            return sigma is self._sigma and _version(sigma) == self._version
        return sigma == self._sigma

    def begin(self, sigma: Any) -> bool:
        """Start tracking `sigma`'s evaluation; True when it is a new one (values cleared)."""
        if self.same(sigma):
            return False
        self._started, self._sigma = True, sigma
        self._version = _version(sigma) if torch.is_tensor(sigma) else -1
        self.values = {}
        return True

    def get(self, sigma: Any, key: Hashable, make: Callable[[], Any]) -> Any:
        self.begin(sigma)
        if key not in self.values:
            self.values[key] = make()
        return self.values[key]


def host_sigma(sigma: torch.Tensor | float | None) -> float:
    """sigma as a float for IPAdapter-style callbacks, whose contract compares floats. A
    device read, so once per evaluation (cached), and only where such callbacks are held."""
    global _host_sigma
    if sigma is None:
        return NO_SIGMA
    if not torch.is_tensor(sigma):
        return float(sigma)
    held, version, value = _host_sigma
    if held is not sigma or version != _version(sigma):
        value = float(sigma.reshape(-1)[0])
        _host_sigma = (sigma, _version(sigma), value)
    return value


_host_sigma: tuple = (None, -1, 0.0)


class AttentionHook(Protocol):
    """A reader or editor of cross-attention probabilities (cond rows only).

    Decided on the host, no device read: `wants` (run at all). `modifies` may be a Gate:
    a device bool means "edits in this evaluation when true"; the dispatcher then selects
    between the edited output and ComfyUI's own with torch.where. A hook whose gate is
    false must return the probabilities unchanged from `process`."""

    def wants(self, call: LayerCall) -> bool: ...
    def modifies(self, call: LayerCall) -> Gate: ...
    def process(self, probs: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """probs: (rows, heads, h*w, tokens) float32; return them (edited or not)."""


def _dense_rows(t: torch.Tensor, rows: "RowIndex | None") -> tuple[torch.Tensor, int, int]:
    """(tensor, first row, row count) for the rows picked by `rows`: the tensor itself with
    a range when the rows are contiguous, a gathered copy otherwise."""
    if rows is None or rows.all:
        return t, 0, t.shape[0]
    if rows.start is None:
        t = t.index_select(0, rows.index(t.device))
        return t, 0, t.shape[0]
    return t, rows.start, rows.count


def head_view(t: torch.Tensor, heads: int, rows: "RowIndex | None" = None) -> torch.Tensor:
    """(b, n, heads*d) -> (rows, heads, n, d), the rows picked by `rows` (all when None).
    One as_strided view where the rows are a contiguous range of a row-dense tensor (the
    usual case), instead of a slice + view + transpose: on a GPU each op is a launch."""
    t, start, count = _dense_rows(t, rows)
    n, inner = t.shape[1], t.shape[2]
    d = inner // heads
    # Not under autograd (training): as_strided's backward is the generic, slower one.
    if not t.requires_grad and t.stride(-1) == 1 and (n == 1 or t.stride(1) == inner):
        return t.as_strided((count, heads, n, d), (t.stride(0), d, inner, 1), t.storage_offset() + start * t.stride(0))
    return t[start:start + count].unflatten(-1, (heads, d)).transpose(1, 2)


def _one_row_heads(t: torch.Tensor, heads: int, rows: "RowIndex | None", transposed: bool = False
                   ) -> torch.Tensor | None:
    """The single picked row of (b, n, heads*d) as (heads, n, d), or (heads, d, n) when
    `transposed`: one view op for the bmm paths. None when it is not one dense row."""
    t, start, count = _dense_rows(t, rows)
    n, inner = t.shape[1], t.shape[2]
    if count != 1 or t.requires_grad or t.stride(-1) != 1 or not (n == 1 or t.stride(1) == inner):
        return None
    d = inner // heads
    shape, strides = ((heads, d, n), (d, 1, inner)) if transposed else ((heads, n, d), (d, inner, 1))
    return t.as_strided(shape, strides, t.storage_offset() + start * t.stride(0))


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, rows: "RowIndex | None" = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, float32: (rows, heads, n, tokens), the rows
    picked by `rows` (all when None)."""
    q1 = _one_row_heads(q, heads, rows)
    k1 = _one_row_heads(k, heads, rows, transposed=True)
    if q1 is not None and k1 is not None:  # one row: a bmm over heads, fewer launches than a 4-D matmul
        logits = torch.bmm(q1.float(), k1.float())
        return (logits * q1.shape[-1] ** -0.5).softmax(dim=-1)[None]
    qh = head_view(q, heads, rows).float()
    kh = head_view(k, heads, rows).float()
    return (qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(dim=-1)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, rows: "RowIndex | None" = None) -> torch.Tensor:
    """probs (rows, heads, n, tokens) applied to v (b, tokens, heads*d), the rows picked by
    `rows` (all when None): (rows, n, heads*d)."""
    heads, n = probs.shape[1], probs.shape[2]
    v1 = _one_row_heads(v, heads, rows) if probs.shape[0] == 1 and not probs.requires_grad else None
    if v1 is not None:  # one row: bmm straight into the (n, heads*d) layout
        out = torch.empty(1, n, v.shape[-1], dtype=v.dtype, device=v.device)
        d = v1.shape[-1]
        torch.bmm(probs.reshape(heads, n, -1).to(v.dtype), v1, out=out.as_strided((heads, n, d), (d, heads * d, 1)))
        return out
    vh = head_view(v, heads, rows)
    return rearrange(probs.to(v.dtype) @ vh, "b h n d -> b n (h d)")


class RowIndex:
    """The cond rows of a batch, made once per (rows, batch) and device: a slice where they
    are contiguous (a view, no kernel), else an index tensor built once."""

    _cache: dict[tuple, "RowIndex"] = {}

    def __init__(self, rows: Sequence[int], batch: int):
        self.rows, self.batch, self.count = tuple(rows), batch, len(rows)
        contiguous = self.rows == tuple(range(self.rows[0], self.rows[0] + self.count)) if rows else True
        self.start = (self.rows[0] if rows else 0) if contiguous else None
        self._index: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def of(cls, rows: Sequence[int], batch: int) -> "RowIndex":
        key = (tuple(rows), batch)
        found = cls._cache.get(key)
        if found is None:
            found = cls._cache[key] = cls(rows, batch)
        return found

    @property
    def all(self) -> bool:
        return self.count == self.batch

    def index(self, device: torch.device) -> torch.Tensor:
        if device not in self._index:
            # shared by every model and run: a normal tensor even when first made while
            # ComfyUI samples in inference mode (training may index with it later)
            with torch.inference_mode(False):
                self._index[device] = torch.tensor(self.rows, dtype=torch.long, device=device)
        return self._index[device]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.all:
            return t
        if self.start is not None:
            return t[self.start:self.start + self.count]
        return t.index_select(0, self.index(t.device))

    def put(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """full with these rows replaced by part (a new tensor)."""
        if self.all:
            return part.to(full.dtype)
        return full.index_copy(0, self.index(full.device), part.to(full.dtype))


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
        elif all(getattr(h, "reads_fused", False) and h.modifies(call) is False for h in active):
            # Readers that take their maps from a fused kernel of their own: ComfyUI's
            # output as it is (bit-identical), no explicit softmax.
            out = self._base(q, k, v, extra_options)
            rows = RowIndex.of(call.cond_rows, q.shape[0])
            for hook in active:
                hook.read(q, k, rows, call)
        else:
            out = self._hooked(q, k, v, extra_options, call, active)
        if self.callback:
            sigma = host_sigma(call.sigma)  # their contract compares floats: read once per evaluation
            on_device = self.get_multigpu_kwargs(q.device)
            for cb, kw, kw_here in zip(self.callback, self.kwargs, on_device):
                if kw.get("sigma_end", 0.0) <= sigma <= kw.get("sigma_start", NO_SIGMA):
                    out = out + cb(out, q, k, v, extra_options, **kw_here)
        return out.to(dtype)

    def _biased(self, q, k, v, extra_options, call: LayerCall, active: list) -> torch.Tensor:
        """Hooks that only re-weight tokens offer `logit_bias(call, tokens, device)`, an
        (h*w, tokens) log-weight added to the logits (what their `process` does to the
        probabilities). It rides on the fused kernel as an attention mask: no explicit
        softmax, one call for all rows (zero bias on the uncond rows). A hook may offer
        `batch_bias(call, tokens, rows, dtype, device)`, that mask ready for the batch
        (made once per evaluation and layer size)."""
        tokens = k.shape[1]
        rows = RowIndex.of(call.cond_rows, q.shape[0])
        if len(active) == 1 and hasattr(active[0], "batch_bias"):
            mask = active[0].batch_bias(call, tokens, rows, q.dtype, q.device)
        else:
            mask = batch_mask(sum(h.logit_bias(call, tokens, q.device) for h in active), rows, q.dtype)
        return self.attention_fn(q, k, v, extra_options["n_heads"], mask=mask,
                                 attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)

    def _hooked(self, q, k, v, extra_options, call: LayerCall, active: list) -> torch.Tensor:
        rows = RowIndex.of(call.cond_rows, q.shape[0])
        probs = attention_probs(q, k, call.heads, rows)
        editing = gate_or([h.modifies(call) for h in active])
        for hook in active:
            probs = hook.process(probs, call)
        if editing is False:  # readers only: the output stays ComfyUI's own
            return self._base(q, k, v, extra_options)
        ours = apply_probs(probs, v, rows)
        if self.inner is not None:  # keep the wrapped patch's contribution
            full = self.inner(q, k, v, extra_options)
            ours = rows.take(full) + ours - self._fused(rows.take(q), rows.take(k), rows.take(v), extra_options)
        elif editing is not True:
            # Edits only while a device-side gate holds (a schedule window): ComfyUI's own
            # output for every row, the edited one where the gate is on. Bit-identical off.
            full = self._base(q, k, v, extra_options)
        elif rows.all:
            return ours
        else:
            cond = set(call.cond_rows)
            others = RowIndex.of([r for r in range(q.shape[0]) if r not in cond], q.shape[0])
            theirs = self._fused(others.take(q), others.take(k), others.take(v), extra_options).to(ours.dtype)
            if rows.start is not None and others.start is not None:  # two ranges (CFG's chunks): one cat
                return torch.cat([ours, theirs] if rows.start < others.start else [theirs, ours])
            full = others.put(torch.zeros(q.shape[0], q.shape[1], ours.shape[-1], dtype=ours.dtype,
                                          device=ours.device), theirs)
        if editing is not True:
            # In place on a view of ComfyUI's fresh output (one op; a wrapped patch's own
            # output is left alone: it might keep it).
            if rows.start is not None and self.inner is None and not full.requires_grad:
                part = rows.take(full)
                torch.where(editing, ours.to(full.dtype), part, out=part)
                return full
            ours = torch.where(editing, ours.to(full.dtype), rows.take(full))
        return rows.put(full, ours)


def batch_mask(bias: torch.Tensor, rows: RowIndex, dtype: torch.dtype) -> torch.Tensor:
    """An (h*w, tokens) logit bias as an attention mask for the batch: on the cond rows,
    zero on the others. (1, 1, h*w, tokens) when every row is a cond row."""
    bias = bias.to(dtype)
    if rows.all:
        return bias[None, None]
    mask = torch.zeros(rows.batch, 1, *bias.shape, dtype=dtype, device=bias.device)
    return rows.put(mask, bias.expand(rows.count, 1, *bias.shape))
