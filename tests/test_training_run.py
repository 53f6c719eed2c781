"""Short training runs on the tiny stand-in SD1.5 (ComfyUI's own UNet, CLIP-L, TAESD):
the loss terms, switching them off, the recipe's random draws, the NaN guard,
gradient checkpointing, logging and validation images, and the loss going down."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from training_fixtures import *  # noqa: F401,F403
from training_fixtures import steps_with_identity_loss, train_config


@pytest.fixture(scope="module")
def trainer(sd15_checkpoint, dataset_dir, tmp_path_factory):
    from training.run.trainer import Trainer

    t = Trainer(train_config(dataset_dir, tmp_path_factory.mktemp("run")))
    yield t
    t.close()


def identity_batch(trainer, positions=(0, 1), timesteps=(100, 200)):
    """A batch of identity samples (the mode draw overridden) at fixed timesteps."""
    batch = trainer.loader.batch(list(positions), trainer.latent_hw)
    batch.modes = torch.zeros(len(positions), dtype=torch.long)
    batch.timesteps = torch.tensor(timesteps)
    return batch


def test_recipe_draws_modes_timesteps_and_masked_noise():
    from training.config import TrainConfig
    from training.run.data import IDENTITY, TEXT_ONLY, UNCOND, draw, micro_positions

    cfg = TrainConfig()
    draws = [draw(p, cfg, (8, 8)) for p in range(4000)]
    modes = torch.tensor([d["mode"] for d in draws])
    for mode, share in ((UNCOND, 0.1), (TEXT_ONLY, 0.1), (IDENTITY, 0.8)):
        assert abs(float((modes == mode).float().mean()) - share) < 0.02
    masked = torch.tensor([d["masked"] for d in draws])
    assert not masked[modes != IDENTITY].any()
    assert abs(float(masked[modes == IDENTITY].float().mean()) - 0.5) < 0.03
    t = torch.tensor([d["t"] for d in draws])
    assert t.min() >= 0 and t.max() <= 999 and abs(float((t <= 250).float().mean()) - 0.251) < 0.03
    assert torch.equal(draw(17, cfg, (8, 8))["noise"], draws[17]["noise"])  # a function of the position only
    # 1 process x 2 accumulation steps sees the micro-batches of 2 processes x 1.
    one = dataclasses.replace(cfg, micro_batch=2, grad_accum=2)
    two = dataclasses.replace(cfg, micro_batch=2, grad_accum=1)
    assert [micro_positions(3, m, 0, one, 1) for m in (0, 1)] == [micro_positions(3, 0, r, two, 2) for r in (0, 1)]


def test_every_loss_term_is_finite_and_nonzero(trainer):
    batch = identity_batch(trainer, positions=range(5), timesteps=(10, 50, 100, 200, 250))
    assert any(batch.expression_positions)  # "a smiling man in a suit": the expression term is live
    terms = trainer.module(batch)
    assert set(terms) == {"noise", "loc", "id", "total"}
    for name, value in terms.items():
        assert torch.isfinite(value) and float(value.detach()) > 0, name
    total = terms["noise"] + terms["loc"] + terms["id"]
    torch.testing.assert_close(terms["total"], total)


def test_text_only_and_unconditional_samples_add_no_identity_terms(trainer):
    from training.run.data import TEXT_ONLY, UNCOND

    batch = identity_batch(trainer)
    batch.modes = torch.tensor([TEXT_ONLY, UNCOND])
    terms = trainer.module(batch)
    assert "id" not in terms and float(terms["loc"].detach()) == 0.0 and float(terms["noise"].detach()) > 0
    # Late timesteps: DIP (t <= R_t = 250 in the paper's recipe) is off even for identity samples.
    late = identity_batch(trainer, timesteps=(600, 900))
    assert trainer.module.config.id_max_timestep == 250  # the fixture keeps the recipe's window
    assert "id" not in trainer.module(late)


@pytest.mark.parametrize("term", ["noise", "loc", "id"])
def test_each_term_can_be_switched_off(trainer, term):
    batch = identity_batch(trainer, positions=range(3), timesteps=(20, 120, 220))
    full = trainer.module(batch)
    original = trainer.module.config
    trainer.module.config = dataclasses.replace(original, **{f"{term}_weight": 0.0})
    try:
        off = trainer.module(batch)
    finally:
        trainer.module.config = original
    assert term not in off
    rest = sum(v for k, v in full.items() if k not in (term, "total"))
    torch.testing.assert_close(off["total"], rest, rtol=1e-5, atol=1e-7)


def test_nan_guard_skips_the_step_and_reports_it(trainer, monkeypatch):
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    forward = trainer.module.forward

    def poisoned(batch):
        terms = forward(batch)
        terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(trainer.module, "forward", poisoned)
    step = trainer.step
    values = trainer.train_step()
    assert values["skipped"] == 1.0 and trainer.step == step + 1
    assert trainer.skipped_steps[-1]["step"] == step and "nan" in trainer.skipped_steps[-1]["terms"]["total"]
    assert all(torch.equal(p, before[n]) for n, p in trainer.params.items())
    monkeypatch.undo()
    values = trainer.train_step()
    assert "skipped" not in values
    assert any(not torch.equal(p, before[n]) for n, p in trainer.params.items())


def test_gradient_checkpointing_gives_the_same_gradients(sd15_checkpoint, dataset_dir, tmp_path):
    from training.models.load import enable_gradient_checkpointing
    from training.run.trainer import Trainer

    t = Trainer(train_config(dataset_dir, tmp_path, mode="full"))
    try:
        batch = identity_batch(t, positions=range(3), timesteps=(30, 130, 230))

        def grads():
            t.optimizer.zero_grad(set_to_none=True)
            t.module(batch)["total"].backward()
            return {n: p.grad.clone() for n, p in t.params.items() if p.grad is not None}

        plain = grads()
        assert enable_gradient_checkpointing(t.models.unet) > 0
        checkpointed = grads()
    finally:
        t.close()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_total_loss_goes_down_and_everything_is_logged(sd15_checkpoint, dataset_dir, tmp_path):
    """At the recipe's own R_t = 250 and text-only/unconditional shares: L_id is logged on
    exactly the steps that drew an identity sample with t <= 250 and on no other."""
    from training.config import TrainConfig
    from training.run.data import IDENTITY, TEXT_ONLY, UNCOND, draw, micro_positions
    from training.run.metrics import read_metrics
    from training.run.trainer import Trainer

    t = Trainer(train_config(dataset_dir, tmp_path, steps=10, validate_every=10, validation_steps=2,
                             tensorboard=True, save_every=5, keep_last=1, ema_decay=0.9))
    evaluation = [identity_batch(t, positions=(10_000 + 2 * k, 10_001 + 2 * k)) for k in range(3)]

    def loss() -> float:
        with torch.no_grad():
            return sum(float(t.module(b)["total"]) for b in evaluation) / len(evaluation)

    try:
        before = loss()
        path = t.run()
        after = loss()
    finally:
        t.close()
    assert after < 0.9 * before, (before, after)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert all({"noise", "loc", "total", "lr", "grad_norm"} <= r.keys() for r in records)
    assert any("id" in r for r in records)
    recipe = ("id_max_timestep", "p_text_only", "p_uncond", "id_weight")
    assert {k: getattr(t.config, k) for k in recipe} == {k: getattr(TrainConfig(), k) for k in recipe}
    expected = steps_with_identity_loss(t.config, 10)
    assert ["id" in r for r in records] == expected
    assert [r["id_batches"] for r in records] == [int(e) for e in expected]
    # Not vacuous: the 20 samples (seed 0) hold text-only and unconditional ones, a step
    # whose L_id sample shares its micro-batch with one of them, and identity samples beyond
    # R_t that alone leave a step without L_id.
    drawn = [[draw(p, t.config, t.latent_hw) for p in micro_positions(s, 0, 0, t.config, 1)] for s in range(10)]
    modes = {d["mode"] for step in drawn for d in step}
    assert {TEXT_ONLY, UNCOND, IDENTITY} <= modes
    assert any(e and any(d["mode"] != IDENTITY for d in step) for e, step in zip(expected, drawn))
    assert any(not e and any(d["mode"] == IDENTITY for d in step) for e, step in zip(expected, drawn))
    assert (tmp_path / "validation" / "step-00000010.png").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000010.pt"]  # keep_last=1
    from portraitbooth_core.weights.file import load_portraitbooth

    exported = load_portraitbooth(path)  # EMA weights: the projector equals the EMA shadow
    shadow = {n[len("projector."):]: v for n, v in t.ema.state_dict().items() if n.startswith("projector.")}
    for name, value in exported.projector.state_dict().items():
        torch.testing.assert_close(value, shadow[name])
    assert json.loads(json.dumps(exported.info.training))["ema_decay"] == 0.9


def test_face_windows_cover_the_aligned_crop():
    from portraitbooth_core.face.align import ARCFACE_TEMPLATE
    from portraitbooth_core.dip.identity_loss import face_windows

    # A 112 px aligned face drawn at 2x in a 512 px image (64x64 latent) at (100, 60).
    lm = torch.tensor(ARCFACE_TEMPLATE * 2 + [100, 60], dtype=torch.float32)
    (y0, y1, x0, x1), = face_windows(lm[None], (64, 64), 8, margin=2)
    assert (y0, x0) == (60 // 8 - 2, 100 // 8 - 2) and (y1, x1) == (ceil8(60 + 224) + 2, ceil8(100 + 224) + 2)
    # Two faces: one window size for both (one batched decode), each kept inside the latent.
    near_edge = lm + torch.tensor([300.0, 250.0])
    windows = face_windows(torch.stack([lm, near_edge]), (64, 64), 8, margin=2)
    assert len({(b - a, d - c) for a, b, c, d in windows}) == 1 and all(b <= 64 and d <= 64 for a, b, c, d in windows)


def ceil8(value: float) -> int:
    return -(-int(value) // 8)


def test_dip_on_the_face_window_agrees_with_a_full_decode(sd15_checkpoint, people_dir, train_encoder, tmp_path):
    from training.build.settings import BuildSettings
    from training.build.builder import DatasetBuilder
    from training.build.face_crops import CropSettings
    from portraitbooth_core.dip.identity_loss import face_windows
    from training.run.trainer import Trainer

    settings = BuildSettings(CropSettings(resolution=128, crop_scale=4.0), caption_template="a photo of a {word}")
    DatasetBuilder(people_dir, tmp_path / "data", train_encoder, settings, progress=False).build()
    t = Trainer(train_config(tmp_path / "data", tmp_path / "run"))
    try:
        batch = identity_batch(t, positions=range(5), timesteps=(10, 60, 110, 160, 210))
        alone = [face_windows(lm[None], t.latent_hw, 8, margin=2)[0] for lm in batch.landmarks]
        areas = sorted((b - a) * (d - c) for a, b, c, d in alone)
        assert areas[len(areas) // 2] <= 0.5 * 16 * 16  # a typical face needs well under half the decode
        losses = {}
        for region in ("full", "face"):
            t.module.config = dataclasses.replace(t.config, dip_region=region)
            with torch.no_grad():
                losses[region] = float(t.module(batch)["id"])
    finally:
        t.close()
    assert abs(losses["face"] - losses["full"]) < 0.05 * losses["full"], losses
