"""PhotoMaker import (issue 28, part 1): the v1/v2 ID heads against references written here
from upstream's architecture, the CLIP part against transformers, full-size key coverage
(shapes only, meta device), the LoRA through ComfyUI's own LoRA machinery, and the CLI's
detection and refusals. Small stand-in releases in the real layout (standins/photomaker.py).
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import transformers  # noqa: F401  (the CLIP reference)

from portraitbooth_core.stea.photomaker import (PhotoMakerV1Head, PhotoMakerV2Head, fuse_class_tokens,
                                                splice_photomaker)
from portraitbooth_core.weights.file import load_portraitbooth
from portraitbooth_core.weights.formats import photomaker as pm
from standins.photomaker import (HEAD, SDXL_UNET, TINY_XL_UNET, VISION, build_photomaker_release, release_shapes,
                                 release_state_dict, save_release)
from training.__main__ import main as cli

TOL = dict(atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- references (upstream's maths, plain ops)


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"])


def _mlp(sd, p, x, residual):
    y = F.linear(F.gelu(F.linear(_ln(x, sd, p + "layernorm."), sd[p + "fc1.weight"], sd[p + "fc1.bias"])),
                 sd[p + "fc2.weight"], sd[p + "fc2.bias"])
    return y + x if residual else y


def ref_fuse(sd, prompt, ids):
    x = _mlp(sd, "fuse_module.mlp1.", torch.cat([prompt, ids], -1), False) + prompt
    return _ln(_mlp(sd, "fuse_module.mlp2.", x, True), sd, "fuse_module.layer_norm.")


def ref_attention(sd, p, x, latents, heads):
    x, latents = _ln(x, sd, p + "norm1."), _ln(latents, sd, p + "norm2.")
    b, n, _ = latents.shape
    q = F.linear(latents, sd[p + "to_q.weight"])
    k, v = F.linear(torch.cat([x, latents], -2), sd[p + "to_kv.weight"]).chunk(2, -1)
    q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))  # upstream scales both sides
    w = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), -1)
    return F.linear((w @ v).permute(0, 2, 1, 3).reshape(b, n, -1), sd[p + "to_out.weight"])


def ref_qformer(sd, id_embeds, hidden, depth, heads, num_tokens):
    q, r = "qformer_perceiver.", "qformer_perceiver.perceiver_resampler."
    x = F.linear(F.gelu(F.linear(id_embeds, sd[q + "token_proj.0.weight"], sd[q + "token_proj.0.bias"])),
                 sd[q + "token_proj.2.weight"], sd[q + "token_proj.2.bias"])
    x = _ln(x.reshape(-1, num_tokens, sd[q + "token_norm.weight"].shape[0]), sd, q + "token_norm.")
    feats, latents = F.linear(hidden, sd[r + "proj_in.weight"], sd[r + "proj_in.bias"]), x
    for i in range(depth):
        latents = ref_attention(sd, f"{r}layers.{i}.0.", feats, latents, heads) + latents
        f = f"{r}layers.{i}.1."
        latents = F.linear(F.gelu(F.linear(_ln(latents, sd, f + "0."), sd[f + "1.weight"])), sd[f + "3.weight"]) + latents
    out = _ln(F.linear(latents, sd[r + "proj_out.weight"], sd[r + "proj_out.bias"]), sd, r + "norm_out.")
    return x + out


def clip_tower(id_encoder):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION["tiny"]))
    model.load_state_dict({k: v for k, v in id_encoder.items() if (k.startswith("vision_model.") or
                           k == "visual_projection.weight") and not k.endswith("position_ids")})
    return model.eval()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("photomaker")
    out = {}
    for version in ("v1", "v2"):
        sd = release_state_dict(version, seed=3 if version == "v1" else 5)
        out[version] = {"sd": sd, "bin": save_release(sd, root / f"photomaker-{version}.bin"),
                        "safetensors": save_release(sd, root / f"photomaker-{version}.safetensors")}
    return out


@pytest.fixture(scope="module")
def imported(releases, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    assert cli(["import-photomaker", str(releases["v1"]["bin"]), "--models", str(models), "--dtype", "fp32"]) == 0
    assert cli(["import-photomaker", str(releases["v2"]["safetensors"]), "--models", str(models), "--dtype", "fp32"]) == 0
    return models


def _photos(n=2, seed=0):
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the heads


def test_v1_head_equals_reference_and_clip_part_equals_transformers(releases, imported):
    sd = releases["v1"]["sd"]["id_encoder"]
    tower = clip_tower(sd)
    with torch.no_grad():
        out = tower(pixel_values=_photos(), output_hidden_states=False)
        pooled = tower.vision_model(pixel_values=_photos()).pooler_output
    head = load_portraitbooth(pm.output_paths(imported, "photomaker_v1")["portraitbooth"]).projector
    assert isinstance(head, PhotoMakerV1Head) and head.tokens_per_photo == 1
    # the pooled + visual_projection path is transformers' image_embeds; the pooled output
    # recomputed from last_hidden_state (all ComfyUI's CLIP vision gives) is the pooled output
    torch.testing.assert_close(head.visual_projection(pooled), out.image_embeds, **TOL)
    torch.testing.assert_close(head.id_tokens(last_hidden_state=out.last_hidden_state)[:, 0],
                               head.id_tokens(pooled=pooled)[:, 0], **TOL)
    ids = torch.cat([F.linear(pooled, sd["visual_projection.weight"]), F.linear(pooled, sd["visual_projection_2.weight"])], -1)
    prompt = torch.randn(3, 2, HEAD["tiny"]["text_dim"], generator=torch.Generator().manual_seed(1))  # batch 3, N=2 copies
    with torch.no_grad():
        got = fuse_class_tokens(head, prompt, last_hidden_state=out.last_hidden_state)
    torch.testing.assert_close(got, ref_fuse(sd, prompt, ids.expand(3, -1, -1)), **TOL)


def test_v2_head_equals_reference(releases, imported):
    sd = releases["v2"]["sd"]["id_encoder"]
    tower = clip_tower(sd)
    with torch.no_grad():
        hidden = tower.vision_model(pixel_values=_photos(seed=4)).last_hidden_state
    faces = 20 * F.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(2)), dim=-1)  # raw ArcFace scale
    head = load_portraitbooth(pm.output_paths(imported, "photomaker_v2")["portraitbooth"]).projector
    assert isinstance(head, PhotoMakerV2Head) and head.tokens_per_photo == 2
    heads = HEAD["tiny"]["inner"] // 128
    ids = ref_qformer(sd, faces, hidden, HEAD["tiny"]["depth"], heads, 2).reshape(-1, HEAD["tiny"]["text_dim"])
    prompt = torch.randn(4, HEAD["tiny"]["text_dim"], generator=torch.Generator().manual_seed(6))  # 2 photos x 2 tokens
    with torch.no_grad():
        got = fuse_class_tokens(head, prompt, last_hidden_state=hidden, id_embeds=faces)
    torch.testing.assert_close(got, ref_fuse(sd, prompt, ids), **TOL)
    with pytest.raises(ValueError, match="repeat the class word 2 x photos"):
        fuse_class_tokens(head, prompt[:3], last_hidden_state=hidden, id_embeds=faces)
    cond = torch.randn(1, 77, HEAD["tiny"]["text_dim"])
    with torch.no_grad():
        spliced = splice_photomaker(cond, [5, 6, 7, 8], head, last_hidden_state=hidden, id_embeds=faces)
    keep = [i for i in range(77) if i not in (5, 6, 7, 8)]
    assert torch.equal(spliced[:, keep], cond[:, keep])
    torch.testing.assert_close(spliced[0, 5:9], ref_fuse(sd, cond[0, 5:9], ids), **TOL)


# ---------------------------------------------------------------- full-size coverage


def _meta_release(version, **options):
    shapes = release_shapes(version, **options)
    meta = {part: {k: torch.empty(s, device="meta") for k, s in d.items()} for part, d in shapes.items()}
    return shapes, pm.Release(meta["id_encoder"], meta["lora_weights"], "nested")


def _sdxl_key_map():
    import comfy.lora
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    assert type(comfy.model_detection.model_config_from_unet_config(dict(pm.SDXL_UNET_CONFIG))).__name__ == "SDXL"
    shim = torch.nn.Module()
    shim.diffusion_model = UNetModel(**pm.SDXL_UNET_CONFIG, dtype=torch.float32, device="meta",
                                     operations=comfy.ops.disable_weight_init)
    shim.model_config = SimpleNamespace(unet_config=dict(pm.SDXL_UNET_CONFIG))
    return comfy.lora.model_lora_keys_unet(shim, {})


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_keys_all_mapped_none_left(version):
    shapes, release = _meta_release(version)
    plan = pm.validate_release(release, version, f"photomaker-{version}.bin")
    assert plan.version == version and pm.is_vit_l14(plan.clip_config) and not plan.warnings
    ids = shapes["id_encoder"]
    with torch.device("meta"):
        head_keys = set(pm.build_photomaker_head(plan.head_config).state_dict())
    used = set(plan.clip_keys) | head_keys
    unused = sorted(k for k in ids if k not in used)
    # only the derived position_ids buffer, and v2's visual_projection_2 (in the file, unused upstream)
    assert unused == (["vision_model.embeddings.position_ids", "visual_projection_2.weight"] if version == "v2"
                      else ["vision_model.embeddings.position_ids"])
    assert plan.head_config.text_dim == 2048
    spec = pm.face_encoder_spec(version, SimpleNamespace(config=plan.head_config), plan.clip_config)
    assert (spec.kind, spec.dim) == (("clip_vision:vit-l-14", 1024) if version == "v1" else (pm.V2_KIND, 512))
    if version == "v2":
        assert dict(plan.head_config.options) == dict(clip_dim=1024, depth=4, dim_head=128, ff_mult=4, heads=16,
                                                      num_tokens=2, token_ratio=4)
    # LoRA: every key mapped, onto a key ComfyUI's own SDXL key map knows; 70 blocks x 2 x 4 projections
    lora = shapes["lora_weights"]
    assert set(plan.lora_map) == set(lora) and len(set(plan.lora_map.values())) == len(lora) == 2 * 560
    key_map = _sdxl_key_map()
    modules = {k.rsplit(".", 2)[0] for k in plan.lora_map.values()}
    assert modules <= set(key_map) and len(modules) == 560 and set(plan.lora_ranks.values()) == {64}
    # the processor-form key names the same ComfyUI weight in ComfyUI's own map
    for src, dst in plan.lora_map.items():
        comfy_form = src.removesuffix("_lora.down.weight").removesuffix("_lora.up.weight")
        assert key_map[comfy_form] == key_map[dst.rsplit(".", 2)[0]], src


def test_peft_form_maps_like_processor_form():
    _, processor = _meta_release("v1", lora_form="processor")
    _, peft = _meta_release("v1", lora_form="peft")
    a = pm.lora_key_map({k: tuple(v.shape) for k, v in processor.lora.items()})[0]
    b = pm.lora_key_map({k: tuple(v.shape) for k, v in peft.lora.items()})[0]
    assert sorted(a.values()) == sorted(b.values())


# ---------------------------------------------------------------- the LoRA through ComfyUI


def test_lora_applied_by_comfyui_is_base_plus_up_down(tmp_path):
    """A small SDXL-like UNet: the imported file's LoRA, through comfy.lora's key map,
    load_lora and calculate_weight (what the LoRA loaders run), gives W + up @ down."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from diffusers import UNet2DConditionModel

    from portraitbooth_core.weights.formats.fastcomposer import unet_config_from_diffusers

    with torch.device("meta"):
        diffusers_unet = UNet2DConditionModel(**TINY_XL_UNET)
    config = unet_config_from_diffusers(diffusers_unet.state_dict())
    sd = release_state_dict("v1", unet=TINY_XL_UNET, rank=3, seed=9)
    path = save_release(sd, tmp_path / "photomaker-v1.bin")
    report = pm.import_photomaker(path, tmp_path / "models", dtype="fp32", unet_config=config, progress=False)
    model = load_portraitbooth(report.portraitbooth)
    assert model.info.base == "sdxl" and model.info.unet_patch["format"] == "lora"

    shim = torch.nn.Module()
    shim.diffusion_model = UNetModel(**config, dtype=torch.float32, device="cpu", operations=comfy.ops.manual_cast)
    shim.model_config = SimpleNamespace(unet_config=config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in shim.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    key_map = comfy.lora.model_lora_keys_unet(shim, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(model.unet_patch)), key_map, log_missing=False)
    lora = sd["lora_weights"]
    # 4 transformer blocks (down 1, middle 1, up 2) x 2 attentions x 4 projections, every one loaded
    assert len(loaded) == len(lora) // 2 == 4 * 2 * 4
    weights = dict(shim.state_dict())
    comfy_of = comfy.utils.unet_to_diffusers(config)
    for key in lora:
        if not key.endswith("_lora.down.weight"):
            continue
        stem = key.removesuffix("_lora.down.weight")
        block, proj = stem.removeprefix("unet.").split(".processor.")
        target = "diffusion_model." + comfy_of[f"{block}.{proj}{'.0' if proj == 'to_out' else ''}.weight"]
        base = weights[target]
        got = comfy.lora.calculate_weight([(0.7, loaded[target], 1.0, None, None)], base.clone(), target)
        want = base + 0.7 * lora[stem + "_lora.up.weight"] @ lora[key]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the CLI


