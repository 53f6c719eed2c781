"""ECAC on a real (tiny, random) SD1.5 UNet through ComfyUI's sampler and patch machinery."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import load_pack
from portraitbooth_core.ecac.control import ControlSettings
from portraitbooth_core.ecac.layers import cross_attention_layers, select_layers

ID, EXPR = [5], [3]  # "a photo of a smiling woman": woman at 5, smiling at 4 -> any fixed ids do here
LABELS = {"woman": ID, "smiling": EXPR}


@pytest.fixture(scope="module")
def ecac():
    load_pack()
    return importlib.import_module("portraitbooth_pack_under_test.nodes.ecac")


def sample(model, latent_shape=(1, 4, 8, 8), steps=2, cfg=5.0, seed=0):
    import comfy.sample

    gen = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(1, 77, 768, generator=gen), {}]]
    neg = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed,
                               disable_pbar=True)


def test_layers_of_the_tiny_and_the_full_sd15_unet(tiny_model):
    tiny = cross_attention_layers(tiny_model.get_model_object("diffusion_model"))
    assert [(l.block, l.number, l.factor) for l in tiny] == [("input", 1, 1), ("middle", 0, 1), ("output", 0, 1),
                                                              ("output", 1, 1)]
    assert select_layers(tiny, "mid") == tiny  # one level: its coarsest layers are all of them

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from benchmarks.ecac_cost import SD15_FULL

    full = cross_attention_layers(UNetModel(**SD15_FULL, device="meta", operations=comfy.ops.disable_weight_init))
    assert [(l.block, l.number) for l in full] == ([("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)]
                                                   + [("output", i) for i in range(3, 12)])
    mid = select_layers(full, "mid")
    assert [(l.block, l.number) for l in mid] == [("input", 7), ("input", 8), ("output", 3), ("output", 4),
                                                  ("output", 5)]


def test_strength_zero_is_bit_identical_and_strength_one_is_not(tiny_model, ecac):
    base = sample(tiny_model)
    zero, store = ecac.apply_ecac(tiny_model, ID, EXPR, LABELS, ControlSettings(strength=0.0))
    assert torch.equal(sample(zero), base)
    assert store.mean() is not None  # the capture ran, and still nothing changed
    mask = torch.ones(64, 64)
    one, _ = ecac.apply_ecac(tiny_model, ID, EXPR, LABELS, ControlSettings(strength=1.0, beta=0.01, gamma=0.3),
                             mask=mask, capture=False)
    assert not torch.allclose(sample(one), base, atol=1e-4)


def test_capture_batch_two_cfg_non_square(tiny_model, ecac):
    patched, store = ecac.apply_ecac(tiny_model, ID, EXPR, LABELS, ControlSettings(strength=0.0))
    sample(patched, latent_shape=(2, 4, 6, 10), steps=3)
    maps = store.mean()
    assert maps.shape == (2, 2, 6, 10)  # cond rows only (CFG's uncond half skipped), latent-sized
    assert store.steps == 3 and torch.isfinite(maps).all() and (maps > 0).all() and (maps < 1).all()
    assert not torch.allclose(maps[0], maps[1])  # two different samples, two different maps


# A stand-in for ComfyUI_IPAdapter_plus (GPL-3.0), written here from its contract as of its
# commit f204d6f ("MultiGPU Work Units") and later: CrossAttentionPatch.Attn2Replace (fused
# attention plus residual callbacks, `.add()`, `.to(device)` making per-device kwargs copies),
# IPAdapterPlus.set_model_patch_replace (`.add()` on whatever sits at the key) and the adapter
# module's create/get_multigpu_clone. Weights are tiny and random; the keys are the real ones.

NO_SIGMA = 999999999.9  # percent_to_sigma(0.0): IPAdapter's sigma_start for start_at=0
EMBED = 16  # width of the stand-in image embedding (768 for the real SD1.5 adapters; any works)
# IPAdapter's SD1.5 keys in its order (module_key = 2 * position + 1) with each layer's width.
# ("middle", 1) is its own spelling: ComfyUI calls SD1.5's middle block ("middle", 0), so that
# one never runs (upstream's bug, kept: it is what a user of the real pack gets).
IPADAPTER_SD15 = ([(("input", i), w) for i, w in zip((1, 2, 4, 5, 7, 8), (320, 320, 640, 640, 1280, 1280))]
                  + [(("output", i), w) for i, w in zip(range(3, 12), (1280,) * 3 + (640,) * 3 + (320,) * 3)]
                  + [(("middle", 1), 1280)])


class StandInAdapter(torch.nn.Module):
    """The adapter module: image-embedding K/V projections per layer, and one clone per extra device."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.to_kvs = torch.nn.ParameterDict({
            f"{2 * n + 1}_to_{kv}_ip": torch.nn.Parameter(torch.randn(width, EMBED, generator=gen) / EMBED ** 0.5,
                                                          requires_grad=False)
            for n, (_, width) in enumerate(IPADAPTER_SD15) for kv in "kv"})
        self.multigpu_clones: dict = {}

    def create_multigpu_clone(self, device):
        if device not in self.multigpu_clones:
            clones, self.multigpu_clones = self.multigpu_clones, {}  # the clone must not copy the others
            try:
                clones[device] = copy.deepcopy(self).to(device)
            finally:
                self.multigpu_clones = clones

    def get_multigpu_clone(self, device):
        return self.multigpu_clones.get(device, self)


