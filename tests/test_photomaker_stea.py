"""Apply STEA Conditioning with PhotoMaker files on SDXL (issue 28, part 2), in-process on the
random-weight SDXL stand-in (full-size CLIP-L + bigG, as ComfyUI builds them):

- the fused conditioning against a reference from transformers' CLIPTextModel and
  CLIPTextModelWithProjection (hidden_states[-2], concatenated to 2048) and the heads'
  upstream maths, on the prompt with the class word written out once per identity token;
- the pooled output untouched; every other token bit-identical to ComfyUI's own encode of
  that expanded prompt; delayed identity on the text-only prompt;
- several photos, several subjects, weights, long prompts; the refusals that name what to do.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from portraitbooth_core.face.photomaker_photos import PHOTOMAKER_V1_KIND, PHOTOMAKER_V2_KIND
from portraitbooth_core.face.types import Identity
from portraitbooth_core.stea.photomaker import (PhotoMakerV1Head, PhotoMakerV2Head, photomaker_v1_config,
                                                photomaker_v2_config)
from portraitbooth_core.weights.file import load_portraitbooth, save_portraitbooth
from portraitbooth_core.weights.formats import photomaker as pm
from stea_fixtures import identity as arcface_identity
from test_photomaker_import import ref_fuse, ref_qformer

pytestmark = pytest.mark.slow  # full-size SDXL text encoders on 2 cores
TOL = dict(atol=2e-4, rtol=2e-4)
V2_HEADS, V2_DEPTH = 2, 1


def write_head(path, version: str, seed: int):
    torch.manual_seed(seed)
    if version == "v1":
        head = PhotoMakerV1Head(photomaker_v1_config())
    else:
        head = PhotoMakerV2Head(photomaker_v2_config(depth=V2_DEPTH, heads=V2_HEADS, ff_mult=1))
    spec = pm.face_encoder_spec(version, head, dict(pm.VIT_L14))
    return save_portraitbooth(path, head, spec, defaults={"start_percent": 0.2, "cfg": 5.0},
                              source={"standin": "random PhotoMaker head for tests"})


def photos(n: int, seed: int, version: str) -> Identity:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 257, 1024, generator=gen)
    if version == "v1":
        return Identity(embeddings=hidden[:, 0], vector=hidden[:, 0].mean(0), kind=PHOTOMAKER_V1_KIND,
                        normalized=False, clip_hidden=hidden)
    faces = 20 * F.normalize(torch.randn(n, 512, generator=gen), dim=-1)  # raw ArcFace scale
    return Identity(embeddings=faces, vector=faces.mean(0), kind=PHOTOMAKER_V2_KIND, normalized=False,
                    clip_hidden=hidden)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("pm-heads")
    return {v: load_portraitbooth(write_head(root / f"pm-{v}.safetensors", v, seed=n)) for n, v in enumerate(("v1", "v2"))}


@pytest.fixture(scope="module")
def clip(sdxl_parts):
    return sdxl_parts[1]


@pytest.fixture(scope="module")
def apply(pack_nodes, clip, heads):
    node = pack_nodes["PortraitBoothApplySTEA"]

    def run(text, version, *faces, strength=1.0, start=0.0, end=1.0, class_word="", occurrence=0, the_clip=None):
        extra = {f"face_{n}": f for n, f in enumerate(faces[1:], start=2)}
        out = node.execute(the_clip or clip, heads[version], faces[0], text, class_word, occurrence, strength, start,
                           end, **extra)
        return out.result[0]
    return run


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))[0]


def transformers_reference(clip, text):
    """(cond [1, T, 2048], pooled [1, 1280]) of ComfyUI's tokens for `text` through transformers."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    enc = clip.cond_stage_model
    sizes = {"clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, hidden_act="quick_gelu"),
             "clip_g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu")}
    tokens = clip.tokenize(text)
    outs, pooled = [], None
    for name, key, cls in (("clip_l", "l", CLIPTextModel), ("clip_g", "g", CLIPTextModelWithProjection)):
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **sizes[name])
        with torch.device("meta"):
            model = cls(config)
        wanted = set(model.state_dict())
        # transformers 5 keys CLIPTextModel without the "text_model." prefix ComfyUI keeps
        rename = lambda k: k if k in wanted else k.removeprefix("text_model.")  # noqa: E731
        state = {rename(k): v.float() for k, v in getattr(enc, name).transformer.state_dict().items()
                 if rename(k) in wanted}
        model = model.to_empty(device="cpu")
        model.load_state_dict(state, strict=True)
        for name, buffer in model.named_buffers():  # non-persistent, so not in any state dict
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
        ids = torch.tensor([[t[0] for t in chunk] for chunk in tokens[key]])
        with torch.no_grad():
            out = model.eval()(input_ids=ids, output_hidden_states=True)
        outs.append(out.hidden_states[-2].reshape(1, -1, config.hidden_size))
        if key == "g":
            pooled = out.text_embeds[:1]
    return torch.cat(outs, dim=-1), pooled


