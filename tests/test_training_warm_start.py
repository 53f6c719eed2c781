"""Warm start from FastComposer (training/models/warm_start.py, training/run/stage0.py): init_unet loads exactly the
imported UNet and refuses files of another family or shape; stage 0 fits the PortraitBooth
projector to FastComposer's fused class token, so its tokens match the teacher's on photos
it never saw; the export records the warm start and reproduces the trained UNet on the
base checkpoint; a teacher that is not FastComposer's projector is refused by name.

The release is the FastComposer stand-in whose UNet has the test checkpoint's layout,
imported with the real importer (fp16, as by default). The data is the evidence run's
synthetic world (evidence/): 6 identities x 8 renderings, 64 px, references
encoded by its ArcFace-format recognizer.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training_fixtures import train_config

IDENTITIES, PER_IDENTITY, RESOLUTION = 5, 6, 64   # 30 samples: stage 0 holds out every 10th
STAGE0_STEPS = 200


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    from standins.fastcomposer import ONE_LEVEL_UNET, build_fastcomposer_release
    from portraitbooth_core.weights.formats import fastcomposer as fc

    from headless import comfyui as host

    root = tmp_path_factory.mktemp("fastcomposer")
    # Cached across sessions (building it imports diffusers and transformers); versioned name:
    # a change to the stand-in's layout must not reuse an old file.
    release = build_fastcomposer_release(host.host_dir() / "cache" / "standins" / "fastcomposer_one_level_v1.bin",
                                         unet=ONE_LEVEL_UNET, seed=3)
    report = fc.import_fastcomposer(release, root / "models", progress=False)
    return {"unet": report.unet, "clip_vision": report.clip_vision, "teacher": report.portraitbooth,
            "models": root / "models"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from evidence import dataset, world as w

    root = tmp_path_factory.mktemp("world")
    recognizer_path = w.build_recognizer_onnx(root / "recognizer.onnx", 0)
    recognizer = dataset.Recognizer(recognizer_path)
    identities = w.make_identities(IDENTITIES, 0)
    samples = dataset.make_samples(identities, PER_IDENTITY, RESOLUTION, 1, recognizer)
    data = dataset.write_dataset(samples, root / "data", recognizer_path, RESOLUTION)
    # Photos the dataset does not hold: other renderings of the same people.
    unseen = dataset.make_samples(identities, 2, RESOLUTION, 99, recognizer)
    return SimpleNamespace(data=data, unseen=unseen)


@pytest.fixture(scope="module")
def warm_run(sd15_checkpoint, imported, world, tmp_path_factory):
    """One LoRA run warm-started from the import: the UNet as loaded, stage 0's summary and
    projector, then one training step and its export."""
    from training.run.trainer import Trainer
    from training.run.stage0 import before_training

    out = tmp_path_factory.mktemp("run")
    config = train_config(world.data, out, mode="lora", id_weight=0.0, steps=1, init_unet=str(imported["unet"]),
                          stage0_steps=STAGE0_STEPS, stage0_teacher=str(imported["teacher"]), projector_hidden=256)
    trainer = Trainer(config)
    try:
        loaded = {k: v.detach().clone() for k, v in trainer.models.unet.state_dict().items()}
        fresh = copy.deepcopy(trainer.projector)
        before_training(trainer)
        fitted = copy.deepcopy(trainer.projector)
        weights = trainer.run()
        trained = {"unet": {k: v.detach().clone() for k, v in trainer.models.unet.state_dict().items()},
                   "lora": {k: (a.up.weight.detach().clone(), a.down.weight.detach().clone(), a.alpha / a.rank)
                            for k, a in trainer.models.lora.adapters.items()},
                   "names": dict(trainer.models.lora.names)}
        yield SimpleNamespace(loaded=loaded, fresh=fresh, fitted=fitted, summary=trainer.stage0, weights=weights,
                              trained=trained, out=out, config=config, text=trainer.module.text)
    finally:
        trainer.close()


def _tensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_init_unet_loads_exactly_the_imported_weights(warm_run, imported, sd15_checkpoint):
    from conftest import MODELS_DIR

    imported_unet, _ = _tensors(imported["unet"])
    checkpoint, _ = _tensors(MODELS_DIR / "checkpoints" / sd15_checkpoint)
    assert set(warm_run.loaded) == set(imported_unet)
    for key, tensor in imported_unet.items():
        assert torch.equal(warm_run.loaded[key], tensor.float()), key  # fp16 file -> fp32 UNet, bit-exact
    # ... and it is not the checkpoint's own UNet that was kept
    differs = [k for k, v in imported_unet.items()
               if not torch.equal(v.float(), checkpoint["model.diffusion_model." + k].float())]
    assert len(differs) == len(imported_unet)
    record = json.loads((warm_run.out / "warm_start.json").read_text())
    assert record["init_unet"]["file"] == imported["unet"].name
    assert record["init_unet"]["source"]["model"] == "FastComposer"


def test_init_unet_refuses_other_families_shapes_and_files(imported, tmp_path):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    from standins.sd15 import SD15_TINY_UNET, build_portraitbooth_file
    from training.models.warm_start import InitUnetError, load_init_unet

    unet = UNetModel(**SD15_TINY_UNET, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    good, _ = _tensors(imported["unet"])

    def refused(tensors_or_path, *needles):
        path = tensors_or_path
        if isinstance(tensors_or_path, dict):
            path = tmp_path / f"case{len(list(tmp_path.iterdir()))}.safetensors"
            save_file(tensors_or_path, str(path))
        with pytest.raises(InitUnetError) as err:
            load_init_unet(unet, str(path))
        text = str(err.value)
        assert text.startswith("init_unet: "), text
        for needle in needles:
            assert needle in text, (needle, text)
        return text

    z = torch.zeros
    refused({"label_emb.0.0.weight": z(4, 4), "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": z(640, 2048)},
            "an SDXL UNet", "must be SD1.5", "import-fastcomposer")
    refused({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": z(320, 1024),
             "input_blocks.1.1.proj_in.weight": z(320, 320, 1, 1)}, "an SD2 UNet")
    refused({"conv_in.weight": z(320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": z(320, 320, 3, 3)},
            "diffusers layout", "import-fastcomposer")
    # SD1.5 family, but not the checkpoint's UNet: one tensor missing, one reshaped, one extra
    wrong = {k: v for k, v in good.items() if k != "out.2.bias"}
    wrong["input_blocks.0.0.weight"] = z(320, 4, 5, 5)
    wrong["input_blocks.9.0.weight"] = z(1)
    text = refused(wrong, "does not fit the UNet of `checkpoint`", "1 tensors missing (e.g. out.2.bias)",
                   "1 unexpected (e.g. input_blocks.9.0.weight)", "input_blocks.0.0.weight (320, 4, 5, 5)",
                   "(the checkpoint's UNet has (320, 4, 3, 3))")
    assert "with another shape" in text
    refused(build_portraitbooth_file(tmp_path / "pb.safetensors"), "is a PortraitBooth weight file", "stage0_teacher")
    refused(str(tmp_path / "nowhere.safetensors"), "not found", "diffusion_models/fastcomposer_unet.safetensors")
    cut = tmp_path / "cut.safetensors"
    whole = imported["unet"].read_bytes()
    cut.write_bytes(whole[:len(whole) - 4096])  # header intact, tensor data cut short
    refused(cut, "truncated")


def _projector_tokens(projector, text, samples) -> torch.Tensor:
    psi = torch.stack([text(s.caption)[0, s.identity_positions[0]] for s in samples])
    faces = torch.stack([torch.from_numpy(s.embedding) for s in samples])
    with torch.no_grad():
        return projector(psi, faces), psi


def _teacher_tokens(imported, psi, samples) -> torch.Tensor:
    """FastComposer's token for each photo, computed here on its own path: the teacher file
    through the weight-file loader, the CLIP vision file through ComfyUI's ClipVisionModel
    on the config the import recorded, the photo through the CLIP Vision Identity code."""
    import comfy.clip_vision

    from portraitbooth_core.face.clip_image import clip_image_identity
    from portraitbooth_core.weights.file import load_portraitbooth

    tensors, meta = _tensors(imported["clip_vision"])
    config = imported["models"] / "vision.json"
    config.write_text(json.dumps(json.loads(meta["portraitbooth_import"])["config"]))
    vision = comfy.clip_vision.ClipVisionModel(str(config))
    missing, unexpected = vision.load_sd(tensors)
    assert not missing and not unexpected
    phi = clip_image_identity(vision, [s.reference for s in samples]).embeddings
    teacher = load_portraitbooth(imported["teacher"])
    with torch.no_grad():
        return teacher.projector(psi, phi)


def test_stage0_fits_the_teacher_tokens_on_photos_it_never_saw(warm_run, imported, world):
    summary = warm_run.summary
    assert summary["steps"] == STAGE0_STEPS and summary["loss"] == "mse"
    assert summary["samples"] == IDENTITIES * PER_IDENTITY and summary["held_out_rows"] > 0
    before, after = summary["before"], summary["after"]
    assert after["train"]["mse"] < 0.2 * before["train"]["mse"], summary
    assert after["held_out"]["mse"] < 0.3 * before["held_out"]["mse"], summary
    # Photos outside the dataset, teacher tokens computed independently of stage 0's code.
    unseen = world.unseen
    fitted, psi = _projector_tokens(warm_run.fitted, warm_run.text, unseen)  # the run's text cache
    fresh, _ = _projector_tokens(warm_run.fresh, warm_run.text, unseen)
    teacher = _teacher_tokens(imported, psi, unseen)
    err_fitted = float(((fitted - teacher) ** 2).mean())
    err_fresh = float(((fresh - teacher) ** 2).mean())
    assert err_fitted < 0.3 * err_fresh, (err_fitted, err_fresh)
    # Not only the class word's average token: each photo's token is nearer its own person's
    # teacher tokens than other people's (the identity came across).
    owner = np.array([s.identity for s in unseen])
    dist = torch.cdist(fitted, teacher).numpy()
    same = dist[owner[:, None] == owner[None]].mean()
    other = dist[owner[:, None] != owner[None]].mean()
    assert same < other, (same, other)
    metrics = [json.loads(line) for line in (warm_run.out / "stage0_metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == STAGE0_STEPS and metrics[-1]["mse"] < metrics[0]["mse"]


def test_export_records_the_warm_start_and_reproduces_the_trained_unet(warm_run, imported, sd15_checkpoint):
    from conftest import MODELS_DIR

    from portraitbooth_core.weights.file import read_info

    info, _ = read_info(warm_run.weights)
    warm = info.training["warm_start"]
    assert warm["unet"]["file"] == imported["unet"].name and "path" not in warm["unet"]
    assert warm["stage0"]["teacher"] == imported["teacher"].name and warm["stage0"]["steps"] == STAGE0_STEPS
    assert info.source["warm_start"]["model"] == "FastComposer" and info.source["warm_start"]["license"] == "MIT"
    assert info.unet_patch["format"] == "diff"  # not a LoRA: it would be applied to the checkpoint's UNet
    patch, _ = _tensors(warm_run.weights)
    checkpoint, _ = _tensors(MODELS_DIR / "checkpoints" / sd15_checkpoint)
    # checkpoint + diff = the imported UNet with the trained LoRA folded in (fp16 diffs)
    trained = warm_run.trained
    key = next(iter(trained["lora"]))
    up, down, scale = trained["lora"][key]
    name = trained["names"][key]
    expected = trained["unet"][f"{name}.weight"] + scale * (up @ down)
    assert float((up @ down).abs().max()) > 0  # the one step moved the adapter
    rebuilt = checkpoint[f"model.diffusion_model.{name}.weight"].float() + patch[f"diffusion_model.{name}.diff"].float()
    torch.testing.assert_close(rebuilt, expected, atol=2e-3, rtol=2e-3)
    other = "input_blocks.0.0.weight"  # no LoRA there: exactly the imported weight
    rebuilt = checkpoint[f"model.diffusion_model.{other}"].float() + patch[f"diffusion_model.{other[:-7]}.diff"].float()
    torch.testing.assert_close(rebuilt, warm_run.loaded[other], atol=2e-3, rtol=2e-3)


def test_stage0_refuses_a_teacher_that_is_not_fastcomposers_projector(imported, tmp_path, capsys):
    from standins.sd15 import build_portraitbooth_file
    from training.__main__ import main as cli
    from training.config import load_config
    from training.models.warm_start import TeacherError, load_teacher

    mlp = build_portraitbooth_file(tmp_path / "portraitbooth_mlp.safetensors", face_kind="arcface:x", face_dim=512)
    with pytest.raises(TeacherError, match="holds a 'portraitbooth_mlp' projector, not FastComposer's "
                                           "'fastcomposer_postfuse'.*import-fastcomposer"):
        load_teacher(str(mlp))
    with pytest.raises(TeacherError, match=r"^stage0_teacher: .*is not a PortraitBooth file.*fastcomposer_postfuse"):
        load_teacher(str(imported["unet"]))
    with pytest.raises(TeacherError, match="^stage0_teacher: .*nowhere.safetensors not found"):
        load_teacher(str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ValueError, match="stage0_steps > 0 needs stage0_teacher"):
        load_config(None, {"stage0_steps": 10})
    # The command line says so before any model loads, and exits 2.
    code = cli(["train", "--checkpoint", "unused.safetensors", "--dataset", str(tmp_path), "--output",
                str(tmp_path / "run"), "--set", "stage0_steps=10", "--set", f"stage0_teacher={json.dumps(str(mlp))}"])
    assert code == 2
    assert "'portraitbooth_mlp' projector" in capsys.readouterr().err


def test_evidence_compares_runs_on_smoothed_margins():
    """The evidence's warm-start check (evidence/warm.py) on made-up trajectories:
    margins are averaged over the last 3 measurements, the target is the cold run's final
    smoothed margin, and the warm run must get there within a third of the cold run's steps."""
    from evidence import warm

    cold = {"0": 0.0, "100": 0.02, "200": 0.15, "300": 0.04, "400": 0.10, "500": 0.11, "600": 0.12}
    assert warm.smoothed(cold)["200"] == pytest.approx(0.17 / 3)
    # A single high measurement (0.15 at 200) does not count as reaching 0.11 there.
    assert warm.steps_to_reach(cold, 0.11 - 1e-9) == 600
    fast = {"0": 0.06, "50": 0.10, "100": 0.14, "150": 0.15, "200": 0.13}
    slow = {"0": 0.0, "50": 0.02, "100": 0.05, "150": 0.10, "200": 0.13}
    results = warm.summarize({"cold": {"steps": 600, "margins": cold}, "warm": {"steps": 200, "margins": fast},
                              "warm_unet_only": {"steps": 200, "margins": slow}}, 200)
    assert results["check"]["target_margin"] == pytest.approx(0.11)
    assert results["warm"]["reach"] == 150 and results["warm_unet_only"]["reach"] is None
    assert results["check"]["passed"] is True  # 150 <= 600 / 3
    results["cold"]["margins"] = {**cold, "300": 0.5, "400": 0.5}  # target 0.24, cold there at 400: bound 133
    assert warm.summarize(results, 200)["check"]["passed"] is False
    # A cold run that never learns the identity (ends below the STEA check's 2 %): the target
    # is that 2 %, and the warm run must get there within a third of the cold run's length.
    flat = {str(k): 0.0 for k in range(0, 601, 100)}
    never = warm.summarize({"cold": {"steps": 600, "margins": flat}, "warm": {"steps": 200, "margins": slow}}, 200)
    assert never["check"]["target_margin"] == pytest.approx(0.02) and never["check"]["cold_steps"] is None
    assert never["warm"]["reach"] == 100 and never["check"]["passed"] is True  # 100 <= 600 / 3
    table = warm.markdown({0: results})
    assert "| warm: teacher UNet + stage 0 | 200 | +6.0 % |" in table and "| - | - |" in table


