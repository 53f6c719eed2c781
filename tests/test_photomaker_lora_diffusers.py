"""PhotoMaker's LoRA (issue 28): diffusers with the release's LoRA and ComfyUI with the
imported patch compute the same UNet output.

A small SDXL-shaped diffusers UNet2DConditionModel (text_time addition embedding, 2048-wide
context, linear proj_in/out, 64-channel heads, GroupNorm 32 as ComfyUI hard-codes) gets
seeded random weights. The SAME weights go into ComfyUI's SDXL model class (keys converted by
comfy.utils.unet_to_diffusers, the config checked against ComfyUI's own detection). A stand-in
release whose LoRA fits that UNet (processor and PEFT forms) is imported by
`import_photomaker` (fp32) and applied with the node's `apply_unet_patch` (ComfyUI's LoRA
machinery); diffusers loads the release's lora_weights the way PhotoMaker's pipeline does
(StableDiffusionXLPipeline.lora_state_dict + load_lora_into_unet, peft backend) and scales
it with set_adapters (no alphas in the release: scale 1 x strength).

Tolerance: max |diffusers - ComfyUI| <= TOL_REL x max |diffusers output| (1e-4, float32 on
CPU; the two differ only in op order: merged W + s*up@down against W x + s*up(down x)).
The comparison means something because (a) the unpatched models agree to the same tolerance,
and (b) the LoRA moves the output by more than 100 x that tolerance at strength 1.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

import peft  # noqa: F401  (diffusers' LoRA loading needs the peft backend; requirements-test.txt)

from conftest import load_pack
from portraitbooth_core.weights.file import load_portraitbooth
from portraitbooth_core.weights.formats import photomaker as pm
from standins.fastcomposer import random_tensors
from standins.photomaker import release_state_dict, save_release

TOL_REL = 1e-4
RANK = 4
STRENGTHS = (1.0, 0.5)
# SDXL's shape in small: level 0 without attention, 2048-d context, linear projections, the
# text_time addition embedding (1280 pooled + 6 x 256 time ids = 2816), 64-channel heads
# (diffusers' attention_head_dim is the head count: 128 / 2 = 64, ComfyUI's SDXL default),
# two transformer blocks per attention below level 0 (as SDXL's 2 / 10) so block indices count.
XL_UNET = dict(sample_size=8, block_out_channels=(64, 128), layers_per_block=1,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
               attention_head_dim=(1, 2), use_linear_projection=True, cross_attention_dim=2048,
               norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816)
# What that UNet is in ComfyUI's terms (openaimodel.UNetModel); detect_unet_config must agree.
COMFY_XL = dict(in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
                transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2], transformer_depth_middle=2,
                use_linear_in_transformer=True, context_dim=2048, adm_in_channels=2816, num_classes="sequential")
# SDXL's size conditioning: (height, width, crop top, crop left, target height, target width).
SIZES = dict(height=1024, width=768, crop_h=16, crop_w=8, target_height=896, target_width=640)


def _inputs():
    gen = torch.Generator().manual_seed(42)
    return dict(x=torch.randn(1, 4, 8, 8, generator=gen), t=torch.tensor([517.0]),
                context=torch.randn(1, 77, 2048, generator=gen), pooled=torch.randn(1, 1280, generator=gen),
                time_ids=torch.tensor([[SIZES[k] for k in ("height", "width", "crop_h", "crop_w", "target_height",
                                                            "target_width")]], dtype=torch.float32))


@pytest.fixture(scope="module")
def stea_nodes():
    load_pack()
    return importlib.import_module("portraitbooth_pack_under_test.nodes.stea")


@pytest.fixture(scope="module")
def models():
    """(diffusers UNet, ComfyUI ModelPatcher, ComfyUI unet config) with the same random weights."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**XL_UNET)
    # fan-in scaled matrices, norm gains near 1, small biases: no weight hides behind 0 or 1
    weights = random_tensors({k: tuple(v.shape) for k, v in unet.state_dict().items()}, seed=11)
    unet.load_state_dict(weights)
    unet.eval().requires_grad_(False)

    diffusers_to_comfy = comfy.utils.unet_to_diffusers(COMFY_XL)
    assert set(weights) <= set(diffusers_to_comfy), sorted(set(weights) - set(diffusers_to_comfy))[:5]
    comfy_sd = {diffusers_to_comfy[k]: v.clone() for k, v in weights.items()}
    detected = comfy.model_detection.detect_unet_config(comfy_sd, "")
    assert {k: detected[k] for k in COMFY_XL} == COMFY_XL
    # comfy.sd.load_diffusion_model_state_dict's steps; it cannot be called itself: it only
    # recognises full-size UNets (supported_models' exact configs), so SDXL's class is chosen here.
    model_config = comfy.supported_models.SDXL(detected)
    config = dict(model_config.unet_config)  # SDXL's extras filled in (num_head_channels 64), before dtype
    assert config["num_head_channels"] == 64
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(comfy_sd, "")
    model.diffusion_model.load_state_dict(comfy_sd, strict=True)  # every ComfyUI weight from diffusers'
    model.eval()
    device = comfy.model_management.get_torch_device()
    assert device.type == "cpu"
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    return unet, patcher, config