def copies_of(clip, text, word_piece=786):
    ids = [t[0] for chunk in clip.tokenize(text)["l"] for t in chunk]
    return [i for i, t in enumerate(ids) if t == word_piece]


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("version,n", [("v1", 3), ("v2", 2)])
def test_fused_conditioning_equals_the_transformers_reference(clip, apply, heads, version, n):
    face = photos(n, seed=7, version=version)
    per_photo = 1 if version == "v1" else 2
    got = apply("a photo of a man img, smiling", version, face)
    expanded = "a photo of a " + " ".join(["man"] * n * per_photo) + ", smiling"
    cond, pooled = transformers_reference(clip, expanded)
    positions = copies_of(clip, expanded)
    assert len(positions) == n * per_photo
    entry = got[0][1]["portraitbooth"]
    assert entry["base"] == "sdxl" and entry["class_copies"] == [positions]
    sd = {k: v.float() for k, v in heads[version].projector.state_dict().items()}
    if version == "v1":
        pooled_clip = F.layer_norm(face.clip_hidden[:, 0], (1024,), sd["vision_model.post_layernorm.weight"],
                                   sd["vision_model.post_layernorm.bias"])
        ids = torch.cat([F.linear(pooled_clip, sd["visual_projection.weight"]),
                         F.linear(pooled_clip, sd["visual_projection_2.weight"])], -1)
    else:
        ids = ref_qformer(sd, face.embeddings, face.clip_hidden, V2_DEPTH, V2_HEADS, 2).reshape(-1, 2048)
    expected = cond.clone()
    expected[0, positions] = ref_fuse(sd, cond[0, positions], ids)
    torch.testing.assert_close(got[0][0].float(), expected, **TOL)
    torch.testing.assert_close(got[0][1]["pooled_output"].float(), pooled, **TOL)


def test_every_other_token_and_the_pooled_output_are_comfyuis_encoding_of_the_expanded_prompt(clip, apply):
    got = apply("a photo of a woman img in a garden", "v2", photos(2, 1, "v2"))
    plain = encode(clip, "a photo of a woman woman woman woman in a garden")
    copies = got[0][1]["portraitbooth"]["class_copies"][0]
    keep = [i for i in range(plain[0].shape[1]) if i not in copies]
    assert torch.equal(got[0][0][:, keep], plain[0][:, keep])
    assert torch.equal(got[0][1]["pooled_output"], plain[1]["pooled_output"])
    assert not torch.allclose(got[0][0][:, copies], plain[0][:, copies])


def test_strength_zero_is_the_expanded_prompts_text_encoding(clip, apply):
    got = apply("a man img", "v1", photos(2, 3, "v1"), strength=0.0)
    assert torch.equal(got[0][0], encode(clip, "a man man")[0])