def test_cli_detects_versions_and_writes_files(imported, capsys):
    for version in ("v1", "v2"):
        paths = pm.output_paths(imported, f"photomaker_{version}")
        assert all(p.is_file() for p in paths.values())
        info = load_portraitbooth(paths["portraitbooth"]).info
        assert (info.base, info.projector.kind) == ("sdxl", f"photomaker_{version}")
        assert info.inference.start_percent == 0.2 and info.inference.cfg == 5.0
        assert info.defaults["tokens_per_photo"] == (1 if version == "v1" else 2)
        # the stand-in's tower is a small CLIP, not ViT-L/14 (the full-size test checks that kind)
        assert info.face_encoder.kind == ("clip_vision:64w" if version == "v1" else pm.V2_KIND)
        assert info.source["license"] == "Apache-2.0" and info.unet_patch["format"] == "lora"
        from safetensors import safe_open

        with safe_open(str(paths["clip_vision"]), "pt") as f:
            keys = set(f.keys())
            assert json.loads(f.metadata()["portraitbooth_import"])["part"] == "clip_vision"
        assert "visual_projection.weight" in keys and not any("position_ids" in k or "fuse" in k for k in keys)
    assert not [p for p in imported.rglob(".*") if p.is_file()], "temp files left behind"


def test_cli_refuses_overwrite(releases, imported, capsys):
    target = pm.output_paths(imported, "photomaker_v1")["portraitbooth"]
    before = target.stat().st_mtime_ns
    assert cli(["import-photomaker", str(releases["v1"]["bin"]), "--models", str(imported)]) == 2
    err = capsys.readouterr().err
    assert "already imported" in err and "--overwrite" in err and str(target) in err
    assert target.stat().st_mtime_ns == before
    assert cli(["import-photomaker", str(releases["v1"]["bin"]), "--models", str(imported), "--overwrite",
                "--dtype", "fp32"]) == 0
    assert "PhotoMaker v1 imported" in capsys.readouterr().out


