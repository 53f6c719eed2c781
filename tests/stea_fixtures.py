"""Helpers of the STEA tests: identities, projectors and PortraitBooth files built in place."""
from __future__ import annotations

import torch

from portraitbooth_core.face.types import Identity
from portraitbooth_core.stea.projector import ProjectorConfig, STEAProjector
from portraitbooth_core.weights.meta import FaceEncoderSpec
from portraitbooth_core.weights.file import PortraitBoothModel, load_portraitbooth, save_portraitbooth

KIND = "arcface:standin/w600k_r50.onnx"
DIM = 512


def identity(seed: int, dim: int = DIM, kind: str = KIND) -> Identity:
    vec = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0)
    return Identity(embeddings=vec[None], vector=vec, kind=kind)


def projector(seed: int = 0, dim: int = DIM, hidden: int = 256) -> STEAProjector:
    """A projector whose output depends on the face (a fresh one has fc2 = 0: identity on text)."""
    torch.manual_seed(seed)
    proj = STEAProjector(ProjectorConfig(face_dim=dim, hidden_dim=hidden))
    torch.nn.init.normal_(proj.fc2.weight, std=0.05)
    return proj.eval().requires_grad_(False)


def lora_patch(seed: int = 0, rank: int = 4, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Kohya-style LoRA for the tiny SD1.5 UNet's first transformer (proj_in conv + attn2.to_k)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * scale  # noqa: E731
    a = "lora_unet_input_blocks_1_1_proj_in"
    k = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    return {f"{a}.lora_up.weight": rnd(320, rank, 1, 1), f"{a}.lora_down.weight": rnd(rank, 320, 1, 1),
            f"{a}.alpha": torch.tensor(float(rank)),
            f"{k}.lora_up.weight": rnd(320, rank), f"{k}.lora_down.weight": rnd(rank, 768),
            f"{k}.alpha": torch.tensor(float(rank))}


def write_model(path, seed: int = 0, patch: dict | None = None, dim: int = DIM, kind: str = KIND, **kwargs):
    save_portraitbooth(path, projector(seed, dim), FaceEncoderSpec(kind, dim), patch, **kwargs)
    return path


def model(tmp_path, seed: int = 0, **kwargs) -> PortraitBoothModel:
    return load_portraitbooth(write_model(tmp_path / f"pb{seed}.safetensors", seed, **kwargs))