def test_different_faces_give_different_conditioning_and_the_same_face_the_same(apply):
    a = apply("a man img", "v2", photos(1, 11, "v2"))[0][0]
    assert torch.equal(a, apply("a man img", "v2", photos(1, 11, "v2"))[0][0])
    assert not torch.allclose(a, apply("a man img", "v2", photos(1, 12, "v2"))[0][0])


def test_the_trigger_is_optional(apply):
    face = photos(1, 4, "v2")
    assert torch.equal(apply("a man img, portrait", "v2", face)[0][0], apply("a man, portrait", "v2", face)[0][0])


def test_two_subjects_each_get_their_own_stack(clip, apply):
    woman, man = photos(1, 21, "v2"), photos(2, 22, "v2")
    got = apply("a woman img and a man img at the beach", "v2", woman, man)
    assert got[0][1]["portraitbooth"]["class_copies"] == [[2, 3], [6, 7, 8, 9]]  # a woman x2 and a man x4
    alone = apply("a woman img and a man img at the beach", "v2", woman, photos(2, 23, "v2"))
    assert torch.equal(got[0][0][:, 2:4], alone[0][0][:, 2:4])  # the man's photos leave the woman's tokens alone
    assert not torch.allclose(got[0][0][:, 6:10], alone[0][0][:, 6:10])


def test_a_trigger_picks_its_class_word_over_an_earlier_one(apply):
    got = apply("a man walks past a woman img", "v1", photos(1, 5, "v1"))
    assert got[0][1]["portraitbooth"]["class_copies"] == [[6]]


def test_a_long_prompt_pushes_the_copies_into_the_next_chunk(clip, apply):
    text = " ".join(["red"] * 72) + " a man img, smiling"
    got = apply(text, "v2", photos(2, 6, "v2"))
    assert got[0][0].shape == (1, 154, 2048)
    copies = got[0][1]["portraitbooth"]["class_copies"][0]
    ids = [t[0] for chunk in clip.tokenize(" ".join(["red"] * 72) + " a man man man man, smiling")["l"] for t in chunk]
    assert [ids[p] for p in copies] == [786] * 4


def test_a_weighted_class_word_scales_the_identity_like_any_token(clip, apply):
    face = photos(1, 8, "v1")
    plain = apply("a photo of a man img", "v1", face)[0][0]
    weighted = apply("a photo of a (man:1.2) img", "v1", face)[0][0]
    text_plain, text_weighted = encode(clip, "a photo of a man")[0], encode(clip, "a photo of a (man:1.2)")[0]
    # the identity's change over the text scales by the weight, as ComfyUI's weighting does for any token
    torch.testing.assert_close(weighted[0, 5] - text_weighted[0, 5], 1.2 * (plain[0, 5] - text_plain[0, 5]),
                               atol=2e-3, rtol=2e-3)


def test_delayed_identity_uses_the_text_only_prompt_before_the_start(clip, apply):
    got = apply("a photo of a man img, smiling", "v2", photos(1, 9, "v2"), start=0.2)
    ranges = [(item[1].get("start_percent"), item[1].get("end_percent")) for item in got]
    assert ranges == [(0.2, 1.0), (0.0, 0.2)]
    text_only = encode(clip, "a photo of a man, smiling")
    assert torch.equal(got[1][0], text_only[0])
    assert torch.equal(got[1][1]["pooled_output"], text_only[1]["pooled_output"])
    assert "portraitbooth" not in got[1][1]


# ---------------------------------------------------------------- refusals


def test_an_identity_for_the_other_version_names_the_mode_to_use(apply):
    with pytest.raises(ValueError, match="mode 'PhotoMaker v2' with Load FaceEncoder"):
        apply("a man img", "v2", photos(1, 1, "v1"))
    with pytest.raises(ValueError, match=r"comes from CLIP Vision Identity in mode 'PhotoMaker v2'.*mode "
                                         r"'PhotoMaker v1'"):
        apply("a man img", "v1", photos(1, 1, "v2"))