def test_wrong_version_is_named(releases, tmp_path, capsys):
    assert cli(["import-photomaker", str(releases["v1"]["bin"]), "--models", str(tmp_path), "--version", "v2"]) == 2
    assert re.search(r"photomaker-v1\.bin is PhotoMaker v1, not v2: it has no v2 resampler.*--version v1",
                     capsys.readouterr().err)
    with pytest.raises(pm.WrongVersionError, match="is PhotoMaker v2, not v1: it has the v2 resampler"):
        pm.import_photomaker(releases["v2"]["bin"], tmp_path, version="v1", progress=False)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_truncated_and_empty_files(releases, tmp_path):
    for form in ("bin", "safetensors"):
        data = releases["v1"][form].read_bytes()
        path = tmp_path / f"cut.{form}"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(pm.TruncatedFileError, match=rf"{re.escape(str(path))}.*[Dd]ownload it again"):
            pm.import_photomaker(path, tmp_path, progress=False)
    path.write_bytes(b"")
    with pytest.raises(pm.TruncatedFileError, match="is empty"):
        pm.import_photomaker(path, tmp_path, progress=False)


class _Payload:
    """Unpickling this calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "photomaker-v1.bin"
    torch.save({"id_encoder": {"x": torch.zeros(1)}, "lora_weights": {}, "evil": _Payload(marker)}, path)
    assert cli(["import-photomaker", str(path), "--models", str(tmp_path)]) == 2
    assert re.search(r"Refused .*would run code when loaded.*weights_only=False", capsys.readouterr().err)
    assert not marker.exists()


def test_foreign_incomplete_and_unmatched(releases, tmp_path):
    fastcomposer_like = tmp_path / "pytorch_model.bin"
    torch.save({"unet.conv_in.weight": torch.zeros(1), "postfuse_module.layer_norm.weight": torch.zeros(1)},
               fastcomposer_like)
    with pytest.raises(pm.NotPhotoMakerError, match="import-fastcomposer"):
        pm.import_photomaker(fastcomposer_like, tmp_path, progress=False)

    sd = releases["v2"]["sd"]
    no_lora = tmp_path / "nolora.bin"
    torch.save({"id_encoder": sd["id_encoder"]}, no_lora)
    with pytest.raises(pm.MissingTensorsError, match="no lora_weights"):
        pm.import_photomaker(no_lora, tmp_path, progress=False)

    ids = dict(sd["id_encoder"])
    del ids["qformer_perceiver.perceiver_resampler.layers.1.0.to_kv.weight"]
    partial = save_release({"id_encoder": ids, "lora_weights": sd["lora_weights"]}, tmp_path / "partial.bin")
    with pytest.raises(pm.MissingTensorsError, match=r"layers\.1\.0\.to_kv\.weight"):
        pm.import_photomaker(partial, tmp_path, progress=False)

    lora = dict(sd["lora_weights"])
    lora["unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"] = torch.zeros(2, 8)
    lora["unet.conv_in.alpha"] = torch.tensor(1.0)
    odd = save_release({"id_encoder": sd["id_encoder"], "lora_weights": lora}, tmp_path / "odd.bin")
    with pytest.raises(pm.UnmatchedLoraKeysError, match=r"2 LoRA keys match no attention layer.*"
                       r"lora_weights\.unet\.conv_in\.alpha.*down_blocks\.9"):
        pm.import_photomaker(odd, tmp_path, progress=False)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_stand_in_builder_reuses_file(tmp_path):
    path = build_photomaker_release(tmp_path / "photomaker-v2.bin", "v2")
    mtime = path.stat().st_mtime_ns
    assert build_photomaker_release(path, "v2") == path and path.stat().st_mtime_ns == mtime
    assert pm.detect_version(pm.load_release(path).id_encoder) == "v2"
    assert SDXL_UNET["cross_attention_dim"] == 2048


def test_sdxl_base_is_tied_to_the_photomaker_kinds(imported, tmp_path):
    """The weight file accepts base sdxl for the PhotoMaker kinds only (and those only with sdxl)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from portraitbooth_core.weights.meta import WrongBaseModelError

    source = pm.output_paths(imported, "photomaker_v1")["portraitbooth"]
    with safe_open(str(source), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    info = json.loads(meta["portraitbooth"])
    assert info["base"] == "sdxl" and info["projector"]["options"] == {"projection_dim": 96}
    for base in ("sd15", "sd2"):
        path = tmp_path / f"{base}.safetensors"
        save_file(tensors, str(path), metadata={**meta, "portraitbooth": json.dumps({**info, "base": base})})
        with pytest.raises(WrongBaseModelError, match="'photomaker_v1' projector is made for 'sdxl'"):
            load_portraitbooth(path)


def test_default_fp16_import_and_report(releases, tmp_path, capsys):
    from safetensors import safe_open

    assert cli(["import-photomaker", str(releases["v2"]["bin"]), "--models", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PhotoMaker v2 imported" in out and "rank 2" in out and "non-commercial" in out
    paths = pm.output_paths(tmp_path, "photomaker_v2")
    with safe_open(str(paths["clip_vision"]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    patch = load_portraitbooth(paths["portraitbooth"]).unet_patch
    assert {v.dtype for k, v in patch.items() if k.endswith("weight")} == {torch.float16}
    assert {float(v) for k, v in patch.items() if k.endswith(".alpha")} == {2.0}  # alpha = rank: scale 1
