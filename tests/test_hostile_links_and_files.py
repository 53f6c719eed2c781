"""Hostile graphs, round 2 (issue 22): symlinks in the model folders, non-finite weights, and
the mode of the files the pack writes.

One real server (this module's) whose model folders hold, beside ordinary files:
- links into another folder ComfyUI knows (extra_model_paths.yaml's `loras` here, standing in
  for a second disk the models are linked in from): they load;
- links out of every allowed root: to a file that starts like /etc/passwd, to valid identity
  and weight files, to a face pack folder, to one ONNX of a pack: listed, and refused on use
  with a message naming the listed name, never the target nor anything the target holds;
- identity and weight files holding NaN/infinity: refused at load, naming the file.
The opt-in (PORTRAITBOOTH_ALLOW_OUTSIDE_LINKS=1), the messages of the loaders for the followed
link, export of non-finite weights and the file modes are checked in-process.
"""
from __future__ import annotations

import os
import shutil
import stat
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import TEST_CHECKPOINT, started_server
from face_fixtures import insightface_root  # noqa: F401  (fixture)
from headless.client import ComfyError

MARK = "PB-SECRET-51f3e"
SECRET = f"root:x:0:0:{MARK}:/root:/bin/bash\n".encode()  # what /etc/passwd starts with
HEADER_NUMBER = str(struct.unpack("<Q", SECRET[:8])[0])  # what the old message showed: 3475222254926655346
KIND = "arcface:standin_r50/w600k_r50.onnx"
PACK_FILES = ("det_10g.onnx", "w600k_r50.onnx")


def _identity():
    from portraitbooth_core.face import build_identity

    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 512, generator=g) * 10
    return build_identity(raw, KIND, ["a.jpg", "b.jpg"], threshold=0.3, metadata={})


def _save_identity(path: Path) -> Path:
    from portraitbooth_core.face import save_identity

    return save_identity(path, _identity())[0]


def _save_model(path: Path) -> Path:
    from standins.sd15 import build_portraitbooth_file

    return build_portraitbooth_file(path, face_kind=KIND, face_dim=512)