def test_a_fastcomposer_or_face_recognizer_identity_is_refused_by_name(apply):
    fastcomposer = Identity(embeddings=torch.randn(1, 768), vector=torch.randn(768), kind="clip_vision:vit-l-14",
                            normalized=False)
    with pytest.raises(ValueError, match="mode 'FastComposer'"):
        apply("a man img", "v1", fastcomposer)
    with pytest.raises(ValueError, match="a face recognizer"):
        apply("a man img", "v2", arcface_identity(0))


def test_an_sd15_clip_with_a_photomaker_file_names_both_families(apply, sd15_parts):
    with pytest.raises(ValueError, match=r"made for SDXL.*this CLIP has l \(SD1\.5\)"):
        apply("a man img", "v2", photos(1, 1, "v2"), the_clip=sd15_parts[1])


def test_an_sd15_file_with_an_sdxl_clip_names_both_families(pack_nodes, clip, tmp_path):
    from stea_fixtures import model

    node = pack_nodes["PortraitBoothApplySTEA"]
    with pytest.raises(ValueError, match=r"made for SD1\.5.*text encoders g, l \(SDXL\)"):
        node.execute(clip, model(tmp_path), arcface_identity(0), "a man", "", 0, 1.0, 0.0, 1.0)


# ---------------------------------------------------------------- Load PortraitBooth Model on SDXL


@pytest.fixture(scope="module")
def pm_files(sdxl_photomaker_models, pack_nodes):
    import folder_paths

    folder_paths.add_model_folder_path("portraitbooth", sdxl_photomaker_models["portraitbooth"])
    return {v: f"{name}.safetensors" for v, name in (("v1", "photomaker-v1-standin"), ("v2", "photomaker-v2-standin"))}


def test_the_photomaker_lora_goes_onto_the_sdxl_model_through_comfyuis_lora_machinery(pack_nodes, sdxl_parts,
                                                                                       pm_files):
    model = sdxl_parts[0]
    node = pack_nodes["PortraitBoothLoadModel"]
    patched, projector = node.execute(model, pm_files["v2"], 0.8).args
    lora_modules = sum(1 for k in projector.unet_patch if k.endswith(".lora_down.weight"))
    assert lora_modules > 0 and len(patched.patches) == lora_modules
    assert all(p[0][0] == 0.8 for p in patched.patches.values())  # the strength, as LoraLoaderModelOnly sets it
    assert model.patches == {}  # cloned, never modified
    assert node.execute(model, pm_files["v2"], 0.0).args[0] is model


def test_a_photomaker_file_on_an_sd15_model_names_both_families(pack_nodes, tiny_model, pm_files):
    from portraitbooth_core.weights.family import WrongFamilyError

    with pytest.raises(WrongFamilyError, match=r"the MODEL input is SD1\.5 \(text context 768\), but "
                                               r"photomaker-v1-standin\.safetensors is made for SDXL"):
        pack_nodes["PortraitBoothLoadModel"].execute(tiny_model, pm_files["v1"], 1.0)


def test_an_sd15_file_on_an_sdxl_model_names_both_families(pack_nodes, sdxl_parts, tmp_path):
    import folder_paths
    from stea_fixtures import write_model

    from portraitbooth_core.weights.family import WrongFamilyError

    folder = tmp_path / "pb"
    folder.mkdir()
    write_model(folder / "pb_sd15_on_xl.safetensors")
    folder_paths.add_model_folder_path("portraitbooth", str(folder))
    with pytest.raises(WrongFamilyError, match=r"the MODEL input is SDXL \(text context 2048\), but "
                                               r"pb_sd15_on_xl\.safetensors is made for SD1\.5"):
        pack_nodes["PortraitBoothLoadModel"].execute(sdxl_parts[0], "pb_sd15_on_xl.safetensors", 1.0)


# ---------------------------------------------------------------- sampling on SDXL: regions, ECAC, preview

LATENT = {"samples": torch.zeros(1, 4, 8, 16)}  # a 64x128 image: two 8x8 halves


