"""Samples of the synthetic identity task: training shards in `training`'s format and
held-out batches in `training.data.Batch` form.

Each sample's reference is another rendering of the same identity (other place, size,
background and expression), as in the paper's recipe; its embedding is the recognizer's
on that reference's aligned crop.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from portraitbooth_core.face.align import align_face
from training.dataset.samples import encode_image

from . import world


@dataclass
class Sample:
    identity: int
    target: world.Rendering
    reference: np.ndarray       # 112 x 112 x 3 uint8, aligned crop of another rendering
    embedding: np.ndarray       # (512,) float32, normalized recognizer output of `reference`
    caption: str
    identity_positions: list[int]
    expression_positions: list[int]


class Recognizer:
    """The evidence recognizer on uint8 crops (its torch copy: the one L_id uses)."""

    def __init__(self, path: Path):
        from portraitbooth_core.face.arcface_torch import TorchArcFace

        self.path = Path(path)
        self.net = TorchArcFace(self.path)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return self.net(x).numpy()


def make_samples(identities: list[world.Identity], per_identity: int, resolution: int, seed: int,
                 recognizer: Recognizer) -> list[Sample]:
    from training.build.captions import TokenFinder

    finder = TokenFinder()
    rng = np.random.default_rng(seed)
    words = list(world.EXPRESSIONS)
    samples, refs = [], []
    for k, ident in enumerate(identities):
        for j in range(per_identity):
            expression = words[(j + k) % len(words)]
            target = world.render(ident, expression, resolution, rng)
            ref = world.render(ident, words[int(rng.integers(len(words)))], resolution, rng)
            refs.append(align_face(ref.image, ref.landmarks, 112))
            text = world.caption(ident, expression)
            ident_pos, _, expr_pos = finder.positions(text, ident.word)
            samples.append(Sample(k, target, refs[-1], np.zeros(0, np.float32), text, ident_pos, expr_pos))
    embeddings = recognizer(np.stack(refs))
    for s, e in zip(samples, embeddings):
        s.embedding = (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32)
    return samples


def uninformative_embeddings(samples: list[Sample], seed: int) -> list[np.ndarray]:
    """Each sample gets the embedding of a uniformly drawn sample (any identity): the
    face embedding then says nothing about the target. A fixed permutation of identities
    would not do: it still names each identity, only under another embedding."""
    rng = np.random.default_rng(seed)
    return [samples[int(i)].embedding for i in rng.integers(len(samples), size=len(samples))]


def write_dataset(samples: list[Sample], out: Path, recognizer_path: Path, resolution: int,
                  embeddings: list[np.ndarray] | None = None, face_encoder: dict | None = None,
                  checkpoint: Path | None = None) -> Path:
    """Shards + index.json as `python -m training build` writes them. face_encoder: the
    index entry when `embeddings` come from another encoder than the recognizer.
    checkpoint: also store its VAE latents and text encodings (`python -m training
    precompute`), so the runs' steps do no VAE encode (about a third of a step here)."""
    from training.dataset.shards import FORMAT, INDEX, ShardWriter, write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, "shard-00000")
    for i, s in enumerate(samples):
        buf = io.BytesIO()
        np.save(buf, embeddings[i] if embeddings is not None else s.embedding, allow_pickle=False)
        meta = {"caption": s.caption, "identity_positions": s.identity_positions,
                "expression_positions": s.expression_positions, "expression_words": [s.target.expression],
                "landmarks": s.target.landmarks.tolist(), "box": s.target.box.tolist(),
                "source": f"identity-{s.identity}/{i}"}
        writer.add(f"{i:08d}", {"jpg": encode_image(s.target.image, "JPEG", quality=97, subsampling=0),  # keep face colours
                                "mask.png": encode_image(s.target.mask),
                                "ref.png": encode_image(s.reference), "emb.npy": buf.getvalue(),
                                "json": json.dumps(meta).encode()})
    shard = writer.close()
    write_json_atomic(out / INDEX, {"format": FORMAT, "resolution": resolution, "samples": len(samples),
                                    "shards": [shard], "identity_words": ["man", "woman"],
                                    "face_encoder": face_encoder or {
                                        "kind": "arcface:evidence", "dim": world.EMBED_DIM, "feature": "final",
                                        "recognizer_path": str(recognizer_path)}})
    if checkpoint is not None:
        from training.build.precompute import precompute

        precompute(str(out), str(checkpoint), progress=False)
    return out


def held_out_batch(samples: list[Sample], timesteps: list[int], seed: int, latent_hw: tuple[int, int]):
    """Every sample at every timestep as one identity-mode Batch (fixed noise), with the
    noise loss taken inside the face (identity lives there)."""
    from training.run.data import IDENTITY, Batch

    rows = [(s, t) for t in timesteps for s in samples]
    g = torch.Generator().manual_seed(seed)

    def image(a):
        return torch.from_numpy(a).permute(2, 0, 1).float() / 255

    return Batch(
        images=torch.stack([image(s.target.image) for s, _ in rows]),
        masks=torch.stack([torch.from_numpy(s.target.mask).float() / 255 for s, _ in rows]),
        landmarks=torch.stack([torch.from_numpy(s.target.landmarks) for s, _ in rows]),
        embeddings=torch.stack([torch.from_numpy(s.embedding) for s, _ in rows]),
        references=torch.stack([image(s.reference) for s, _ in rows]),
        captions=[s.caption for s, _ in rows],
        identity_positions=[list(s.identity_positions) for s, _ in rows],
        expression_positions=[list(s.expression_positions) for s, _ in rows],
        modes=torch.full((len(rows),), IDENTITY, dtype=torch.long),
        timesteps=torch.tensor([t for _, t in rows]),
        noise=torch.randn(len(rows), 4, *latent_hw, generator=g),
        masked_noise=torch.ones(len(rows), dtype=torch.bool),
    )
