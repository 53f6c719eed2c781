"""Dispatch budget: aten ops and host syncs per UNet evaluation, patched vs plain.

On a GPU at SD1.5 batch 2 a UNet evaluation is launch-bound: what a patch costs is the
number of small kernels it adds and every point where the host waits for the device.
Both can be counted on a CPU, exactly and without timing noise, with a
TorchDispatchMode: every aten op that reaches the dispatcher is one launch (or a view),
and these stall a GPU's queue:
  - ops that read a value to the host or whose output shape depends on the data
    (`_local_scalar_dense` behind .item()/float()/bool(), `nonzero`, `masked_select`,
    `unique`, `equal`, boolean-mask indexing, ...);
  - `lift_fresh`: a tensor made from Python data (`torch.tensor(list, device=...)`),
    a blocking host-to-device copy, which synchronises the stream;
  - `Tensor.tolist()`, `.cpu()`, `.numpy()`: on a CPU tensor they dispatch nothing,
    so they are counted at the Python level while counting.

One count = one `model.model.apply_model(...)` call (batch 2, cond + uncond as CFG
batches them, sigmas a tensor in transformer_options as the sampler passes it), after
one warm-up evaluation (first-call caches may compute things once). Each patch is
counted against the plain model on the same inputs:
  ecac_control   ECAC Attention Patch as the node makes it (strength 1, face mask,
                 start 0 / end 0.6 of the schedule, maps captured) on the 1/4-size layers
  ecac_capture   the same at strength 0: capture only
  regions        Multi-Subject Region Sampler's regional attention, 2 subjects
  stea           Load PortraitBooth Model's UNet patch (a LoRA; ComfyUI merges it at load)
on the SD1.5 stand-in (standins/sd15.py, one level: every cross-attention layer is a
1/4-size one, the worst case), the SDXL-family stand-in (standins/sdxl.py, KOALA-like,
3 levels) and SD1.5's and SDXL's real block layouts at a narrow width (sd15-layout,
sdxl-layout: 5 of 16 and 60 of 70 cross-attention layers at 1/4 size). Targets: 0 syncs
in every patch; ops <= 1.15x plain for control, <= 1.05x for capture only, 1.00x for STEA.

    OMP_NUM_THREADS=1 python benchmarks/dispatch_budget.py [--models sd15 sdxl sd15-layout sdxl-layout] [--ops]

Prints one JSON line per (model, patch); --ops adds the ops the patch adds, by name.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Ops that make the host wait for the device: a value read back, or an output whose
# shape is only known once the data is (the allocation needs it). On an inference tensor
# (ComfyUI samples in inference mode) the mode sees composite ops before they decompose:
# `item`, `allclose` rather than `_local_scalar_dense`.
READBACK_OPS = frozenset({
    "_local_scalar_dense", "item", "allclose", "equal", "is_nonzero", "nonzero", "nonzero_numpy", "argwhere",
    "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "bincount",
})
HOST_DATA_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})  # tensor(list) -> a blocking H2D copy
HOST_READ_METHODS = ("tolist", "cpu", "numpy")  # no dispatch on a CPU tensor: counted in Python
TARGETS = {"ecac_control": 1.15, "ecac_capture": 1.05, "regions": None, "stea": 1.00}
SIGMA = 5.0  # inside ECAC's default window (start 0, end 0.6) on both stand-ins
LATENT = 16  # SD1.5: 16x16 activations; SDXL stand-in: 16, 8, 4 (its 1/4 level: 4x4)


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _bool_index(args) -> bool:
    """index/index_put with a boolean mask: the kernel runs nonzero on it (a readback)."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _host_copy(name: str, args, kwargs) -> bool:
    """A blocking copy between the host and a device (.cpu(), .to("cuda") of host data):
    only visible where there is a device (a GPU run of this benchmark)."""
    if name == "_to_copy" and args and "device" in kwargs and kwargs["device"] is not None:
        src, dst = args[0].device, torch.device(kwargs["device"])
    elif name == "copy_" and len(args) > 1 and torch.is_tensor(args[1]):
        src, dst = args[1].device, args[0].device
    else:
        return False
    return src.type != dst.type and "cpu" in (src.type, dst.type) and not kwargs.get("non_blocking", False)


@dataclass
class Count:
    ops: collections.Counter = field(default_factory=collections.Counter)
    syncs: collections.Counter = field(default_factory=collections.Counter)

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


class DispatchCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside it, and the host syncs among them."""

    def __init__(self):
        super().__init__()
        self.count = Count()
        self._saved: dict[str, Callable] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        self.count.ops[name] += 1
        base = name.rstrip("_")
        kwargs = kwargs or {}
        if (base in READBACK_OPS or name in HOST_DATA_OPS or (base in ("index", "index_put") and _bool_index(args))
                or (base == "repeat_interleave" and kwargs.get("output_size") is None)  # sizes from the data
                or _host_copy(name, args, kwargs)):
            self.count.syncs[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for method in HOST_READ_METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def wrapped(tensor, *a, _original=original, _method=method, **kw):
                self.count.syncs[f"Tensor.{_method}"] += 1
                return _original(tensor, *a, **kw)
            setattr(torch.Tensor, method, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        return super().__exit__(*exc)


def count(run: Callable[[], object], warmup: int = 1) -> Count:
    """Ops and syncs of one call of `run`, after `warmup` uncounted calls."""
    for _ in range(warmup):
        run()
    with DispatchCounter() as counter:
        run()
    return counter.count


# ---- models and the evaluation the sampler makes -------------------------------------

@dataclass
class Family:
    name: str
    context_dim: int
    adm: int | None  # width of the `y` input (SDXL's pooled text + sizes), None for SD1.5
    base: str        # STEA entry's base


SD15 = Family("sd15", 768, None, "sd15")
SDXL = Family("sdxl", 2048, 2816, "sdxl")
# SD1.5's real block layout (16 cross-attention layers, 5 at 1/4 size) at 64 channels
# instead of 320: the op count depends on the layout, not the width. Not detectable from
# its weights (ComfyUI reads 320 channels as SD1.5), so it is built from ComfyUI's config.
SD15_LAYOUT = Family("sd15-layout", 768, None, "sd15")
# SDXL's real layout (70 cross-attention layers, 60 of them at 1/4 size) at 64 channels.
SDXL_LAYOUT = Family("sdxl-layout", 2048, 2816, "sdxl")
FAMILIES = {f.name: f for f in (SD15, SDXL, SD15_LAYOUT, SDXL_LAYOUT)}
SDXL_FULL = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10, num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
    context_dim=2048, adm_in_channels=2816, num_classes="sequential", legacy=False,
)


def load_model(family: Family):
    """The family's stand-in UNet as ComfyUI loads a diffusion model, on ComfyUI's device."""
    import comfy.sd

    if family in (SD15_LAYOUT, SDXL_LAYOUT):
        return layout_model(family)
    if family is SD15:
        from standins.sd15 import tiny_unet_state_dict
        sd = tiny_unet_state_dict(0)
    else:
        from standins.sdxl import standin_unet_state_dict
        sd = standin_unet_state_dict(0)
    model = comfy.sd.load_diffusion_model_state_dict(sd)
    if model is None:
        raise RuntimeError(f"ComfyUI did not detect the {family.name} stand-in UNet")
    return model


def layout_model(family: Family):
    """SD1.5's or SDXL's real block layout at 64 channels, random weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from benchmarks.ecac_cost import SD15_FULL
    from standins.sd15 import randomize

    if family is SD15_LAYOUT:
        config = comfy.supported_models.SD15(dict(SD15_FULL, model_channels=64))
    else:
        config = comfy.supported_models.SDXL(dict(SDXL_FULL, model_channels=64))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    randomize(model.diffusion_model, 0)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, device, comfy.model_management.unet_offload_device())


def inputs(family: Family, tokens: int = 77, seed: int = 0) -> dict:
    """A CFG batch of 2 (uncond row, cond row) at LATENT x LATENT."""
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    gen = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(2, 4, LATENT, LATENT, generator=gen).to(device),
           "context": torch.randn(2, tokens, family.context_dim, generator=gen).to(device),
           "sigma": torch.full((2,), SIGMA, device=device)}
    if family.adm:
        out["y"] = torch.randn(2, family.adm, generator=gen).to(device)
    return out


def evaluation(model, data: dict) -> Callable[[], torch.Tensor]:
    """One UNet evaluation as ComfyUI's calc_cond_batch makes it: the model's transformer
    options plus cond_or_uncond and the sigmas (one per latent; the same tensor object for
    every layer, a new one per evaluation, as the sampler makes it each step)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])  # merges weight patches (LoRA) as sampling does
    extra = {"y": data["y"]} if "y" in data else {}
    # Made here, not inside the count: each call gets its own tensor, as from the sampler,
    # made in inference mode as ComfyUI runs a prompt (such tensors have no version counter).
    with torch.inference_mode():
        sigmas = itertools.cycle([data["sigma"][:1].clone() for _ in range(4)])

    def run():
        to = dict(model.model_options.get("transformer_options", {}))
        to.update(cond_or_uncond=[1, 0], sigmas=next(sigmas))
        # no_grad, not inference mode: in inference mode composite ops (linear, reshape, a
        # no-op .to) reach the counter before they decompose, and the count would no longer
        # be the aten ops that launch kernels.
        with torch.no_grad():
            return model.model.apply_model(data["x"], data["sigma"], c_crossattn=data["context"],
                                           transformer_options=to, **extra)
    return run


def pack_module(name: str):
    """A module of the pack as ComfyUI imports it (relative imports work)."""
    import importlib

    from headless import comfyui as host

    pack = host.import_node_pack()
    return importlib.import_module(f"{pack.__name__}.{name}")


# ---- the patches --------------------------------------------------------------------

ID, EXPR = [5], [4]  # "a photo of a smiling woman": smiling at 4, woman at 5
LABELS = {"woman": ID, "smiling": EXPR}


def ecac_settings(model, strength: float):
    """ECAC Attention Patch's settings at its defaults (start 0, end 0.6 of the schedule)."""
    from portraitbooth_core.ecac.control import ControlSettings

    sampling = model.get_model_object("model_sampling")
    return ControlSettings(strength=strength, sigma_start=sampling.percent_to_sigma(0.0),
                           sigma_end=sampling.percent_to_sigma(0.6))


