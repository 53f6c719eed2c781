"""STEA: subject text-embedding augmentation (PortraitBooth §3.1).

The class word's CLIP output psi(w) and the face embedding phi(f) go through a small MLP
whose output replaces psi(w) at the class word's position; every other token keeps what
CLIP made. This module holds the projector and the tensor splice; finding the class
word's positions in a tokenized prompt is `class_words`'s job.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .photomaker import build_photomaker_head
from .postfuse import FastComposerPostfuse
from .projector_config import PROJECTOR_KINDS, ProjectorConfig, UnknownProjectorKindError  # noqa: F401 - re-exported


def build_projector(config: ProjectorConfig) -> nn.Module:
    """The projector network a config (a weight file's metadata) describes; every kind
    has forward(psi, phi) -> token and a `.config`, so splice_identity runs any of them."""
    if config.kind == "portraitbooth_mlp":
        return STEAProjector(config)
    if config.kind == "fastcomposer_postfuse":
        return FastComposerPostfuse(config)
    if config.kind in ("photomaker_v1", "photomaker_v2"):  # SDXL; not for splice_identity: see stea.photomaker
        return build_photomaker_head(config)
    raise UnknownProjectorKindError(config.kind)


class STEAProjector(nn.Module):
    """c = psi + fc2(gelu(fc1([LN(psi) || LN(phi)]))).

    Separate LayerNorms put a unit-norm face vector (components ~1/sqrt(D)) and CLIP's
    output (components ~1) on the same scale before they are mixed. The residual on psi
    with a zero-initialised fc2 makes a fresh projector the identity on the text, so
    training starts from plain SD1.5 behaviour instead of from noise.
    """

    def __init__(self, config: ProjectorConfig = ProjectorConfig()):
        super().__init__()
        if config.kind != "portraitbooth_mlp":
            raise ValueError(f"STEAProjector is the 'portraitbooth_mlp' kind; use build_projector for '{config.kind}'")
        self.config = config
        self.text_norm = nn.LayerNorm(config.text_dim)
        self.face_norm = nn.LayerNorm(config.face_dim)
        self.fc1 = nn.Linear(config.text_dim + config.face_dim, config.hidden_dim)
        self.fc2 = nn.Linear(config.hidden_dim, config.text_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, psi: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """psi [..., text_dim], phi [..., face_dim] (same leading dims) -> [..., text_dim]."""
        x = torch.cat([self.text_norm(psi), self.face_norm(phi)], dim=-1)
        return psi + self.fc2(nn.functional.gelu(self.fc1(x)))

    def expected_keys(self, prefix: str = "") -> list[str]:
        return [prefix + k for k in self.state_dict()]


def splice_identity(cond: torch.Tensor, positions: Sequence[int], faces: torch.Tensor,
                    projector: nn.Module, strength: float = 1.0,
                    psi: torch.Tensor | None = None,
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """Replace the class-word embeddings in `cond` by the projector's output.

    cond: [B, T, C] text conditioning exactly as CLIP gave it (prompt weights applied).
    positions: S flat token positions (chunk * 77 + index), one per subject.
    faces: [S, D] (same faces for every batch item) or [B, S, D].
    psi: [B, S, C] the *unweighted* CLIP outputs at those positions; defaults to
      cond[:, positions], which is right whenever those tokens have weight 1.
    weights: S prompt weights of those tokens (ComfyUI's "(man:1.2)").

    Result at a class position: cond + strength * weight * (MLP(psi, phi) - psi). With
    weight 1 this is the blend psi + s * (MLP - psi); with another weight it is what
    ComfyUI's (z - z_empty) * w + z_empty weighting gives when the identity embedding
    stands in for the word, because that weighting is affine. Every other position, and
    the whole tensor when strength is 0, is returned bit-identical.
    """
    if strength == 0 or len(positions) == 0:
        return cond
    batch, tokens, channels = cond.shape
    if max(positions) >= tokens or min(positions) < 0:
        raise ValueError(f"class-word position out of range: {list(positions)} for {tokens} tokens")
    if channels != projector.config.text_dim:
        raise ValueError(f"the text conditioning has {channels} channels but the projector expects "
                         f"{projector.config.text_dim} (SD1.5's CLIP-L gives 768)")
    index = torch.as_tensor(list(positions), device=cond.device, dtype=torch.long)
    if faces.dim() == 2:
        faces = faces.unsqueeze(0).expand(batch, -1, -1)
    if faces.shape[:2] != (batch, len(positions)):
        raise ValueError(f"faces {tuple(faces.shape)} do not match {batch} conditionings x "
                         f"{len(positions)} class-word positions")
    if faces.shape[-1] != projector.config.face_dim:
        raise ValueError(f"face embeddings are {faces.shape[-1]}-d but the projector expects "
                         f"{projector.config.face_dim}-d")
    at = cond[:, index].float()
    psi = at if psi is None else psi.to(device=cond.device, dtype=torch.float32)
    w = torch.ones(len(positions)) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    w = w.to(cond.device).view(1, -1, 1)
    # No no_grad here: training runs this same splice with gradients into the projector.
    identity = projector.to(cond.device)(psi, faces.to(device=cond.device, dtype=torch.float32))
    out = cond.clone()
    out[:, index] = (at + strength * w * (identity - psi)).to(cond.dtype)
    return out