def _poison(source: Path, target: Path, tensor: str | None = None) -> Path:
    """A copy of a safetensors file with NaN and infinity in one tensor (default: the first)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = tensor or sorted(tensors)[0]
    bad = tensors[name].clone().reshape(-1)
    bad[0], bad[-1] = float("nan"), float("inf")
    tensors[name] = bad.reshape(tensors[name].shape)
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.fixture(scope="module")
def world(tmp_path_factory, insightface_root, sd15_checkpoint):  # noqa: F811
    secret = tmp_path_factory.mktemp("outside_every_root")
    other = tmp_path_factory.mktemp("other_disk")  # registered below as a second root (loras)
    ids, weights, face = (tmp_path_factory.mktemp(n) for n in ("ids", "weights", "insightface"))
    pack = insightface_root / "models" / "standin_r50"
    for base in (secret, other):
        (base / "passwd").write_bytes(SECRET)
        _save_identity(base / "identity.safetensors")
        _save_model(base / "model.safetensors")
        shutil.copytree(pack, base / "pack")

    _save_identity(ids / "plain.safetensors")
    _poison(ids / "plain.safetensors", ids / "nonfinite.safetensors", "vector")
    (ids / "in_other.safetensors").symlink_to(other / "identity.safetensors")
    (ids / "out_valid.safetensors").symlink_to(secret / "identity.safetensors")
    (ids / "out_passwd.safetensors").symlink_to(secret / "passwd")
    (ids / "linked_dir").symlink_to(secret, target_is_directory=True)  # lists linked_dir/identity.safetensors

    _save_model(weights / "plain.safetensors")
    _poison(weights / "plain.safetensors", weights / "nonfinite.safetensors", "stea.fc2.weight")
    (weights / "in_other.safetensors").symlink_to(other / "model.safetensors")
    (weights / "out_valid.safetensors").symlink_to(secret / "model.safetensors")
    (weights / "out_passwd.safetensors").symlink_to(secret / "passwd")

    packs = face / "models"
    packs.mkdir()
    shutil.copytree(pack, packs / "plain")
    (packs / "in_other").symlink_to(other / "pack", target_is_directory=True)
    (packs / "out_folder").symlink_to(secret / "pack", target_is_directory=True)
    (packs / "out_file").mkdir()
    shutil.copy(pack / "det_10g.onnx", packs / "out_file" / "det_10g.onnx")
    (packs / "out_file" / "w600k_r50.onnx").symlink_to(secret / "pack" / "w600k_r50.onnx")

    env = {k: "" for k in ("PORTRAITBOOTH_ALLOW_ANY_PATH", "PORTRAITBOOTH_ALLOW_OUTSIDE_LINKS")}
    server = started_server(tmp_path_factory.mktemp("comfy-links"), env=env, extra_model_paths={
        "portraitbooth_identities": str(ids), "portraitbooth": str(weights), "insightface": str(face),
        "loras": str(other)})
    yield SimpleNamespace(server=server, secret=secret, other=other, ids=ids, weights=weights)
    server.stop()


def _load_identity(name: str) -> dict:
    return {"1": {"class_type": "PortraitBoothLoadIdentity", "inputs": {"identity_name": name}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def _load_model(name: str) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
            "2": {"class_type": "PortraitBoothLoadModel",
                  "inputs": {"model": ["1", 0], "portraitbooth_name": name, "strength": 1.0}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}


def _load_pack(name: str) -> dict:
    return {"1": {"class_type": "PortraitBoothLoadFaceEncoder",
                  "inputs": {"pack": name, "detector": "auto", "recognizer": "auto", "provider": "cpu",
                             "det_size": 640, "mask_ears": False, "mask_hair": False, "mask_neck": False}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def _options(server, node: str, name: str) -> set[str]:
    spec = server.client.object_info(node)[node]["input"]["required"][name]
    return set(spec[0] if isinstance(spec[0], list) else spec[1]["options"])  # old and new combo forms


def _refusal(server, graph: dict) -> str:
    with pytest.raises(ComfyError) as caught:
        server.client.run(graph, timeout=300)
    return str(caught.value)


def _assert_reveals_nothing(message: str, world) -> None:
    assert MARK not in message and HEADER_NUMBER not in message, message
    assert str(world.secret) not in message and "passwd" not in message.replace("out_passwd", ""), message


@pytest.mark.slow  # a server of its own
def test_model_links_into_known_folders_load_and_links_out_are_refused_unread(world):
    server = world.server
    # Policy: listed as ComfyUI lists them, refused on use with the fix.
    assert {"in_other.safetensors", "out_passwd.safetensors",
            "linked_dir/identity.safetensors"} <= _options(server, "PortraitBoothLoadIdentity", "identity_name")

    for name in ("plain.safetensors", "in_other.safetensors"):
        server.client.run(_load_identity(name), timeout=120)
    for name in ("out_valid.safetensors", "out_passwd.safetensors", "linked_dir/identity.safetensors"):
        message = _refusal(server, _load_identity(name))
        assert f"identity_name: '{name}'" in message and "PORTRAITBOOTH_ALLOW_OUTSIDE_LINKS=1" in message, message
        _assert_reveals_nothing(message, world)

    server.client.run(_load_model("in_other.safetensors"), timeout=300)
    for name in ("out_valid.safetensors", "out_passwd.safetensors"):
        message = _refusal(server, _load_model(name))
        assert f"portraitbooth_name: '{name}'" in message and "symbolic link" in message, message
        _assert_reveals_nothing(message, world)
    log = server.log_tail(4000)
    assert MARK not in log and HEADER_NUMBER not in log


@pytest.mark.slow  # a server of its own
def test_face_pack_links_out_are_listed_and_refused_before_any_model_loads(world):
    server = world.server
    assert {"plain", "in_other", "out_folder", "out_file"} <= _options(server, "PortraitBoothLoadFaceEncoder", "pack")
    for name in ("plain", "in_other"):
        server.client.run(_load_pack(name), timeout=120)
    message = _refusal(server, _load_pack("out_folder"))
    assert "pack: 'out_folder'" in message and "symbolic link" in message, message
    _assert_reveals_nothing(message, world)
    message = _refusal(server, _load_pack("out_file"))
    assert "pack: 'out_file/w600k_r50.onnx'" in message, message
    _assert_reveals_nothing(message, world)


@pytest.mark.slow  # a server of its own
def test_non_finite_identity_and_weight_files_are_refused_naming_the_file(world):
    server = world.server
    message = _refusal(server, _load_identity("nonfinite.safetensors"))
    assert "identity_name: nonfinite.safetensors" in message and "non-finite" in message, message
    message = _refusal(server, _load_model("nonfinite.safetensors"))
    assert "nonfinite.safetensors" in message and "stea.fc2.weight" in message and "non-finite" in message, message


# -- in-process -------------------------------------------------------------------------------------

class _Started(Exception):
    """Raised in place of training: every check before it passed."""


@pytest.fixture
def extra_model_folder(monkeypatch):
    """Registers a folder for a model kind in this process (as extra_model_paths.yaml would)
    and forgets ComfyUI's cached listing afterwards, so no other test sees its files."""
    import folder_paths

    kinds = []

    def add(kind: str, folder: Path) -> None:
        paths, exts = folder_paths.folder_names_and_paths.get(kind, ([], set()))
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind, ([*paths, str(folder)], exts))
        kinds.append(kind)

    yield add
    for kind in kinds:
        folder_paths.filename_list_cache.pop(kind, None)