def ecac_control(model, family: Family) -> tuple:
    ecac = pack_module("nodes.ecac")
    mask = torch.zeros(LATENT * 8, LATENT * 8)
    mask[: LATENT * 4, LATENT * 2: LATENT * 6] = 1
    patched, _ = ecac.apply_ecac(model, ID, EXPR, LABELS, ecac_settings(model, 1.0), mask)
    return patched, inputs(family)


def ecac_capture(model, family: Family) -> tuple:
    ecac = pack_module("nodes.ecac")
    patched, _ = ecac.apply_ecac(model, ID, EXPR, LABELS, ecac_settings(model, 0.0))
    return patched, inputs(family)


def regions(model, family: Family) -> tuple:
    """Two subjects side by side, as the Region Sampler's 'regional attention' patches the
    model; the context is the extended one (77 + identity tokens, padded to 154)."""
    sampling = pack_module("nodes.region_sampling")
    gen = torch.Generator().manual_seed(1)
    # SD1.5: one class token per subject; SDXL: PhotoMaker's stacked copies, delayed start.
    sdxl = family is SDXL
    entry = ({"class_positions": [5], "class_copies": [[4, 5]], "base": "sdxl"} if sdxl else
             {"class_positions": [5], "base": "sd15"})
    extra = {"start_percent": 0.2} if sdxl else {}
    subjects = [sampling.Region([[torch.randn(1, 77, family.context_dim, generator=gen),
                                  {"portraitbooth": entry, **extra}]], None, 1.0, f"region {i + 1}")
                for i in range(2)]
    scene = [[torch.randn(1, 77, family.context_dim, generator=gen), {}]]
    latent = torch.zeros(1, 4, LATENT, LATENT)
    fused = sampling.region_layout(subjects, latent, 0.15)
    patched, extended = sampling.regional_attention(model, scene, subjects, fused.shares, [])
    length = extended[0][0].shape[1]
    data = inputs(family)
    # uncond row: a 77-token prompt repeated to the cond's length, as ComfyUI's cond_cat does
    uncond = data["context"][:1].repeat(1, length // 77, 1)
    data["context"] = torch.cat([uncond, extended[0][0].to(uncond)])
    return patched, data


def stea(model, family: Family) -> tuple:
    """Load PortraitBooth Model's UNet patch: ComfyUI adds it to the weights at load."""
    from benchmarks.stea_cost import random_lora

    stea_node = pack_module("nodes.stea")
    unet_sd = {k: v for k, v in model.model.diffusion_model.state_dict().items()}
    patched = stea_node.apply_unet_patch(model, random_lora(unet_sd, rank=8), 1.0, family.base)
    return patched, inputs(family)


PATCHES: dict[str, Callable] = {"ecac_control": ecac_control, "ecac_capture": ecac_capture, "regions": regions,
                                "stea": stea}


def measure(model, family: Family, patch: str) -> dict:
    """The record of one patch on one model: ops and syncs per evaluation, patched and plain."""
    patched, data = PATCHES[patch](model, family)
    plain = count(evaluation(model, data))
    ours = count(evaluation(patched, data))
    added = ours.ops - plain.ops
    return {
        "name": f"dispatch_{patch}_{family.name}",
        "model": family.name, "patch": patch,
        "ops": ours.total_ops, "plain_ops": plain.total_ops,
        "ratio": round(ours.total_ops / plain.total_ops, 4),
        "syncs": ours.total_syncs, "plain_syncs": plain.total_syncs,
        "sync_ops": dict(ours.syncs),
        "target": TARGETS[patch],
        "added_ops": dict(added.most_common()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--patches", nargs="+", default=list(PATCHES), choices=list(PATCHES))
    parser.add_argument("--ops", action="store_true", help="list the ops each patch adds")
    args = parser.parse_args()
    from headless import comfyui as host

    host.import_comfyui(cpu=not torch.cuda.is_available())
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from benchmarks.harness import device_name, header

    header("Dispatch budget per UNet evaluation", latent=LATENT, batch="cfg 2", sigma=SIGMA)
    for name in args.models:
        family = FAMILIES[name]
        model = load_model(family)
        for patch in args.patches:
            record = measure(model, family, patch)
            target = record["target"]
            record["meets_target"] = record["syncs"] == 0 and (target is None or record["ratio"] <= target)
            record["device"] = device_name()
            if not args.ops:
                record.pop("added_ops")
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
