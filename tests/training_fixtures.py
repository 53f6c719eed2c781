"""Fixtures of the training tests: a tiny dataset built from real photos, and configs.

The dataset is built once per session with the real RetinaFace detector and a stand-in
ArcFace (ONNX) recognizer, whose torch copy is the differentiable recognizer of L_id.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import MODELS_DIR, TEST_CHECKPOINT
from standins_face import build_arcface_onnx

RESOLUTION = 64  # 8x8 latents: small enough for CPU tests, large enough for 5-point face crops
PEOPLE = {"obama": ["obama.jpg", "obama2.jpg", "obama3.jpg"], "biden": ["biden.jpg"],
          "astronaut": ["astronaut.png"], "group": ["t1.jpg"]}
CAPTIONS = {"obama/obama.txt": "a smiling gentleman in a suit", "obama/obama2.txt": "a photo of a man",
            "biden/biden.json": '{"caption": "portrait of a happy guy"}'}


def make_people(photos_dir: Path, root: Path) -> Path:
    """Person folders with captions, a template-only person, a group photo and a corrupt file."""
    for person, files in PEOPLE.items():
        (root / person).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copy(photos_dir / name, root / person / name)
    for rel, text in CAPTIONS.items():
        (root / rel).write_text(text)
    (root / "astronaut" / "class.txt").write_text("woman")
    (root / "obama" / "class.txt").write_text("man")  # obama3.jpg has no sidecar: template caption
    (root / "obama" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a real JPEG")
    return root


@pytest.fixture(scope="session")
def recognizer_pack(tmp_path_factory) -> Path:
    pack = tmp_path_factory.mktemp("insightface") / "standin"
    build_arcface_onnx(pack / "w600k_r50.onnx")
    # Datasets record the recognizer by pack + file name; the command-line trainer finds the
    # pack in the folders this variable lists (training/dataset/shards.py: default_recognizer_roots).
    os.environ["PORTRAITBOOTH_RECOGNIZER_DIRS"] = str(pack.parent)
    return pack


@pytest.fixture(scope="session")
def train_encoder(recognizer_pack):
    from portraitbooth_core.face import build_encoder

    return build_encoder(recognizer_pack, detector="retinaface", recognizer="arcface", provider="cpu")


@pytest.fixture(scope="session")
def people_dir(tmp_path_factory, photos_dir) -> Path:
    return make_people(photos_dir, tmp_path_factory.mktemp("people"))


def build_settings(**overrides):
    from training.build.settings import BuildSettings
    from training.build.face_crops import CropSettings

    return BuildSettings(CropSettings(resolution=RESOLUTION), caption_template="a photo of a {word}",
                         **overrides)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, people_dir, train_encoder) -> Path:
    from training.build.builder import DatasetBuilder

    out = tmp_path_factory.mktemp("dataset")
    DatasetBuilder(people_dir, out, train_encoder, build_settings(shard_size=2), progress=False).build()
    return out


def train_config(dataset: Path, output: Path, **overrides):
    """A short CPU run on the stand-in SD1.5 checkpoint. Only sizes are shrunk (steps, batch,
    LoRA rank, a rate that moves in 2 steps); the recipe (R_t = 250, the text-only and
    unconditional shares, loss weights) stays at its defaults. With seed 0 and micro-batches
    of 2, step 1 draws an identity sample at t = 65 (L_id) and step 2 none
    (test_training_run.py: test_total_loss_goes_down_and_everything_is_logged checks 10 such steps)."""
    from training.config import load_config

    base = {"checkpoint": str(MODELS_DIR / "checkpoints" / TEST_CHECKPOINT), "dataset": str(dataset),
            "output": str(output), "steps": 2, "micro_batch": 2, "lr": 1e-3,
            "save_every": 1000, "lora_rank": 4, "lora_alpha": 4.0}
    return load_config(None, {**base, **overrides})


def steps_with_identity_loss(config, steps: int, world: int = 1) -> list[bool]:
    """Per step (from the first): whether its global batch drew an identity sample with
    t <= R_t, i.e. whether L_id must be logged, from the recipe's draws alone (they depend
    on the seed and the sample position, not on the dataset or the trainer)."""
    from training.run.data import IDENTITY, draw, micro_positions

    def dip(position: int) -> bool:
        d = draw(position, config, (1, 1))  # mode and t are drawn before the noise: its size does not matter
        return d["mode"] == IDENTITY and d["t"] <= config.id_max_timestep

    return [any(dip(p) for rank in range(world) for micro in range(config.grad_accum)
                for p in micro_positions(step, micro, rank, config, world)) for step in range(steps)]


def flip_image_byte(dataset: Path, shard: str = "shard-00000") -> str:
    """Change one byte in the middle of the shard's first sample's image, in place (same size:
    the index cannot see it); returns that sample's key."""
    import json

    samples = json.loads((dataset / f"{shard}.json").read_text())["samples"]
    key = sorted(samples)[0]
    offset, size = samples[key]["jpg"]
    with open(dataset / f"{shard}.tar", "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    return key


def edit_json(path: Path, change) -> None:
    """Apply `change` to the JSON file at `path` in place (tests hand-edit dataset files)."""
    import json

    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
