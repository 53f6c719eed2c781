"""ComfyUI glue of the Multi-Subject Region Sampler: conditionings in, a sampled LATENT out.

The math is portraitbooth_core.regions' (layout, attention, multidiffusion); this
module reads CONDITIONING lists, patches a model clone and drives ComfyUI's own
sampler objects (sigmas, noise, progress bar, previews) the way KSampler does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from portraitbooth_core.regions.multidiffusion import active_paths, fuse
from portraitbooth_core.weights.family import family_label, model_context_dim
from portraitbooth_core.regions.attention import RegionalAttention, TokenGroup, extend_context
from portraitbooth_core.regions.layout import Layout, Placement, RegionError, layout
from portraitbooth_core.ecac.layers import cross_attention_layers, install_on_layers

from .contracts import identity_item, read_stea

log = logging.getLogger("portraitbooth")
MODES = ("regional attention", "multidiffusion")


@dataclass(frozen=True)
class Region:
    conditioning: list        # ComfyUI CONDITIONING, normally from Apply STEA Conditioning
    placement: Placement      # mask, box, or None for the automatic layout
    weight: float = 1.0
    label: str = "region 1"


def conditioning_family(conditioning: list, what: str) -> tuple[int, str]:
    """(text context width, base-model name) of a CONDITIONING, checked to be one family."""
    if not conditioning:
        raise RegionError(f"{what} is an empty CONDITIONING")
    dims = {int(c.shape[-1]) for c, _ in conditioning}
    if len(dims) > 1:
        raise RegionError(f"{what} mixes conditionings of different base models ({sorted(dims)} channels)")
    dim = dims.pop()
    entry = read_stea(conditioning)
    stea = entry.base if entry is not None else None
    return dim, family_label(dim) if stea in (None, "sd15") else stea


def check_same_base(items: list[tuple[str, list]], model=None) -> None:
    """All conditionings (and the model, when given) from one base model, else say which differs."""
    seen = [(what, *conditioning_family(cond, what)) for what, cond in items]
    if model is not None:
        dim = model_context_dim(model)
        seen.insert(0, ("the MODEL", dim, family_label(dim)))
    first = seen[0]
    for what, dim, family in seen[1:]:
        if dim != first[1]:
            raise RegionError(f"{what} was encoded for {family} ({dim}-channel text) but {first[0]} is "
                              f"{first[2]} ({first[1]}-channel): encode every region with the CLIP of the "
                              f"same checkpoint as the MODEL.")


def identity_entry(conditioning: list) -> tuple[torch.Tensor, dict, list[tuple[int, ...]]] | None:
    """(tensor, extra, per subject its identity tokens) of the first item Apply STEA
    Conditioning marked with its identities (`contracts.STEAEntry`), or None. A subject has
    one token on SD1.5 and PhotoMaker's stacked copies on SDXL."""
    item = identity_item(conditioning)
    return None if item is None else (item[0], item[1], list(item[2].subject_tokens()))


def region_layout(regions: list[Region], latent: torch.Tensor, feather: float) -> Layout:
    h, w = latent.shape[-2:]
    result = layout([r.placement for r in regions], [r.weight for r in regions], h, w, feather,
                    [r.label for r in regions])
    for note in result.notes:
        log.warning("Multi-Subject Region Sampler: %s", note)
    return result


def check_class_words(positive: list, regions: list[Region]) -> list[tuple[int, ...]]:
    """The global prompt's subjects' tokens (Apply STEA output), one subject per region at most."""
    entry = identity_entry(positive)
    if entry is None:
        return []
    positions = entry[2]
    if len(regions) > len(positions):
        raise RegionError(f"{len(regions)} regions (faces) but the global positive names only {len(positions)} "
                          f"subject class word(s): write one class word per subject (e.g. 'a man and a man'); "
                          f"the k-th occurrence goes to the k-th region.")
    return positions[:len(regions)]


