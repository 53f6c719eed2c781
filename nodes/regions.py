"""Region nodes: PortraitBooth Region (a subject's conditioning + where it goes) and the
Multi-Subject Region Sampler. ComfyUI glue only; see nodes/region_sampling.py and
portraitbooth_core.regions (layout, attention, multidiffusion) for the work.
"""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from portraitbooth_core.regions.layout import Box

from .base import CheckedNode
from .region_sampling import MODES, Region, check_same_base, sample_regions

CATEGORY = "PortraitBooth/regions"
Regions = io.Custom("PB_REGIONS")  # list[nodes.region_sampling.Region], in subject order


class PortraitBoothRegion(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PortraitBoothRegion",
            display_name="PortraitBooth Region",
            category=CATEGORY,
            description="One subject of a multi-subject image: its conditioning (Apply STEA Conditioning with "
                        "this subject's face) and where it goes: a MASK, else a box, else an automatic "
                        "side-by-side slot. Chain Region nodes to list several subjects; order = subject order.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Apply STEA Conditioning output for this subject "
                                      "(its own face; the class word that carries it is the identity token)."),
                io.Float.Input("weight", default=1.0, min=0.01, max=10.0, step=0.01,
                               tooltip="Where regions overlap they are blended by weight; below 1 the global "
                                       "prompt keeps a part of this region."),
                io.Float.Input("box_x", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Box left edge, fraction of the image width (used when no mask is "
                                       "connected and box_width and box_height are > 0)."),
                io.Float.Input("box_y", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Box top edge, fraction of the image height."),
                io.Float.Input("box_width", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Box width as a fraction of the image; 0 with no mask = automatic "
                                       "side-by-side layout."),
                io.Float.Input("box_height", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Box height as a fraction of the image; 0 with no mask = automatic "
                                       "side-by-side layout."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where this subject goes (any size: resized to the latent; a different "
                                      "aspect ratio is stretched and reported). Overrides the box."),
                Regions.Input("previous", optional=True,
                              tooltip="Regions of the subjects before this one (another Region node's output)."),
            ],
            outputs=[Regions.Output(display_name="REGIONS", tooltip="The region list, this subject last.")],
        )

    @classmethod
    def execute(cls, conditioning, weight, box_x, box_y, box_width, box_height, mask=None,
                previous=None) -> io.NodeOutput:
        regions = list(previous or [])
        label = f"region {len(regions) + 1}"
        if mask is not None:
            placement = mask
        elif box_width > 0 and box_height > 0:
            placement = Box(box_x, box_y, box_width, box_height)
        else:
            placement = None
        region = Region(conditioning, placement, weight, label)
        # Fail here, at the node that broke it, not later in the sampler.
        check_same_base([(r.label, r.conditioning) for r in regions] + [(label, conditioning)])
        return io.NodeOutput([*regions, region])


class MultiSubjectRegionSampler(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PortraitBoothMultiSubjectSampler",
            display_name="Multi-Subject Region Sampler",
            category=CATEGORY,
            description="KSampler for several identities in one image. 'regional attention': one UNet pass per "
                        "step, each subject's identity token attends only inside its region while the rest of "
                        "the prompt stays global (about the cost of one subject). 'multidiffusion': one "
                        "denoising path per region fused by the masks (the paper's method; cost grows with "
                        "the number of subjects).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Load PortraitBooth Model (SD1.5, or SDXL with a PhotoMaker file)."),
                io.Conditioning.Input("positive", tooltip="Global prompt: the scene. Made with Apply STEA from "
                                      "all faces, its k-th class word is also confined to region k."),
                io.Conditioning.Input("negative", tooltip="Negative prompt, shared by every region."),
                Regions.Input("regions", tooltip="From PortraitBooth Region nodes, one per subject."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (e.g. Empty Latent Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the paper uses 5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampling algorithm (the paper uses Euler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="How the noise levels are spaced over the steps."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 = from pure noise; less keeps part of the input latent."),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                               tooltip="'regional attention': single pass, fast. 'multidiffusion': one path per "
                                       "region fused by masks, slower, stronger separation."),
                io.Float.Input("feather", default=0.15, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Soft edge of the automatic side-by-side layout, as a fraction of a "
                                       "column's width (regions with a mask or box are not affected)."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, positive, negative, regions, latent_image, seed, steps, cfg, sampler_name,
                scheduler, denoise, mode, feather=0.15) -> io.NodeOutput:
        return io.NodeOutput(sample_regions(model, positive, negative, list(regions or []), latent_image, seed,
                                            steps, cfg, sampler_name, scheduler, denoise, mode, feather))


NODES = [PortraitBoothRegion, MultiSubjectRegionSampler]