def test_a_clip_vision_name_read_from_the_teacher_file_stays_inside_clip_vision(tmp_path):
    """The teacher file names its CLIP vision file; that name comes from a file anyone may have
    written, so it is one plain name looked up inside clip_vision/, never a path as written."""
    from types import SimpleNamespace

    from training.models.warm_start import TeacherError, teacher_clip_vision_path

    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not for the teacher")
    teacher_path = tmp_path / "models" / "portraitbooth" / "teacher.safetensors"
    (tmp_path / "models" / "clip_vision").mkdir(parents=True)
    teacher_path.parent.mkdir(parents=True)
    config = SimpleNamespace(stage0_clip_vision="")
    for name in ("../../secret.safetensors", str(secret)):
        teacher = SimpleNamespace(path=str(teacher_path), info=SimpleNamespace(defaults={"clip_vision": name}))
        with pytest.raises(TeacherError, match="not a plain name"):
            teacher_clip_vision_path(config, teacher)
    inside = tmp_path / "models" / "clip_vision" / "vit.safetensors"
    inside.write_bytes(b"x")
    teacher = SimpleNamespace(path=str(teacher_path), info=SimpleNamespace(defaults={"clip_vision": "vit.safetensors"}))
    assert teacher_clip_vision_path(config, teacher) == inside.resolve()
