"""CLIP Vision Identity node and Apply STEA with an imported FastComposer projector, in-process.

A small stand-in FastComposer release (standins/fastcomposer.py, real layout) is imported
with the CLI; its CLIP vision file is loaded by ComfyUI's own ClipVisionModel from the
config the import stores (Load CLIP Vision only recognizes a full ViT-L; the server test
uses one). The photos are real; the zero-download face encoder finds their faces.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import diffusers  # noqa: E402,F401  (requirements-test.txt)
import transformers  # noqa: E402,F401

from portraitbooth_core.face.clip_image import (  # noqa: E402
    CLIP_VISION_KIND, CROP_MODES, clip_image_identity, person_crop_box,
)
from portraitbooth_core.face.errors import NoFaceError  # noqa: E402
from portraitbooth_core.paths import BadInputError  # noqa: E402
from portraitbooth_core.stea.postfuse import FastComposerPostfuse  # noqa: E402
from portraitbooth_core.weights.meta import EmbeddingMismatchError  # noqa: E402
from face_fixtures import zero_download_encoder  # noqa: E402,F401  (fixture)
from stea_fixtures import identity as arcface_identity, write_model  # noqa: E402
from standins.fastcomposer import build_fastcomposer_release  # noqa: E402
from portraitbooth_core.weights.formats import fastcomposer as fc  # noqa: E402
from training.__main__ import main as cli  # noqa: E402

NODE = "PortraitBoothCLIPVisionIdentity"
PROMPT = "a photo of a man, portrait"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = build_fastcomposer_release(tmp_path_factory.mktemp("release") / "pytorch_model.bin", "tiny", seed=3)
    return path, torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def models(release, tmp_path_factory, pack_nodes):
    import folder_paths

    models = tmp_path_factory.mktemp("models")
    assert cli(["import-fastcomposer", str(release[0]), "--models", str(models)]) == 0
    folder_paths.add_model_folder_path("portraitbooth", str(models / "portraitbooth"))
    write_model(models / "portraitbooth" / "pb_arcface.safetensors")  # a face-recognizer projector
    return models


@pytest.fixture(scope="module")
def clip_vision(models, tmp_path_factory):
    """ComfyUI's ClipVisionModel on the imported file (the small config the import recorded)."""
    import comfy.clip_vision
    from safetensors import safe_open

    path = fc.output_paths(models)["clip_vision"]
    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(f.metadata()["portraitbooth_import"])["config"]
    cfg = tmp_path_factory.mktemp("vision") / "vision.json"
    cfg.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(cfg))
    missing, unexpected = model.load_sd(sd)
    assert not missing and not unexpected
    return model