def test_dip_trainer_refuses_a_checkpoint_or_recognizer_linked_from_outside(tmp_path, monkeypatch, sd15_checkpoint,
                                                                           extra_model_folder):
    """The DIP Trainer opens a listed checkpoint and the dataset's recognizer (found by pack name
    in the insightface folder): both are refused before training when they link out."""
    import importlib

    from conftest import load_pack

    load_pack()
    node = importlib.import_module("portraitbooth_pack_under_test.nodes.dip_trainer")
    api = importlib.import_module("portraitbooth_pack_under_test.training.api")
    shards = importlib.import_module("portraitbooth_pack_under_test.training.dataset.shards")
    for name in ("PORTRAITBOOTH_ALLOW_ANY_PATH", "PORTRAITBOOTH_ALLOW_OUTSIDE_LINKS"):
        monkeypatch.delenv(name, raising=False)
    outside = tmp_path / "outside"
    (outside / "pack").mkdir(parents=True)
    (outside / "passwd").write_bytes(SECRET)
    (outside / "pack" / "w600k_r50.onnx").write_bytes(SECRET)
    checkpoints, face = tmp_path / "checkpoints", tmp_path / "insightface"
    checkpoints.mkdir()
    (checkpoints / "pw.safetensors").symlink_to(outside / "passwd")
    (face / "models" / "inside").mkdir(parents=True)
    (face / "models" / "inside" / "w600k_r50.onnx").write_bytes(b"onnx")
    (face / "models" / "linked").symlink_to(outside / "pack", target_is_directory=True)
    extra_model_folder("checkpoints", checkpoints)
    extra_model_folder("insightface", face)
    pack = {"pack": "inside"}
    monkeypatch.setattr(api, "check_dataset", lambda *a, **k: None)  # no dataset needed: only the paths matter
    monkeypatch.setattr(api, "check_resume", lambda *a, **k: None)
    monkeypatch.setattr(api, "check_identity_loss", lambda settings, roots, **k: shards.recorded_recognizer(
        {"recognizer": {"pack": pack["pack"], "file": "w600k_r50.onnx"}}, roots))  # the real lookup by pack name

    def started(*args, **kwargs):
        raise _Started()

    monkeypatch.setattr(api, "run_training", started)
    inputs = dict(ckpt_name="pw.safetensors", dataset="faces", run_name="", output_name=f"links_{os.getpid()}",
                  mode="lora", steps=1, batch_size=1, grad_accum=1, learning_rate=1e-3, lora_rank=4, save_every=1,
                  seed=0, gradient_checkpointing=False, extra_settings="", recognizer="")
    with pytest.raises(PermissionError, match=r"^ckpt_name: 'pw.safetensors' is a symbolic link") as caught:
        node.DIPTrainer.execute(**inputs)
    assert MARK not in str(caught.value) and str(outside) not in str(caught.value)
    inputs["ckpt_name"] = TEST_CHECKPOINT
    with pytest.raises(_Started):  # a recognizer in its pack folder: every check passes
        node.DIPTrainer.execute(**inputs)
    pack["pack"] = "linked"
    with pytest.raises(PermissionError, match=r"^recognizer: 'w600k_r50.onnx' is a symbolic link") as caught:
        node.DIPTrainer.execute(**inputs)
    assert MARK not in str(caught.value) and str(outside) not in str(caught.value)