def _sampled(pack_nodes, model, positive, negative, seed=1):
    import nodes as comfy_nodes

    return comfy_nodes.common_ksampler(model, seed, 2, 5.0, "euler", "normal", positive, negative, LATENT)[0]


@pytest.mark.parametrize("mode", ["regional attention", "multidiffusion"])
def test_the_region_sampler_places_two_photomaker_subjects_on_sdxl(pack_nodes, sdxl_parts, apply, mode):
    from portraitbooth_core.regions.layout import Box  # noqa: F401  (boxes below are the node's numbers)

    model, clip, _ = sdxl_parts
    a, b, c = photos(1, 31, "v2"), photos(1, 32, "v2"), photos(1, 33, "v2")
    negative = encode_list(clip, "blurry")
    region_node, sampler = pack_nodes["PortraitBoothRegion"], pack_nodes["PortraitBoothMultiSubjectSampler"]

    def run(second):
        glob = apply("a man img and a woman img", "v2", a, second)
        left = region_node.execute(apply("a photo of a man img", "v2", a), 1.0, 0.0, 0.0, 0.5, 1.0).args[0]
        both = region_node.execute(apply("a photo of a woman img", "v2", second), 1.0, 0.5, 0.0, 0.5, 1.0,
                                   previous=left).args[0]
        out = sampler.execute(model, glob, negative, both, LATENT, 3, 2, 5.0, "euler", "normal", 1.0, mode).args[0]
        return out["samples"]

    first, again, other = run(b), run(b), run(c)
    assert torch.isfinite(first).all() and torch.equal(first, again)
    moved = (other - first).abs()
    assert moved[..., 8:].mean() > moved[..., :8].mean()  # the right subject's face changed the right half more


def encode_list(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def test_ecac_and_the_attention_preview_run_on_sdxl_with_the_stacked_identity_tokens(pack_nodes, sdxl_parts, apply):
    from portraitbooth_core.ecac.layers import cross_attention_layers, select_layers

    model, clip, vae = sdxl_parts
    positive = apply("a photo of a smiling man img", "v2", photos(2, 41, "v2"))
    copies = positive[0][1]["portraitbooth"]["class_copies"][0]
    patched = pack_nodes["PortraitBoothECACPatch"].execute(
        model, clip, "", "", 1.0, 0.0, 0.6, 0.8, 0.1, "16x16 layers (recommended)", True, None, positive).args[0]
    store = patched.model_options["portraitbooth_ecac"]
    assert store.labels == ["identity", "smiling"]
    # the default layers: those at a quarter of the latent's resolution, as on SD1.5
    chosen = select_layers(cross_attention_layers(model.get_model_object("diffusion_model")), "mid")
    assert chosen and {layer.factor for layer in chosen} == {4}
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(attn2) == len({(l.block, l.number) if l.depth == 1 else (l.block, l.number, l.index) for l in chosen})
    with torch.inference_mode():  # as ComfyUI runs nodes
        samples = _sampled(pack_nodes, patched, positive, encode_list(clip, "blurry"))
        image = vae.decode(samples["samples"])
        preview = pack_nodes["PortraitBoothAttentionPreview"].execute(patched, image, 0.6).args[0]
    assert preview.shape[0] == 2 and torch.isfinite(preview).all()
    assert len(copies) == 4


def test_class_word_auto_follows_the_gender_and_every_trigger_is_removed(clip, apply):
    woman = photos(1, 51, "v1")
    woman.gender = "female"
    got = apply("a man img walks past a woman img", "v1", woman, class_word="auto")
    assert got[0][1]["portraitbooth"]["class_copies"] == [[6]]  # <start> a man walks past a woman
    plain = encode(clip, "a man walks past a woman")[0]  # no "img" left, after either class word
    keep = [i for i in range(77) if i != 6]
    assert torch.equal(got[0][0][:, keep], plain[:, keep])