def photo(photos_dir, name) -> torch.Tensor:
    rgb = np.asarray(Image.open(photos_dir / name).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(rgb)[None]


def run_node(pack_nodes, clip_vision, images, crop=CROP_MODES[0], det_threshold=0.6, face_encoder=None):
    return pack_nodes[NODE].execute(clip_vision, images, crop, det_threshold, face_encoder=face_encoder).args


def test_node_schema_has_tooltips_and_the_crop_modes(pack_nodes):
    schema = pack_nodes[NODE].define_schema()
    assert schema.display_name == "CLIP Vision Identity (PortraitBooth)"
    for spec in schema.inputs:
        assert spec.tooltip, f"{spec.id} has no tooltip"
    crop = next(i for i in schema.inputs if i.id == "crop")
    assert list(crop.options) == list(CROP_MODES) and crop.default == "full photo"
    assert next(i for i in schema.inputs if i.id == "face_encoder").optional
    assert [o.io_type for o in schema.outputs] == ["PB_FACE_EMBEDDING", "IMAGE"]


def test_full_photo_gives_the_clip_identity(pack_nodes, clip_vision, photos_dir):
    obama = photo(photos_dir, "obama.jpg")
    ident, preview = run_node(pack_nodes, clip_vision, obama)
    assert ident.kind == CLIP_VISION_KIND and ident.dim == 768 and ident.metadata["crop"] == "full photo"
    assert preview.shape == (1, 224, 224, 3)
    torch.testing.assert_close(ident.vector, clip_image_identity(clip_vision, obama).vector)
    other, _ = run_node(pack_nodes, clip_vision, photo(photos_dir, "biden.jpg"))
    assert (other.vector - ident.vector).norm() > 1e-3 * ident.vector.norm()


def test_person_crop_uses_the_largest_face(pack_nodes, clip_vision, photos_dir, zero_download_encoder):  # noqa: F811
    obama = photo(photos_dir, "obama.jpg")
    ident, preview = run_node(pack_nodes, clip_vision, obama, "person around face", face_encoder=zero_download_encoder)
    assert ident.metadata["crop"] == "person around face"
    image = (obama[0].numpy() * 255).round().astype(np.uint8)
    face = max(zero_download_encoder.detect(image, 0.6), key=lambda f: f.area)
    box = person_crop_box(face.box, image.shape[1], image.shape[0])
    want = clip_image_identity(clip_vision, obama, boxes=[box])
    torch.testing.assert_close(ident.vector, want.vector)
    full, full_preview = run_node(pack_nodes, clip_vision, obama)
    assert not torch.equal(preview, full_preview) and not torch.equal(ident.vector, full.vector)


def test_crop_errors_are_clear(pack_nodes, clip_vision, photos_dir, zero_download_encoder):  # noqa: F811
    obama = photo(photos_dir, "obama.jpg")
    with pytest.raises(ValueError, match="'person around face' needs a face encoder.*Load FaceEncoder.*'full photo'"):
        run_node(pack_nodes, clip_vision, obama, "person around face")
    with pytest.raises(NoFaceError, match=r"no face found in image 1 of 1 .*'full photo'"):
        run_node(pack_nodes, clip_vision, torch.full((1, 200, 160, 3), 0.5), "person around face",
                 face_encoder=zero_download_encoder)
    with pytest.raises(BadInputError, match="crop"):
        run_node(pack_nodes, clip_vision, obama, "face only")
    assert "crop" in pack_nodes[NODE].validate_inputs(crop="../face only")
    with pytest.raises(TypeError, match="Load CLIP Vision"):
        run_node(pack_nodes, None, obama)


def _reference_postfuse(w: dict[str, torch.Tensor], text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """FastComposer's postfuse from its architecture (LN, 1536->768, GELU, 768->768, + text;
    LN, MLP, + residual; final LN)."""
    def mlp(x, p):
        x = F.layer_norm(x, x.shape[-1:], w[f"{p}.layernorm.weight"], w[f"{p}.layernorm.bias"], 1e-5)
        return F.linear(F.gelu(F.linear(x, w[f"{p}.fc1.weight"], w[f"{p}.fc1.bias"])), w[f"{p}.fc2.weight"],
                        w[f"{p}.fc2.bias"])

    x = mlp(torch.cat([text, image], -1), "mlp1") + text
    x = mlp(x, "mlp2") + x
    return F.layer_norm(x, x.shape[-1:], w["layer_norm.weight"], w["layer_norm.bias"], 1e-5)


def test_apply_stea_runs_the_postfuse_projector(pack_nodes, models, release, clip_vision, photos_dir,
                                                tiny_model, sd15_parts):
    _model, clip, _vae = sd15_parts
    model, projector = pack_nodes["PortraitBoothLoadModel"].execute(tiny_model, "fastcomposer_postfuse.safetensors",
                                                                     1.0).args
    assert isinstance(projector.projector, FastComposerPostfuse)
    assert model is tiny_model  # no UNet patch in the projector file: the FastComposer UNet is its own file
    face, _ = run_node(pack_nodes, clip_vision, photo(photos_dir, "obama.jpg"))
    (cond,) = pack_nodes["PortraitBoothApplySTEA"].execute(clip, projector, face, PROMPT, "", 0, 1.0, 0.0,
                                                           1.0).args
    (id_tensor, extra), = cond
    (position,) = extra["portraitbooth"]["class_positions"]
    plain = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))[0][0]
    prefix = "postfuse_module."
    weights = {k[len(prefix):]: v.float() for k, v in release[1].items() if k.startswith(prefix)}
    want = _reference_postfuse(weights, plain[:, position], face.vector[None].float())
    torch.testing.assert_close(id_tensor[:, position], want, atol=1e-5, rtol=1e-5)
    keep = [i for i in range(id_tensor.shape[1]) if i != position]
    assert torch.equal(id_tensor[:, keep], plain[:, keep])
    # FastComposer's delayed conditioning: plain text before 30% of the schedule, identity after.
    (delayed,) = pack_nodes["PortraitBoothApplySTEA"].execute(clip, projector, face, PROMPT, "", 0, 1.0, 0.3, 1.0).args
    ranges = sorted((e["start_percent"], e["end_percent"], "portraitbooth" in e) for _c, e in delayed)
    assert ranges == [(0.0, 0.3, False), (0.3, 1.0, True)]


def test_mismatched_projector_and_embedding_name_both_kinds(pack_nodes, models, clip_vision, photos_dir,
                                                            tiny_model, sd15_parts):
    _model, clip, _vae = sd15_parts
    apply = pack_nodes["PortraitBoothApplySTEA"]
    load = pack_nodes["PortraitBoothLoadModel"]
    face, _ = run_node(pack_nodes, clip_vision, photo(photos_dir, "obama.jpg"))
    _, arcface_projector = load.execute(tiny_model, "pb_arcface.safetensors", 1.0).args
    with pytest.raises(EmbeddingMismatchError) as info:
        apply.execute(clip, arcface_projector, face, PROMPT, "", 0, 1.0, 0.0, 1.0)
    assert "arcface:standin/w600k_r50.onnx" in str(info.value) and CLIP_VISION_KIND in str(info.value)
    _, postfuse = load.execute(tiny_model, "fastcomposer_postfuse.safetensors", 1.0).args
    for recognized in (arcface_identity(1), arcface_identity(2, dim=768, kind="arcface:some-768-d")):
        with pytest.raises(EmbeddingMismatchError) as info:
            apply.execute(clip, postfuse, recognized, PROMPT, "", 0, 1.0, 0.0, 1.0)
        assert recognized.kind in str(info.value) and CLIP_VISION_KIND in str(info.value)