class Attn2Replace:
    """IPAdapter's attn2 replace object (same name: ECAC recognises it by it)."""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]
        self.multigpu_kwargs = {}

    def get_multigpu_kwargs(self, device):
        return self.multigpu_kwargs.get(device, self.kwargs)

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = extra_options["sigmas"].detach().cpu()[0].item() if "sigmas" in extra_options else NO_SIGMA
        on_device = self.get_multigpu_kwargs(q.device)
        for i, cb in enumerate(self.callback):
            if self.kwargs[i]["sigma_end"] <= sigma <= self.kwargs[i]["sigma_start"]:
                out = out + cb(out, q, k, v, extra_options, **on_device[i])
        return out.to(q.dtype)

    def to(self, device, *args, **kwargs):
        # ModelPatcher.model_patches_to passes the load device, then the model's dtype, and the
        # offload device on unload; IPAdapter copies only for a non-CPU device its cond is not on.
        if (not isinstance(device, torch.device) or device.type == "cpu" or device in self.multigpu_kwargs
                or self.kwargs[0]["cond"] is None or self.kwargs[0]["cond"].device == device):
            return self
        copies = []
        for kw in self.kwargs:
            kw = dict(kw)
            for key, value in kw.items():
                if key == "ipadapter":
                    value.create_multigpu_clone(device)
                elif type(value) is torch.Tensor:  # top-level tensors only, as upstream
                    kw[key] = value.to(device)
            copies.append(kw)
        self.multigpu_kwargs[device] = copies
        return self


CALLS = []  # (block, q's device, devices of everything the callback computed with)


def ipadapter_attention(out, q, k, v, extra_options, module_key="", ipadapter=None, weight=1.0, cond=None,
                        uncond=None, **_):
    """IPAdapter's callback, reduced: attention of q over the projected image embedding, times weight."""
    from comfy.ldm.modules.attention import optimized_attention

    ipa = ipadapter.get_multigpu_clone(q.device)
    wk, wv = ipa.to_kvs[module_key + "_to_k_ip"], ipa.to_kvs[module_key + "_to_v_ip"]
    CALLS.append((extra_options["block"], q.device, {cond.device, uncond.device, wk.device, wv.device}))
    chunks = extra_options["cond_or_uncond"]
    per = q.shape[0] // len(chunks)
    emb = torch.cat([(cond, uncond)[c].repeat(per, 1, 1) for c in chunks]).to(q.dtype)
    ip_k, ip_v = F.linear(emb, wk.to(q.dtype)), F.linear(emb, wv.to(q.dtype))
    return optimized_attention(q, ip_k, ip_v, extra_options["n_heads"]) * weight


def set_model_patch_replace(model, patch_kwargs: dict, key: tuple) -> None:
    # As upstream: copy the dicts down to attn2; a free key gets an Attn2Replace, a taken one .add().
    to = model.model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    attn2 = to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
    if key in attn2:
        attn2[key].add(ipadapter_attention, **patch_kwargs)
    else:
        attn2[key] = Attn2Replace(ipadapter_attention, **patch_kwargs)
    model.model_options["transformer_options"] = to


