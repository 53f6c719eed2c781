"""FastComposer's "postfuse" projector (Xiao et al. 2023, mit-han-lab/fastcomposer, MIT).

Same place and job as STEAProjector: it takes the class word's text-encoder output psi
(after CLIP's final LayerNorm) and the subject's image embedding phi, and returns the token
that replaces psi. Its face encoder is CLIP ViT-L/14's projected image embedding (768-d),
not a face recognizer. Architecture (from the paper's code, re-written here):

    x = mlp1([psi || phi]) + psi          mlp1: LN(1536) -> Linear 1536->768 -> GELU -> Linear 768->768
    x = mlp2(x) + x                       mlp2: LN(768)  -> Linear 768->768  -> GELU -> Linear 768->768
    token = LayerNorm(x)

Submodule names follow the released checkpoint's `postfuse_module.*` keys so its state
dict loads without renaming.
"""
from __future__ import annotations

import torch
from torch import nn

from .projector_config import ProjectorConfig

POSTFUSE_KIND = "fastcomposer_postfuse"


def postfuse_config(text_dim: int = 768, face_dim: int = 768, hidden_dim: int = 768) -> ProjectorConfig:
    return ProjectorConfig(text_dim=text_dim, face_dim=face_dim, hidden_dim=hidden_dim, kind=POSTFUSE_KIND)


class _PostfuseMLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.GELU's default (exact erf), as the original module.
        return self.fc2(nn.functional.gelu(self.fc1(self.layernorm(x))))


class FastComposerPostfuse(nn.Module):
    """forward(psi [..., text_dim], phi [..., face_dim]) -> [..., text_dim]."""

    def __init__(self, config: ProjectorConfig = postfuse_config()):
        super().__init__()
        if config.kind != POSTFUSE_KIND:
            raise ValueError(f"FastComposerPostfuse is the '{POSTFUSE_KIND}' kind, not '{config.kind}'")
        self.config = config
        self.mlp1 = _PostfuseMLP(config.text_dim + config.face_dim, config.hidden_dim, config.text_dim)
        self.mlp2 = _PostfuseMLP(config.text_dim, config.hidden_dim, config.text_dim)
        self.layer_norm = nn.LayerNorm(config.text_dim)

    def forward(self, psi: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        x = self.mlp1(torch.cat([psi, phi], dim=-1)) + psi
        x = self.mlp2(x) + x
        return self.layer_norm(x)

    def expected_keys(self, prefix: str = "") -> list[str]:
        return [prefix + k for k in self.state_dict()]


__all__ = ["FastComposerPostfuse", "POSTFUSE_KIND", "postfuse_config"]
