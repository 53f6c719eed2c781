"""The path policy (portraitbooth_core.paths) applied to what a user-supplied dataset names:
shard files, tar files and the recognizer are found inside their folders, never elsewhere."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training_fixtures import *  # noqa: F401,F403


@pytest.fixture
def dataset_copy(dataset_dir, tmp_path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(dataset_dir, folder)
    return folder


def test_core_rule_refuses_traversal_absolute_symlinks_nul_and_overlong(tmp_path):
    from portraitbooth_core.paths import (BadInputError, PathNotAllowedError, check_choice, check_file_name,
                                          check_under_roots, inside)

    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    (base / "sub" / "f.json").write_text("{}")
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (base / "link.json").symlink_to(outside)
    assert inside(base, "sub/f.json", "x") == (base / "sub" / "f.json").resolve()
    for bad in ("../outside.json", "sub/../../outside.json", str(outside), "/etc/passwd", "link.json",
                "C:\\Windows\\win.ini", ".."):
        with pytest.raises(PathNotAllowedError, match=r"^shard name: "):
            inside(base, bad, "shard name")
    for bad in ("a\x00b", "", None, 7):
        with pytest.raises(BadInputError, match=r"^shard name: "):
            inside(base, bad, "shard name")
    assert check_under_roots("sub", [base], "dataset", relative_to=base) == (base / "sub").resolve()
    for path in (str(outside), "../outside.json", "link.json"):
        with pytest.raises(PathNotAllowedError, match="^dataset: .*PORTRAITBOOTH_ALLOW_ANY_PATH=1"):
            check_under_roots(path, [base], "dataset", relative_to=base)
    # the message is the same whether or not the path exists: it reveals nothing
    msgs = []
    for path in ("/etc", "/no/such/folder"):
        with pytest.raises(PathNotAllowedError) as caught:
            check_under_roots(path, [base], "dataset")
        msgs.append(str(caught.value).replace(path, "P"))
    assert msgs[0] == msgs[1]
    for bad in ("..", ".", ".x", "a/b", "a\\b", "x" * 5000, "a\x00", " ", "a\nb"):
        with pytest.raises(BadInputError, match=r"^output_name: "):
            check_file_name(bad, "output_name")
    with pytest.raises(BadInputError, match=r"^layers: 'nope' is not one of the choices \(a, b\)"):
        check_choice("nope", ["a", "b"], "layers")


def test_dataset_shard_names_that_leave_the_dataset_are_refused(dataset_copy, tmp_path):
    from portraitbooth_core.paths import PathNotAllowedError
    from training.dataset.shards import ShardReader

    assert len(ShardReader(dataset_copy)) > 0
    original = (dataset_copy / "index.json").read_text()
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "x.json").write_text(json.dumps({"tar": "x.tar", "samples": {}}))
    for name in ("../secret/x", str(secret / "x"), "../../../../etc/passwd"):
        (dataset_copy / "index.json").write_text(original)
        edit_json(dataset_copy / "index.json", lambda d: d["shards"][0].__setitem__("name", name))
        with pytest.raises(PathNotAllowedError, match=r"index.json shards\[0\].name: "):
            ShardReader(dataset_copy)
    (dataset_copy / "index.json").write_text(original)
    first = json.loads(original)["shards"][0]["name"]
    for tar in ("../secret/x.tar", "/etc/passwd"):
        edit_json(dataset_copy / f"{first}.json", lambda d: d.__setitem__("tar", tar))
        with pytest.raises(PathNotAllowedError, match=rf"{first}.json field 'tar': "):
            ShardReader(dataset_copy)
    # a symlink inside the dataset that leads out of it
    (secret / "x.tar").write_bytes(b"")
    (dataset_copy / "escape.tar").symlink_to(secret / "x.tar")
    edit_json(dataset_copy / f"{first}.json", lambda d: d.__setitem__("tar", "escape.tar"))
    with pytest.raises(PathNotAllowedError, match="leads out of its folder"):
        ShardReader(dataset_copy)
    edit_json(dataset_copy / f"{first}.json", lambda d: d.update(tar=f"{first}.tar", samples={"k": {"jpg": [-1, 2]}}))
    with pytest.raises(ValueError, match=r"must map members to \[offset, size\]"):
        ShardReader(dataset_copy)


def test_datasets_name_the_recognizer_by_pack_and_file_not_by_absolute_path(dataset_copy, recognizer_pack):
    from portraitbooth_core.paths import BadInputError, PathNotAllowedError
    from training.dataset.shards import recorded_recognizer

    index = json.loads((dataset_copy / "index.json").read_text())
    face = index["face_encoder"]
    assert face["recognizer"] == {"pack": recognizer_pack.name, "file": "w600k_r50.onnx"}
    assert "recognizer_path" not in face and str(recognizer_pack) not in json.dumps(index)
    roots = [recognizer_pack.parent]
    assert recorded_recognizer(face, roots) == (recognizer_pack / "w600k_r50.onnx").resolve()
    assert recorded_recognizer(face, [recognizer_pack.parent / "elsewhere"]) is None
    # an older dataset's absolute path: reduced to pack + file under the roots, never opened as given
    old = {"recognizer_path": str(recognizer_pack / "w600k_r50.onnx")}
    assert recorded_recognizer(old, roots) == (recognizer_pack / "w600k_r50.onnx").resolve()
    assert recorded_recognizer({"recognizer_path": "/etc/passwd"}, roots) is None
    with pytest.raises(PathNotAllowedError, match=r"face_encoder.recognizer.file: "):
        recorded_recognizer({"recognizer": {"pack": recognizer_pack.name, "file": "../../../etc/passwd"}}, roots)
    with pytest.raises(BadInputError, match=r"face_encoder.recognizer.pack: "):
        recorded_recognizer({"recognizer": {"pack": "..", "file": "passwd"}}, roots)


def test_trainer_run_by_a_node_never_opens_a_recorded_absolute_recognizer(dataset_copy, tmp_path, monkeypatch):
    """The node passes its roots: an index.json naming /etc/passwd as recognizer gets no L_id,
    and /etc/passwd is not opened."""
    from training.run import trainer as trainer_module

    opened = []
    monkeypatch.setattr(trainer_module, "TorchArcFace", lambda path, *a: opened.append(path))
    edit_json(dataset_copy / "index.json",
               lambda d: d["face_encoder"].pop("recognizer") and d["face_encoder"].__setitem__(
                   "recognizer_path", "/etc/passwd"))
    t = trainer_module.Trainer.__new__(trainer_module.Trainer)
    t.config = train_config(dataset_copy, tmp_path / "run")  # noqa: F405
    t.recognizer_roots = [tmp_path / "no_packs_here"]
    face = json.loads((dataset_copy / "index.json").read_text())["face_encoder"]
    assert t._recognizer(face) is None and opened == []
