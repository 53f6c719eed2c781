"""CLIP Vision Identity in its PhotoMaker modes, in-process: the CLIP part is ComfyUI's own
preprocessing (PhotoMaker's centre crop) and hidden states, the v2 face part is exactly what
PhotoMaker's demo computes (insightface FaceAnalysis on the photo in BGR, the first face's
raw `embedding`), photos without a face are dropped from both stacks with a warning naming
them, and the pairing of photo and embedding is kept row by row."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from portraitbooth_core.face import build_encoder
from portraitbooth_core.face.errors import IdentityError
from portraitbooth_core.face.images import uint8_to_comfy
from portraitbooth_core.face.packs import pack_folder
from portraitbooth_core.face.photomaker_photos import PHOTOMAKER_V1_KIND, PHOTOMAKER_V2_FAMILY
from standins.photomaker import VISION, release_state_dict
from face_fixtures import zero_download_encoder  # noqa: F401  (fixture)
from test_face_insightface import _faceanalysis, packs, photos  # noqa: F401  (fixtures)

pytest.importorskip("insightface", reason="insightface packs need insightface (requirements-test.txt)")
NODE = "PortraitBoothCLIPVisionIdentity"


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    """ComfyUI's ClipVisionModel on a small tower in PhotoMaker's layout (Load CLIP Vision
    itself only recognizes full-size towers; the server tests use one)."""
    import comfy.clip_vision

    tower = {k.removeprefix(""): v for k, v in release_state_dict("v1", vision="tiny")["id_encoder"].items()
             if k.startswith("vision_model.") or k == "visual_projection.weight"}
    config = {**VISION["tiny"], "num_channels": 3, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model"}
    path = tmp_path_factory.mktemp("tower") / "vision.json"
    path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    missing, _ = model.load_sd({k: v for k, v in tower.items() if not k.endswith("position_ids")})
    assert not missing
    return model


def run(pack_nodes, clip_vision, images, mode, face_encoder=None, crop="full photo"):
    out = pack_nodes[NODE].execute(clip_vision, images, crop, 0.5, mode=mode, face_encoder=face_encoder)
    return out.args[0], out.args[1], out.ui


def test_v1_holds_each_photos_hidden_states_from_comfyuis_centre_crop(pack_nodes, clip_vision, photos):
    images = uint8_to_comfy([photos["astronaut.png"]] * 2)
    identity, preview, _ = run(pack_nodes, clip_vision, images, "PhotoMaker v1")
    expected = clip_vision.encode_image(images, crop=True)["last_hidden_state"].float()
    assert identity.kind == PHOTOMAKER_V1_KIND and not identity.normalized
    torch.testing.assert_close(identity.clip_hidden, expected)
    torch.testing.assert_close(identity.embeddings, expected[:, 0])
    assert preview.shape == (2, 224, 224, 3)


def test_v2_pairs_each_photo_with_faceanalysis_raw_bgr_embedding_and_drops_faceless_photos(
        pack_nodes, clip_vision, packs, photos, caplog):  # noqa: F811
    encoder = build_encoder(packs / "buffalo_l", provider="cpu")
    app = _faceanalysis(pack_folder(packs / "buffalo_l"))
    a, b = photos["astronaut.png"], photos["obama.jpg"]
    h, w = a.shape[:2]
    b = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(b).permute(2, 0, 1)[None].float(), size=(h, w))
                   [0].permute(1, 2, 0).round().clamp(0, 255).byte())
    blank = np.full_like(a, 90)
    images = uint8_to_comfy([a, blank, b])
    with caplog.at_level("WARNING"):
        identity, preview, ui = run(pack_nodes, clip_vision, images, "PhotoMaker v2", face_encoder=encoder)
    assert identity.kind == f"{PHOTOMAKER_V2_FAMILY}:vit-l-14+buffalo_l" and not identity.normalized
    assert identity.count == 2 and identity.clip_hidden.shape[0] == 2 and preview.shape[0] == 2
    hidden = clip_vision.encode_image(images, crop=True)["last_hidden_state"].float()
    torch.testing.assert_close(identity.clip_hidden, hidden[[0, 2]])
    for row, rgb in enumerate((a, b)):
        theirs = app.get(np.ascontiguousarray(rgb[:, :, ::-1]))[0].embedding  # PhotoMaker: faces[0], BGR, raw
        np.testing.assert_allclose(identity.embeddings[row].numpy(), theirs, atol=1e-5 * float(np.abs(theirs).max()))
    assert "image 2 of 3: no face found - dropped" in caplog.text
    assert "image 2 of 3: no face found - dropped" in ui["text"][0]


def test_v2_needs_an_insightface_arcface_encoder(pack_nodes, clip_vision, photos, zero_download_encoder):
    images = uint8_to_comfy([photos["astronaut.png"]])
    with pytest.raises(IdentityError, match="connect Load FaceEncoder"):
        run(pack_nodes, clip_vision, images, "PhotoMaker v2")
    with pytest.raises(IdentityError, match="insightface pack 'buffalo_l'"):
        run(pack_nodes, clip_vision, images, "PhotoMaker v2", face_encoder=zero_download_encoder)


def test_an_unknown_mode_is_refused_by_name(pack_nodes, clip_vision, photos):
    with pytest.raises(ValueError, match="mode: 'PhotoMaker v3' is not one of"):
        run(pack_nodes, clip_vision, uint8_to_comfy([photos["astronaut.png"]]), "PhotoMaker v3")


def _v2_identity(n=2, seed=0):
    from portraitbooth_core.face.photomaker_photos import PHOTOMAKER_V2_KIND
    from portraitbooth_core.face.types import Identity

    gen = torch.Generator().manual_seed(seed)
    faces = torch.randn(n, 512, generator=gen) * 3
    return Identity(embeddings=faces, vector=faces.mean(0), kind=PHOTOMAKER_V2_KIND, normalized=False,
                    clip_hidden=torch.randn(n, 257, 1024, generator=gen), metadata={"sources": ["a", "b"][:n]})


def test_a_photomaker_identity_file_keeps_every_photos_pair(tmp_path):
    from portraitbooth_core.face import load_identity, save_identity

    identity = _v2_identity()
    path, _ = save_identity(tmp_path / "pm.safetensors", identity)
    back = load_identity(path)
    assert back.kind == identity.kind and not back.normalized
    assert torch.equal(back.embeddings, identity.embeddings) and torch.equal(back.clip_hidden, identity.clip_hidden)
    from portraitbooth_core.face.identity_file import IdentityFileError

    with pytest.raises(IdentityFileError, match="turn per_photo_embeddings on"):
        save_identity(tmp_path / "pm2.safetensors", identity, per_photo_embeddings=False)


def test_a_photomaker_identity_file_with_unpaired_rows_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from portraitbooth_core.face import load_identity, save_identity
    from portraitbooth_core.face.identity_file import IdentityFileError

    path, _ = save_identity(tmp_path / "pm.safetensors", _v2_identity())
    tensors = load_file(str(path))
    with open(path, "rb") as f:
        header = json.loads(f.read(8 + int.from_bytes(open(path, "rb").read(8), "little"))[8:])["__metadata__"]
    tensors["clip_hidden"] = tensors["clip_hidden"][:1]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=header)
    with pytest.raises(IdentityFileError, match=r"clip_hidden \(1, 257, 1024\) does not hold one"):
        load_identity(tmp_path / "cut.safetensors")


def test_photomaker_identities_are_not_blended_by_weight():
    from portraitbooth_core.face import mix_identities

    with pytest.raises(IdentityError, match="give CLIP Vision Identity photos of both in one batch"):
        mix_identities(_v2_identity(seed=1), _v2_identity(seed=2), 0.5)


def test_identity_score_reads_the_face_part_of_a_v2_identity(pack_nodes, clip_vision, packs, photos):  # noqa: F811
    encoder = build_encoder(packs / "buffalo_l", provider="cpu")
    one_face = (np.asarray(photos["astronaut.png"], np.float32) * 0.97).astype(np.uint8)
    one_face[200:207, 200:207] = 255  # the stand-in detector's only face (white squares, as `marked`)
    image = uint8_to_comfy([one_face])
    identity, _, _ = run(pack_nodes, clip_vision, image, "PhotoMaker v2", face_encoder=encoder)
    scored = pack_nodes["PortraitBoothIdentityScore"].execute(encoder, identity, image, True, 0.5).args
    assert scored[1][0] == pytest.approx(1.0, abs=1e-5), scored[3]  # the photo's own face
    v1, _, _ = run(pack_nodes, clip_vision, image, "PhotoMaker v1")
    with pytest.raises(IdentityError, match="analyzed with 'clip_vision:vit-l-14'"):
        pack_nodes["PortraitBoothIdentityScore"].execute(encoder, v1, image, True, 0.5)