def apply_ipadapter(model, weight=0.3, seed=0):
    """IPAdapter Advanced on an SD1.5 model, start 0, end 1: all 16 of its keys."""
    model = model.clone()
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = dict(ipadapter=StandInAdapter(seed), weight=weight, cond=torch.randn(1, 4, EMBED, generator=gen),
                  cond_alt=None, uncond=torch.zeros(1, 4, EMBED), weight_type="linear", mask=None,
                  sigma_start=NO_SIGMA, sigma_end=0.0, unfold_batch=False, embeds_scaling="V only")
    for n, (key, _) in enumerate(IPADAPTER_SD15):
        set_model_patch_replace(model, dict(kwargs, module_key=str(2 * n + 1)), key)
    return model


def test_coexists_with_ipadapter_in_either_order(tiny_model, ecac):
    settings = ControlSettings(strength=1.0, beta=0.01, gamma=0.3)
    mask = torch.ones(64, 64)
    base, other = sample(tiny_model), sample(apply_ipadapter(tiny_model))
    ours = sample(ecac.apply_ecac(tiny_model, ID, EXPR, LABELS, settings, mask)[0])
    CALLS.clear()
    ours_then_other, store = ecac.apply_ecac(tiny_model, ID, EXPR, LABELS, settings, mask)
    a = sample(apply_ipadapter(ours_then_other))
    # Of IPAdapter's keys the tiny UNet has only ("input", 1): 2 steps, CFG batched; ours ran too.
    assert [c[0] for c in CALLS] == [("input", 1)] * 2 and store.mean() is not None
    other_then_ours, store2 = ecac.apply_ecac(apply_ipadapter(tiny_model), ID, EXPR, LABELS, settings, mask)
    attn2 = other_then_ours.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert type(attn2[("input", 1)]).__name__ == "Attn2Dispatcher"  # IPAdapter's callback adopted
    b = sample(other_then_ours)
    assert store2.mean() is not None
    assert torch.equal(a, b)  # same composition, bit for bit, whichever pack came first
    for alone in (base, other, ours):
        assert not torch.allclose(a, alone, atol=1e-4)


@pytest.fixture(scope="module")
def sd15_layout():
    """A ModelPatcher around SD1.5's real block layout on the meta device: for layer walking and
    patch bookkeeping (nothing is sampled on it)."""
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from benchmarks.ecac_cost import SD15_FULL

    holder = torch.nn.Module()
    holder.diffusion_model = UNetModel(**SD15_FULL, device="meta", operations=comfy.ops.disable_weight_init)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(holder, cpu, cpu)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _kwargs_on(device, kwargs: dict) -> bool:
    """Everything an IPAdapter callback given these kwargs computes with on `device` lives there."""
    weights = list(kwargs["ipadapter"].get_multigpu_clone(device).parameters())
    return all(t.device == device for t in [*_tensors(kwargs), *weights])


