"""Identity files (issue 16, item 2) and combining several photos, in-process.

The core writes and strictly reads the file; Save Identity / Load Identity are thin nodes over
it in the registered `portraitbooth_identities` folder. The server round trip (bit-identical
conditioning) is in test_identity_server.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct

import pytest
import torch
import torch.nn.functional as F

from face_fixtures import *  # noqa: F401,F403
from face_fixtures import read_photo
from portraitbooth_core.face import (COMBINE_MODES, MEAN_OF_NORMALISED, NORMALISED_MEAN, Identity, IdentityError,
                                     IdentityFileError, build_identity, load_identity, mix_identities, save_identity,
                                     uint8_to_comfy)
from portraitbooth_core.face import identity_file
from portraitbooth_core.paths import BadInputError, PathNotAllowedError

KIND = "arcface:standin_r50/w600k_r50.onnx"
ENCODER = {"pack": "standin_r50", "detector": "retinaface", "recognizer": "arcface", "recognizer_kind": KIND,
           "provider": "cpu", "det_size": 640, "masks": "fallback"}


def _raw(n: int = 3, dim: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=g)
    # one person (a shared direction) plus a stranger at the end; norms differ like ArcFace's
    rows = [(base + 0.5 * torch.randn(dim, generator=g)) * (10 + 5 * i) for i in range(n - 1)]
    return torch.stack([*rows, torch.randn(dim, generator=g) * 12])


def _identity(**kw) -> Identity:
    return build_identity(_raw(), KIND, ["me_1.jpg", "me_2.jpg", "stranger.jpg"], threshold=0.3,
                          metadata={"encoder": dict(ENCODER), "warnings": ["me_1.jpg: the face is only 40 px"]},
                          **kw)


def _assert_same(a: Identity, b: Identity) -> None:
    """Every field of the identity type is equal (tensors bit for bit), except the face crops."""
    assert torch.equal(a.vector, b.vector) and a.vector.dtype == b.vector.dtype == torch.float32
    assert torch.equal(a.embeddings, b.embeddings)
    for f in dataclasses.fields(a):
        if f.name in ("vector", "embeddings", *identity_file.NOT_STORED):
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), f"field {f.name}: {x!r} != {y!r}"


# -- combining photos ----------------------------------------------------------------------------

def test_combine_modes_and_weights_compute_what_they_say():
    raw = _raw()
    unit = F.normalize(raw, dim=-1)
    default = build_identity(raw, KIND)
    assert default.metadata["combine"] == {"mode": MEAN_OF_NORMALISED, "weights": None}
    # the default is bit-for-bit what the pack always computed
    assert torch.equal(default.vector, F.normalize(unit.mean(0), dim=-1))
    normed_mean = build_identity(raw, KIND, combine=NORMALISED_MEAN)
    torch.testing.assert_close(normed_mean.vector, F.normalize(raw.mean(0), dim=-1))
    assert not torch.allclose(normed_mean.vector, default.vector, atol=1e-3), "raw norms differ: modes must differ"
    weighted = build_identity(raw, KIND, weights="2, 1, 0")
    torch.testing.assert_close(weighted.vector, F.normalize((2 * unit[0] + unit[1]) / 3, dim=-1))
    assert weighted.metadata["combine"] == {"mode": MEAN_OF_NORMALISED, "weights": [2.0, 1.0, 0.0]}
    only_first = build_identity(raw, KIND, combine=NORMALISED_MEAN, weights=[1, 0, 0])
    torch.testing.assert_close(only_first.vector, unit[0])
    assert set(COMBINE_MODES) == {MEAN_OF_NORMALISED, NORMALISED_MEAN}


@pytest.mark.parametrize("weights, words", [
    ("1, 2", "2 weight(s) for 3 photo(s)"), ([1, 1, 1, 1], "4 weight(s) for 3 photo(s)"),
    ("1, -0.5, 1", "not a finite number >= 0"), ("1, nan, 1", "not a finite number >= 0"),
    ("1, inf, 1", "not a finite number >= 0"), ("0, 0, 0", "every weight is 0"),
    ("1, two, 3", "'two' is not a number"), ("1\x00, 1, 1", "NUL byte"),
])
def test_bad_weights_are_refused_naming_the_input(weights, words):
    with pytest.raises(IdentityError) as info:
        build_identity(_raw(), KIND, weights=weights)
    assert str(info.value).startswith("weights: ") and words in str(info.value), str(info.value)


def test_unknown_combine_mode_is_refused():
    with pytest.raises(IdentityError, match="combine: 'median' is not one of"):
        build_identity(_raw(), KIND, combine="median")


def test_outliers_are_reported_by_photo_name():
    ident = _identity()
    (outlier,) = ident.metadata["outliers"]
    assert outlier["photo"] == "stranger.jpg" and outlier["index"] == 2 and outlier["of"] == 2
    assert outlier["matches"] == 0 and outlier["threshold"] == 0.3
    assert any("stranger.jpg looks like a different person" in w for w in ident.metadata["warnings"])


# -- the file ------------------------------------------------------------------------------------

def test_identity_round_trips_bit_for_bit_with_its_report(tmp_path):
    ident = _identity(combine=NORMALISED_MEAN, weights="1, 0.5, 0")
    path, written = save_identity(tmp_path / "me.safetensors", ident)
    assert written
    loaded = load_identity(path)
    _assert_same(ident, loaded)
    assert loaded.aligned is None  # face crops are pictures of the person: never stored
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["embeddings", "vector"]
        header = json.loads(f.metadata()[identity_file.METADATA_KEY])
    assert header["format"] == "portraitbooth-identity/1" and header["kind"] == KIND
    assert header["dim"] == 512 and header["count"] == 3 and header["per_photo_embeddings"] is True
    assert header["encoder"]["pack"] == "standin_r50" and header["encoder"]["recognizer"] == "arcface"
    assert header["photos"] == ["me_1.jpg", "me_2.jpg", "stranger.jpg"]
    assert header["outliers"][0]["photo"] == "stranger.jpg"
    assert header["combine"] == {"mode": NORMALISED_MEAN, "weights": [1.0, 0.5, 0.0]}
    # every field of the Identity type is in the file (generically), except the face crops
    stored = {"vector", "embeddings", "kind", "metadata", *header["fields"]}
    assert stored | identity_file.NOT_STORED == {f.name for f in dataclasses.fields(Identity)}


def test_fields_added_to_the_identity_type_round_trip_without_changing_the_file_code(tmp_path, monkeypatch):
    """Conventions (face order, raw or normalised embedding) are fields the face core adds to
    Identity: the file stores every field generically, so they survive a save and load."""
    @dataclasses.dataclass
    class Extended(Identity):
        gaze_rule: str = "camera"
        crop_version: int = 1
        crop_size: tuple = (112, 112)

    monkeypatch.setattr(identity_file, "Identity", Extended)
    base = _identity()
    ident = Extended(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Identity)},
                     gaze_rule="any", crop_version=2, crop_size=(128, 128))
    path, _ = save_identity(tmp_path / "conventions.safetensors", ident)
    loaded = load_identity(path)
    assert isinstance(loaded, Extended)
    assert (loaded.gaze_rule, loaded.crop_version, loaded.crop_size) == ("any", 2, [128, 128])
    loaded.crop_size = tuple(loaded.crop_size)  # JSON has lists only
    _assert_same(ident, loaded)
    monkeypatch.setattr(identity_file, "Identity", Identity)  # an older pack reading a newer file
    with pytest.raises(IdentityFileError, match=r"conventions.safetensors: stores identity fields this version "
                                                r"does not know \(crop_size, crop_version, gaze_rule\)"):
        load_identity(path)


def test_the_identity_conventions_round_trip(tmp_path):
    """Face order, raw or normalised embedding, gender and age (the face core's fields) are in
    the file, so a model trained on other conventions can refuse a loaded identity too."""
    raw = build_identity(_raw(), KIND, ["a", "b", "c"], normalized=False)
    ident = dataclasses.replace(raw, face_order="left to right", gender="female", age=31.5)
    path, _ = save_identity(tmp_path / "raw.safetensors", ident)
    loaded = load_identity(path)
    assert (loaded.normalized, loaded.face_order, loaded.gender, loaded.age) == (False, "left to right", "female",
                                                                                 31.5)
    _assert_same(ident, loaded)


def test_per_photo_embeddings_can_be_left_out(tmp_path):
    ident = _identity()
    path, _ = save_identity(tmp_path / "vector_only.safetensors", ident, per_photo_embeddings=False)
    loaded = load_identity(path)
    assert torch.equal(loaded.vector, ident.vector) and loaded.embeddings.shape == (1, 512)
    assert loaded.metadata["per_photo_embeddings"] is False
    assert loaded.metadata["sources"] == ["me_1.jpg", "me_2.jpg", "stranger.jpg"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["vector"]


def test_a_mix_and_a_raw_clip_identity_round_trip(tmp_path):
    a, b = _identity(), build_identity(_raw(seed=1), KIND, ["other.jpg"] * 3)
    mixed = mix_identities(a, b, 0.25)
    assert mixed.metadata["encoder"] == ENCODER
    _assert_same(mixed, load_identity(save_identity(tmp_path / "mix.safetensors", mixed)[0]))
    raw = torch.randn(2, 768) * 25
    clip = Identity(embeddings=raw, vector=raw.mean(0), kind="clip_vision:vit-l-14",
                    metadata={"sources": ["a", "b"], "warnings": [], "normalized": False, "crop": "full photo"})
    _assert_same(clip, load_identity(save_identity(tmp_path / "clip.safetensors", clip)[0]))


def test_never_overwrites_another_identity_without_overwrite(tmp_path):
    path = tmp_path / "me.safetensors"
    first = _identity()
    save_identity(path, first)
    before = path.read_bytes()
    assert save_identity(path, first) == (path, False)  # the same identity again: left as it is
    other = build_identity(_raw(seed=5), KIND)
    with pytest.raises(IdentityFileError, match="me.safetensors already exists .* turn on overwrite"):
        save_identity(path, other)
    assert path.read_bytes() == before
    assert save_identity(path, other, overwrite=True) == (path, True)
    assert torch.equal(load_identity(path).vector, other.vector)
    assert [p.name for p in tmp_path.iterdir()] == ["me.safetensors"]  # no temp file left


def _write(path, tensors: dict, header: dict | None, raw_meta: dict | None = None):
    from safetensors.torch import save_file

    meta = raw_meta if raw_meta is not None else {identity_file.METADATA_KEY: json.dumps(header)}
    save_file(tensors, str(path), metadata=meta)
    return path


class _Pwn:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_files_are_refused_naming_the_file_and_the_problem(tmp_path):
    good, _ = save_identity(tmp_path / "good.safetensors", _identity())
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        header = json.loads(f.metadata()[identity_file.METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def edited(**changes):
        return {**header, **changes}

    without_kind = {k: v for k, v in header.items() if k != "kind"}
    cases = {
        "garbage": (lambda p: p.write_bytes(os.urandom(2048)), "corrupt or not a safetensors file"),
        "pickle": (lambda p: p.write_bytes(pickle.dumps(_Pwn(tmp_path / "PWNED"))), "not a safetensors file"),
        "huge_header": (lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}"), "header length"),
        "truncated": (lambda p: p.write_bytes(good.read_bytes()[:-100]), "is truncated"),
        "no_metadata": (lambda p: _write(p, tensors, None, raw_meta={}), "not an identity file"),
        "model_file": (lambda p: _write(p, tensors, None, raw_meta={"portraitbooth": "{}"}),
                       "PortraitBooth model file"),
        "not_json": (lambda p: _write(p, tensors, None, raw_meta={identity_file.METADATA_KEY: "{nope"}),
                     "not valid JSON"),
        "newer": (lambda p: _write(p, tensors, edited(format="portraitbooth-identity/2")), "newer PortraitBooth"),
        "no_kind": (lambda p: _write(p, tensors, without_kind), "lacks kind"),
        "extra_key": (lambda p: _write(p, tensors, edited(surprise=1)), "unknown identity metadata keys surprise"),
        "bad_dim": (lambda p: _write(p, tensors, edited(dim="512")), "dim is '512'"),
        "bad_photos": (lambda p: _write(p, tensors, edited(photos=[1, 2])), "photos holds something other"),
        "no_vector": (lambda p: _write(p, {"embeddings": tensors["embeddings"]}, header), "missing tensor(s) vector"),
        "no_embeddings": (lambda p: _write(p, {"vector": tensors["vector"]}, header),
                          "missing tensor(s) embeddings"),
        "wrong_shape": (lambda p: _write(p, {**tensors, "vector": torch.zeros(128)}, header),
                        "vector (128,) (expected (512,))"),
        "stray_tensor": (lambda p: _write(p, {**tensors, "aligned": torch.zeros(3, 112, 112, 3, dtype=torch.uint8)},
                                          header), "unexpected tensor(s) aligned"),
        "half": (lambda p: _write(p, {**tensors, "vector": tensors["vector"].half()}, header),
                 "vector is torch.float16"),
        "nan": (lambda p: _write(p, {**tensors, "vector": torch.full((512,), float("nan"))}, header),
                "non-finite"),
        "zero": (lambda p: _write(p, {**tensors, "vector": torch.zeros(512)}, header), "vector is zero"),
        "unknown_field": (lambda p: _write(p, tensors, edited(fields={"gaze": "left"})),
                          "fields this version does not know (gaze)"),
        "mistyped_field": (lambda p: _write(p, tensors, edited(fields={**header["fields"], "normalized": "no"})),
                           "normalized is 'no', expected bool"),
    }
    problems = []
    for name, (make, words) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        make(path)
        try:
            load_identity(path)
            problems.append(f"{name}: loaded")
        except IdentityFileError as exc:
            if path.name not in str(exc) or words not in str(exc):
                problems.append(f"{name}: {exc}")
    assert not problems, "\n".join(problems)
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(IdentityFileError, match="identity file not found: absent.safetensors"):
        load_identity(tmp_path / "absent.safetensors")


# -- the nodes -----------------------------------------------------------------------------------

@pytest.fixture
def identity_folders(tmp_path, monkeypatch, pack_nodes):
    """Two registered identity folders (as extra_model_paths.yaml can give): writes go to the first."""
    import folder_paths

    first, second = tmp_path / "ids_a", tmp_path / "ids_b"
    second.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "portraitbooth_identities",
                        ([str(first), str(second)], {".safetensors"}))
    return first, second


def test_identity_nodes_are_registered_in_their_folder_with_tooltips(pack_nodes):
    import folder_paths

    assert "portraitbooth_identities" in folder_paths.folder_names_and_paths
    for node_id in ("PortraitBoothSaveIdentity", "PortraitBoothLoadIdentity", "PortraitBoothAnalyzeFaces"):
        schema = pack_nodes[node_id].define_schema()
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{node_id}: inputs without a tooltip: {missing}"
    analyze = {i.id: i for i in pack_nodes["PortraitBoothAnalyzeFaces"].define_schema().inputs}
    assert analyze["combine"].optional and analyze["combine"].default == MEAN_OF_NORMALISED
    assert analyze["weights"].optional and analyze["weights"].default == ""
    save = {i.id: i for i in pack_nodes["PortraitBoothSaveIdentity"].define_schema().inputs}
    assert save["overwrite"].default is False


def test_save_node_writes_to_the_first_folder_and_load_node_reads_it(pack_nodes, identity_folders):
    first, second = identity_folders
    save, load = pack_nodes["PortraitBoothSaveIdentity"], pack_nodes["PortraitBoothLoadIdentity"]
    ident = _identity()
    out = save.execute(face_embedding=ident, identity_name="alice", overwrite=False, per_photo_embeddings=True)
    target = first / "alice.safetensors"
    assert target.is_file() and out.result[1] == str(target.resolve())
    assert out.ui["text"] == [f"saved: {target.resolve()}"]
    assert out.result[0] is ident
    options = {i.id: i for i in load.define_schema().inputs}["identity_name"].options
    assert options == ["alice.safetensors"]
    loaded, info = load.execute(identity_name="alice.safetensors").result
    _assert_same(ident, loaded)
    assert "from 3 photo(s): me_1.jpg, me_2.jpg, stranger.jpg" in info and "outlier: stranger.jpg" in info
    again = save.execute(face_embedding=ident, identity_name="alice.safetensors", overwrite=False,
                         per_photo_embeddings=True)
    assert again.ui["text"][0].startswith("unchanged")
    other = build_identity(_raw(seed=9), KIND)
    with pytest.raises(IdentityFileError, match="identity_name: alice.safetensors already exists"):
        save.execute(face_embedding=other, identity_name="alice", overwrite=False, per_photo_embeddings=True)
    save.execute(face_embedding=other, identity_name="alice", overwrite=True, per_photo_embeddings=True)
    assert torch.equal(load.execute(identity_name="alice.safetensors").result[0].vector, other.vector)
    assert not list(second.iterdir())


@pytest.mark.parametrize("name", ["../escape", "sub/alice", "a\\b", "..", ".hidden", "", "   ", "a\x00b",
                                  ".safetensors", "/etc/passwd", "x" * 300])
def test_save_node_refuses_names_that_are_not_one_plain_name(pack_nodes, identity_folders, name):
    first, _ = identity_folders
    with pytest.raises(BadInputError, match="identity_name"):
        pack_nodes["PortraitBoothSaveIdentity"].execute(face_embedding=_identity(), identity_name=name,
                                                        overwrite=False, per_photo_embeddings=True)
    assert not first.exists() or not list(first.iterdir())


def test_save_node_does_not_write_through_a_symlink_out_of_the_folder(pack_nodes, identity_folders, tmp_path):
    first, _ = identity_folders
    first.mkdir()
    outside = tmp_path / "outside.safetensors"
    (first / "link.safetensors").symlink_to(outside)
    with pytest.raises(PathNotAllowedError, match="identity_name"):
        pack_nodes["PortraitBoothSaveIdentity"].execute(face_embedding=_identity(), identity_name="link",
                                                        overwrite=True, per_photo_embeddings=True)
    assert not outside.exists()


def test_load_node_takes_only_a_listed_file_and_names_a_bad_one(pack_nodes, identity_folders):
    first, _ = identity_folders
    first.mkdir()
    (first / "broken.safetensors").write_bytes(b"\x00" * 64)
    load = pack_nodes["PortraitBoothLoadIdentity"]
    for value in ("../ids_b/x.safetensors", "/etc/passwd", "missing.safetensors"):
        with pytest.raises(BadInputError, match="identity_name"):
            load.execute(identity_name=value)
        assert load.validate_inputs(identity_name=value) is not True
    with pytest.raises(IdentityFileError, match="identity_name: broken.safetensors is corrupt"):
        load.execute(identity_name="broken.safetensors")


def test_analyze_node_weights_and_combine(pack_nodes, zero_download_encoder, photos_dir):
    """Real photos through the node: weight 0 leaves a photo out; a count mismatch names the input."""
    analyze = pack_nodes["PortraitBoothAnalyzeFaces"]
    photos = [read_photo(photos_dir, n) for n in ("obama.jpg", "biden.jpg")]
    batch = uint8_to_comfy(photos) if photos[0].shape == photos[1].shape else None
    if batch is None:  # a ComfyUI batch needs one size; the node's caller would resize the same way
        import numpy as np
        from PIL import Image

        h, w = photos[0].shape[:2]
        photos[1] = np.asarray(Image.fromarray(photos[1]).resize((w, h)))
        batch = uint8_to_comfy(photos)
    common = dict(face_encoder=zero_download_encoder, images=batch, select="largest", face_index=0,
                  on_no_face="error", det_threshold=0.6)
    alone = analyze.execute(**{**common, "images": uint8_to_comfy(photos[:1])}).result[0]
    first_only, _, _, report = analyze.execute(**common, combine=NORMALISED_MEAN, weights="1, 0").result
    torch.testing.assert_close(first_only.vector, alone.vector)
    assert "weighted 1, 0" in report and "normalized mean of 2 raw" in report
    both = analyze.execute(**common).result[0]
    assert both.metadata["combine"] == {"mode": MEAN_OF_NORMALISED, "weights": None}
    with pytest.raises(IdentityError, match=r"weights: 3 weight\(s\) for 2 photo\(s\)"):
        analyze.execute(**common, weights="1 1 1")