@pytest.fixture(scope="module")
def releases(models, tmp_path_factory):
    """{form: (release lora_weights, imported unet_patch)} for a LoRA on XL_UNET's attention."""
    _, _, config = models
    root = tmp_path_factory.mktemp("photomaker-lora")
    out = {}
    for seed, form in enumerate(("processor", "peft")):
        sd = release_state_dict("v1", unet=XL_UNET, rank=RANK, lora_form=form, seed=20 + 2 * seed)
        path = save_release(sd, root / form / "photomaker-v1.bin")
        report = pm.import_photomaker(path, root / form / "models", dtype="fp32", unet_config=config, progress=False)
        # 8 transformer blocks (down 2, middle 2, up 2 attentions x 2) x 2 attentions x 4 projections
        assert report.lora_modules == len(sd["lora_weights"]) // 2 == 8 * 2 * 4
        out[form] = (sd["lora_weights"], load_portraitbooth(report.portraitbooth).unet_patch)
    return out


def diffusers_out(unet, inputs):
    with torch.no_grad():
        return unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"],
                    added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}).sample


def comfy_out(patcher, inputs):
    """The ModelPatcher's UNet with its patches written into the weights, then restored."""
    model = patcher.model
    adm = model.encode_adm(pooled_output=inputs["pooled"], **SIZES)  # SDXL's y, ComfyUI's own path
    patcher.patch_model()
    try:
        with torch.no_grad():
            return model.diffusion_model(inputs["x"], timesteps=inputs["t"], context=inputs["context"], y=adm)
    finally:
        patcher.unpatch_model()


def with_lora(unet, lora: dict[str, torch.Tensor], name: str):
    """A copy of `unet` with the release's LoRA loaded as PhotoMaker's pipeline loads it."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    unet = copy.deepcopy(unet)
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(lora), unet_config=unet.config)
    assert alphas is None  # PhotoMaker's LoRA has none: peft's scale is lora_alpha / r = 1
    StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet, adapter_name=name)
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
    assert len(layers) == len(lora) // 2  # every release pair became a peft layer
    return unet


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_unpatched_models_agree(models):
    """Without the LoRA the two UNets agree (adm included), so a LoRA difference is the LoRA's."""
    unet, patcher, _ = models
    inputs = _inputs()
    # ComfyUI's encode_adm is what diffusers builds inside get_aug_embed: pooled || Timesteps(256)(time_ids)
    want_adm = torch.cat([inputs["pooled"], unet.add_time_proj(inputs["time_ids"].flatten()).reshape(1, -1)], -1)
    torch.testing.assert_close(patcher.model.encode_adm(pooled_output=inputs["pooled"], **SIZES), want_adm,
                               atol=1e-6, rtol=0)
    ref = diffusers_out(unet, inputs)
    got = comfy_out(patcher, inputs)
    scale = ref.abs().max().item()
    assert scale > 0.1, "degenerate output: the comparison would say nothing"
    diff = max_diff(got, ref)
    print(f"base: max |diffusers - comfy| = {diff:.3e} (output scale {scale:.3f})")
    assert diff <= TOL_REL * scale


@pytest.mark.parametrize("form", ["processor", "peft"])
def test_lora_output_equals_diffusers(models, releases, stea_nodes, form):
    """The imported patch through apply_unet_patch = the release's LoRA through diffusers + peft,
    at strength 1 and 0.5; and the LoRA changes the output far beyond the tolerance."""
    unet, patcher, _ = models
    lora, patch = releases[form]
    inputs = _inputs()
    base = diffusers_out(unet, inputs)
    lora_unet = with_lora(unet, lora, f"photomaker_{form}")
    for strength in STRENGTHS:
        lora_unet.set_adapters(f"photomaker_{form}", strength)
        ref = diffusers_out(lora_unet, inputs)
        got = comfy_out(stea_nodes.apply_unet_patch(patcher, patch, strength), inputs)
        scale = ref.abs().max().item()
        diff, effect = max_diff(got, ref), max_diff(ref, base)
        print(f"{form} strength {strength}: max |diffusers - comfy| = {diff:.3e}, LoRA effect {effect:.3e} "
              f"(output scale {scale:.3f})")
        assert diff <= TOL_REL * scale, (strength, diff, scale)
        assert effect > 100 * TOL_REL * scale, (strength, effect)
    # the patches were written and taken back: the shared ComfyUI model is the base model again
    torch.testing.assert_close(comfy_out(patcher, inputs), base, atol=TOL_REL * base.abs().max().item(), rtol=0)