@pytest.mark.parametrize("layers, adopted", [("mid", 5), ("all", 15)])
@pytest.mark.parametrize("ecac_first", [True, False], ids=["ecac-then-ipadapter", "ipadapter-then-ecac"])
def test_adopted_ipadapter_callbacks_move_with_the_model(ecac, sd15_layout, layers, adopted, ecac_first,
                                                        monkeypatch):
    """ComfyUI moves attn2 patches with the model: ModelPatcher.model_patches_to(device) calls
    `.to(device)` on each; IPAdapter's Attn2Replace answers with per-device copies of its kwargs
    (MultiGPU work units run one copy of the model per GPU) and its callback picks them by q's
    device. Callbacks our dispatcher holds must get the same. The meta device plays a second GPU."""
    settings = ControlSettings(strength=1.0, beta=0.01, gamma=0.3)

    def with_ecac(model):
        return ecac.apply_ecac(model, ID, EXPR, LABELS, settings, torch.ones(64, 64), layers=layers)[0]

    model = apply_ipadapter(with_ecac(sd15_layout)) if ecac_first else with_ecac(apply_ipadapter(sd15_layout))
    attn2 = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    theirs = {key: p for key, p in attn2.items() if getattr(p, "callback", None)}
    held = [key for key, p in theirs.items() if type(p).__name__ == "Attn2Dispatcher"]
    assert len(theirs) == 16 and len(held) == adopted

    meta, cpu = torch.device("meta"), torch.device("cpu")
    model.model_patches_to(meta)                 # what ModelPatcher does on loading to a device
    model.model_patches_to(torch.float32)        # ... then with the model's dtype: not a device
    attn2 = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    stuck = sorted(str(key) for key in theirs
                   if not all(_kwargs_on(meta, kw) for kw in getattr(attn2[key], "multigpu_kwargs", {}).get(
                       meta, attn2[key].kwargs)))
    assert stuck == [], f"{len(stuck)} of 16 IPAdapter layers keep device-0 kwargs: {stuck}"
    model.model_patches_to(cpu)  # unloading: IPAdapter keeps to its load device, so no CPU copies
    assert all(cpu not in attn2[key].multigpu_kwargs for key in theirs)

    # A call on the other device: the adopted callback computes with that device's copies.
    import comfy.ldm.modules.attention as attention

    # ComfyUI's CPU default (sub-quadratic attention) asks the device for free memory: meta has none.
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    key = ("output", 3)  # a 16x16 layer (1280 wide): held by our dispatcher in both selections
    assert key in held
    q = torch.empty(2, 64, 1280, device=meta)
    kv = torch.empty(2, 77, 1280, device=meta)
    extra = {"n_heads": 8, "dim_head": 160, "block": key, "block_index": 0, "transformer_index": 0,
             "cond_or_uncond": [1], "original_shape": [2, 4, 32, 32], "activations_shape": [2, 1280, 8, 8]}
    CALLS.clear()
    out = attn2[key](q, kv, kv, extra)  # uncond rows only: our hooks stay idle, IPAdapter's acts
    assert out.device == meta and CALLS == [(key, meta, {meta})]


def test_dispatcher_move_rules():
    """The rest of `.to()`: one device costs no copies, nested tensors move, a callback added
    after the move moves too, copies made by with_hook stay apart, a wrapped patch with its
    own `.to` is moved as ComfyUI would have moved it."""
    from portraitbooth_core.ecac.dispatch import Attn2Dispatcher

    meta, cpu = torch.device("meta"), torch.device("cpu")
    moved = []

    class Inner:
        def __call__(self, q, k, v, extra_options):
            return q

        def to(self, device, *args, **kwargs):
            moved.append(device)
            return self

    d = Attn2Dispatcher(lambda *a, **kw: None, inner=Inner())
    d.add(ipadapter_attention, cond=torch.zeros(1, device=meta))
    for target in (meta, torch.float16, cpu):  # load, dtype, unload
        assert d.to(target) is d
    assert moved == [meta, torch.float16, cpu] and list(d.multigpu_kwargs) == [meta]
    assert d.get_multigpu_kwargs(meta)[0] is d.kwargs[0]  # already there: no copy
    twin = d.with_hook(object())
    d.add(ipadapter_attention, cond=torch.zeros(1), cond_alt={3: torch.zeros(1)}, extra=[torch.zeros(1)])
    late = d.get_multigpu_kwargs(meta)[1]
    assert [t.device for t in (late["cond"], late["cond_alt"][3], late["extra"][0])] == [meta] * 3
    assert d.kwargs[1]["cond"].device == cpu and len(twin.get_multigpu_kwargs(meta)) == 1


def test_wraps_a_plain_replace_function_without_losing_it(tiny_model, ecac):
    from comfy.ldm.modules.attention import optimized_attention

    def plain(q, k, v, extra_options):  # a pack that replaces attention outright
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    plain_model = tiny_model.clone()
    plain_model.set_model_attn2_replace(plain, "input", 1)
    alone = sample(plain_model)
    # Our idle hooks (strength 0, capture only) keep the wrapped function's output exactly.
    wrapped, store = ecac.apply_ecac(plain_model, ID, EXPR, LABELS, ControlSettings(strength=0.0))
    assert torch.equal(sample(wrapped), alone) and store.mean() is not None
    attn2 = wrapped.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert attn2[("input", 1)].inner is not None
    steered, _ = ecac.apply_ecac(plain_model, ID, EXPR, LABELS, ControlSettings(beta=0.01, gamma=0.3),
                                 mask=torch.ones(64, 64))
    assert not torch.allclose(sample(steered), alone, atol=1e-4)