def test_the_opt_in_follows_links_anywhere_and_no_loader_message_quotes_the_file(tmp_path, monkeypatch):
    from portraitbooth_core.face import IdentityFileError, load_identity
    from portraitbooth_core.paths import LINKS_ENV, PathNotAllowedError, check_link_target
    from portraitbooth_core.weights.file import load_portraitbooth
    from portraitbooth_core.weights.meta import WeightFileError

    root, outside = tmp_path / "models", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (outside / "passwd").write_bytes(SECRET)
    link = root / "pw.safetensors"
    link.symlink_to(outside / "passwd")
    monkeypatch.delenv("PORTRAITBOOTH_ALLOW_ANY_PATH", raising=False)
    monkeypatch.delenv(LINKS_ENV, raising=False)
    with pytest.raises(PathNotAllowedError, match=r"^identity_name: 'pw.safetensors' is a symbolic link") as caught:
        check_link_target(link, [root], "identity_name")
    assert str(outside) not in str(caught.value)
    monkeypatch.setenv(LINKS_ENV, "1")
    assert check_link_target(link, [root], "identity_name") == (outside / "passwd").resolve()
    monkeypatch.delenv(LINKS_ENV)
    monkeypatch.setenv("PORTRAITBOOTH_ALLOW_ANY_PATH", "1")  # the wider switch implies this one
    assert check_link_target(link, [root], "identity_name") == (outside / "passwd").resolve()

    # Followed (opted in), the file is read: every loader's message names it and quotes nothing of it.
    for data in (SECRET, SECRET * 2000, (40).to_bytes(8, "little") + b'{"' + MARK.encode() + b'": 1 ' + b" " * 60):
        (outside / "passwd").write_bytes(data)
        for load, error in ((load_identity, IdentityFileError), (load_portraitbooth, WeightFileError)):
            with pytest.raises(error) as caught:
                load(link)
            message = str(caught.value)
            assert "pw.safetensors" in message and MARK not in message and HEADER_NUMBER not in message, message


def test_parsing_weights_that_do_not_load_are_reported_without_their_bytes(tmp_path):
    from portraitbooth_core.face.parsing import FaceParser, announce_unreadable

    path = tmp_path / "parsing_bisenet.pth"
    # torch's unpickler quotes what it refuses ("Unsupported global: GLOBAL <module>.<name>", a byte)
    for data in (SECRET, b"\x80\x02c" + MARK.encode() + b"\nx\n)R.", MARK.encode() + b"\x00" * 64):
        path.write_bytes(data)
        with pytest.raises(Exception) as caught:  # noqa: PT011 - whatever torch raises for the file
            FaceParser(path)
        message = announce_unreadable(path, caught.value)
        assert "parsing_bisenet.pth could not be loaded" in message and MARK not in message, message


def test_save_refuses_and_load_names_non_finite_tensors(tmp_path):
    from portraitbooth_core.face import IdentityFileError, load_identity
    from portraitbooth_core.stea.projector import ProjectorConfig, STEAProjector
    from portraitbooth_core.weights.file import load_portraitbooth, save_portraitbooth
    from portraitbooth_core.weights.finite import NonFiniteWeightsError
    from portraitbooth_core.weights.meta import CorruptWeightFileError, FaceEncoderSpec

    good = _save_model(tmp_path / "good.safetensors")
    bad = _poison(good, tmp_path / "diverged.safetensors", "stea.fc1.bias")
    with pytest.raises(CorruptWeightFileError, match=r"^diverged.safetensors .*non-finite.*stea.fc1.bias"):
        load_portraitbooth(bad)
    ident = _save_identity(tmp_path / "me.safetensors")
    _poison(ident, tmp_path / "me_bad.safetensors", "embeddings")
    with pytest.raises(IdentityFileError, match=r"^me_bad.safetensors: .*embeddings.*non-finite"):
        load_identity(tmp_path / "me_bad.safetensors")

    projector = STEAProjector(ProjectorConfig(face_dim=512, hidden_dim=32))
    with torch.no_grad():
        projector.fc2.weight[0, 0] = float("nan")
    target = tmp_path / "never.safetensors"
    with pytest.raises(NonFiniteWeightsError, match=r"never.safetensors.*stea.fc2.weight"):
        save_portraitbooth(target, projector, FaceEncoderSpec(KIND, 512))
    assert not target.exists() and not list(tmp_path.glob(".never*"))


class _Reader:
    def __init__(self):
        self.index = {"face_encoder": {"kind": KIND, "dim": 512}, "resolution": 64}

    def __len__(self) -> int:
        return 4