def regional_attention(model, positive: list, regions: list[Region], shares: torch.Tensor,
                       class_positions: list[tuple[int, ...]]):
    """(patched model clone, positive with the identity tokens appended)."""
    lengths = {int(c.shape[1]) for c, _ in positive}
    if len(lengths) > 1:
        raise RegionError(f"the global positive combines conditionings of different lengths ({sorted(lengths)} "
                          f"tokens); regional attention needs one length: use mode 'multidiffusion'.")
    sampling = model.get_model_object("model_sampling")
    tokens, windows = [], []
    for region in regions:
        entry = identity_entry(region.conditioning)
        if entry is None:
            raise RegionError(f"{region.label}'s conditioning has no identity token: make it with Apply STEA "
                              f"Conditioning (a face + a class word), or use mode 'multidiffusion'.")
        cond, extra, subjects = entry
        tokens.append(cond[:, [p for group in subjects for p in group]])
        windows.append((sampling.percent_to_sigma(extra.get("start_percent", 0.0)),
                        sampling.percent_to_sigma(extra.get("end_percent", 1.0))))
    extended = []
    for cond, extra in positive:
        context, positions, hidden = extend_context(cond, tokens)
        extended.append([context, dict(extra)])
    groups = [TokenGroup(tuple(p), shares[i], *windows[i]) for i, p in enumerate(positions)]
    # class words of the global prompt: occurrence k belongs to region k as well
    groups += [TokenGroup(tuple(group), shares[k]) for k, group in enumerate(class_positions)]
    hook = RegionalAttention(groups, hidden)
    patched = model.clone()
    attn2 = (patched.model_options.setdefault("transformer_options", {})
             .setdefault("patches_replace", {}).setdefault("attn2", {}))
    install_on_layers(attn2, cross_attention_layers(patched.get_model_object("diffusion_model")),
                      lambda _layer: hook)
    return patched, extended


def multidiffusion_guider(model, positive: list, negative: list, regions: list[Region], fused: Layout, cfg: float):
    import comfy.samplers

    class MultiDiffusionGuider(comfy.samplers.CFGGuider):
        """CFG over the mask-weighted fusion of one prediction per path (global + regions)."""

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            negative_cond = self.conds.get("negative")
            if abs(self.cfg - 1.0) < 1e-9 and not model_options.get("disable_cfg1_optimization", False):
                negative_cond = None
            paths = [self.conds[k] for k in self.path_keys]
            # one call: ComfyUI batches every path (and the uncond) into as few UNet passes as memory allows
            out = comfy.samplers.calc_cond_batch(self.inner_model, [negative_cond, *paths], x, timestep,
                                                 model_options)
            cond_pred = fuse(out[1:], self.path_weights)
            return comfy.samplers.cfg_function(self.inner_model, cond_pred, out[0], self.cfg, x, timestep,
                                               model_options=model_options, cond=self.conds.get("positive"),
                                               uncond=negative_cond)

    weights = [fused.background, *fused.shares]
    keys = ["positive", *[f"portraitbooth_region_{i}" for i in range(len(regions))]]
    guider = MultiDiffusionGuider(model)
    guider.inner_set_conds({"positive": positive, "negative": negative,
                            **{keys[i + 1]: r.conditioning for i, r in enumerate(regions)}})
    guider.set_cfg(cfg)
    paths = active_paths(fused.background, fused.shares)
    if 0 not in paths:
        log.info("Multi-Subject Region Sampler: the regions cover the whole image; the global positive's "
                 "own path is skipped (multidiffusion gives it only the background).")
    guider.path_keys = [keys[i] for i in paths]
    guider.path_weights = [weights[i] for i in paths]
    return guider


def sample_regions(model, positive: list, negative: list, regions: list[Region], latent: dict, seed: int,
                   steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float,
                   mode: str = MODES[0], feather: float = 0.15) -> dict:
    """The whole sampler node: validate, lay out, patch or fuse, sample. Returns the LATENT dict."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not regions:
        raise RegionError("regions is empty: chain at least one PortraitBooth Region")
    check_same_base([("the global positive", positive), ("the negative", negative),
                     *[(r.label, r.conditioning) for r in regions]], model)
    class_positions = check_class_words(positive, regions)
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    fused = region_layout(regions, latent_image, feather)
    if mode == "regional attention":
        patched, extended = regional_attention(model, positive, regions, fused.shares, class_positions)
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(extended, negative)
        guider.set_cfg(cfg)
    else:
        patched = model
        guider = multidiffusion_guider(model, positive, negative, regions, fused, cfg)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = comfy.samplers.KSampler(patched, steps=steps, device=patched.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=patched.model_options).sigmas
    callback = latent_preview.prepare_callback(patched, steps)  # progress bar + live preview
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out