def _trainer(tmp_path: Path, ema_decay: float):
    """What export reads of a Trainer, without loading SD1.5: the config, the dataset index,
    the projector (as the trained module holds it), the LoRA and the real EMA."""
    from portraitbooth_core.stea.projector import ProjectorConfig, STEAProjector
    from training.config import load_config
    from training.run.ema import EMA

    config = load_config(None, {"checkpoint": str(tmp_path / "sd15.safetensors"), "dataset": str(tmp_path / "data"),
                                "output": str(tmp_path / "run"), "ema_decay": 0.999 if ema_decay else 0.0})
    projector = STEAProjector(ProjectorConfig(face_dim=512, hidden_dim=32))
    lora = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(4, 768)}
    ema = EMA(dict(projector.named_parameters()), ema_decay) if ema_decay else None
    return SimpleNamespace(config=config, reader=_Reader(), module=SimpleNamespace(projector=projector),
                           models=SimpleNamespace(lora=SimpleNamespace(export=lambda: dict(lora))), ema=ema,
                           step=2, global_batch=2, lora=lora)


def test_export_refuses_non_finite_weights_naming_them_and_the_setting(tmp_path):
    from portraitbooth_core.weights.finite import NonFiniteWeightsError
    from training.run.export import export

    trainer = _trainer(tmp_path, float("inf"))  # what ema_decay=Infinity did: the average is NaN
    trainer.ema.update()
    target = tmp_path / "out" / "me.safetensors"
    with pytest.raises(NonFiniteWeightsError) as caught:
        export(trainer, target)
    message = str(caught.value)
    assert "stea.fc1.weight" in message and "ema_decay" in message and "me.safetensors" in message, message
    assert not target.exists() and not (target.parent.exists() and any(target.parent.iterdir()))

    trainer = _trainer(tmp_path, 0.0)  # no EMA: the trained weights themselves diverged
    trainer.lora[next(iter(trainer.lora))][0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError) as caught:
        export(trainer, target)
    message = str(caught.value)
    assert "lora_up.weight" in message and "lr" in message and "ema_decay" not in message, message
    assert not target.exists()

    trainer = _trainer(tmp_path, 0.0)
    assert export(trainer, target).is_file()  # the same run with finite weights exports


def _readable_by_all(path: Path) -> bool:
    mode = stat.S_IMODE(path.stat().st_mode)
    return mode & 0o044 == 0o044


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_follow_the_umask(tmp_path, umask_022):
    from portraitbooth_core.weights.formats.fastcomposer import import_fastcomposer
    from standins.fastcomposer import build_fastcomposer_release
    from training.run.checkpoint import save_checkpoint
    from training.run.export import export

    written = {"weight file": _save_model(tmp_path / "pb" / "model.safetensors"),
               "identity file": _save_identity(tmp_path / "ids" / "me.safetensors"),
               "export": export(_trainer(tmp_path, 0.0), tmp_path / "export" / "me.safetensors"),
               "checkpoint": save_checkpoint(tmp_path / "run" / "checkpoints", 1, {"w": torch.ones(2)}, keep_last=2)}
    release = build_fastcomposer_release(tmp_path / "release" / "pytorch_model.bin")
    report = import_fastcomposer(release, tmp_path / "models", progress=False)
    written.update({"FastComposer UNet": report.unet, "FastComposer CLIP vision": report.clip_vision,
                    "FastComposer postfuse": report.portraitbooth})
    modes = {what: oct(stat.S_IMODE(Path(p).stat().st_mode)) for what, p in written.items()}
    assert all(_readable_by_all(Path(p)) for p in written.values()), modes
    assert all(mode == "0o644" for mode in modes.values()), modes
    leftovers = [p for p in tmp_path.rglob(".*") if p.is_file()]
    assert not leftovers, leftovers


def test_atomic_writer_keeps_the_old_file_on_error_and_replaces_a_link_not_its_target(tmp_path, umask_022):
    from portraitbooth_core.atomic_files import atomic_target, write_bytes_atomic

    target = tmp_path / "a.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_target(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep")
    link = tmp_path / "link.bin"
    link.symlink_to(outside)
    write_bytes_atomic(link, b"new")
    assert outside.read_bytes() == b"keep" and not link.is_symlink() and link.read_bytes() == b"new"
    os.umask(0o077)
    write_bytes_atomic(tmp_path / "private.bin", b"x")  # a stricter umask is honoured too
    assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == 0o600
