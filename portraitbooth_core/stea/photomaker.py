"""PhotoMaker's ID encoder heads (Li et al. 2023, TencentARC/PhotoMaker, Apache-2.0), written
anew here for SDXL identity conditioning. Torch only; no ComfyUI, transformers or diffusers.

PhotoMaker's ID encoder is a CLIP ViT-L/14 vision tower plus a small head. The tower is
written to its own file (ComfyUI's Load CLIP Vision reads it); this module is the head,
which takes what any CLIP vision model gives and fuses it into the class word's tokens:

v1 (`photomaker_v1`), per photo: pooled = post_layernorm(last_hidden_state[:, 0]);
    id = [visual_projection(pooled) (768) || visual_projection_2(pooled) (1280)] -> 1 token.
v2 (`photomaker_v2`), per photo: a 512-d ArcFace embedding e and the tower's
    last_hidden_state P [257, 1024]:
      t = token_norm(reshape(token_proj(e), num_tokens x dim))      token_proj: Linear, GELU, Linear
      id = t + resampler(t, P)                                      a perceiver resampler: the
    tokens attend to [proj_in(P) || t]; depth x (attention + feed-forward, both residual),
    then proj_out and a LayerNorm -> num_tokens (2) tokens.
Fuse (both), for each class-token copy c and its id token: x = mlp1([c || id]) + c;
    x = mlp2(x) + x; out = LayerNorm(x). mlp = LN, Linear, GELU (exact), Linear.
The text side is SDXL's concatenated penultimate hidden states (CLIP-L 768 || bigG 1280 =
2048 wide); the prompt holds the class word repeated tokens_per_photo x photos times, and
copy k fuses with id token k, photo-major (photo 0's tokens first), as upstream scatters them.

Submodule names follow the release's `id_encoder.*` keys, so the head loads from the
release by stripping that prefix.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .postfuse import _PostfuseMLP
from .projector_config import ProjectorConfig

PHOTOMAKER_V1 = "photomaker_v1"
PHOTOMAKER_V2 = "photomaker_v2"
PHOTOMAKER_KINDS = (PHOTOMAKER_V1, PHOTOMAKER_V2)
# PhotoMaker's resampler uses 128-wide heads (heads = width // 128); the weights cannot tell.
RESAMPLER_HEAD_WIDTH = 128


def photomaker_v1_config(text_dim: int = 2048, clip_dim: int = 1024, projection_dim: int = 768,
                         hidden_dim: int | None = None) -> ProjectorConfig:
    """face_dim: the CLIP tower's width (its pooled output feeds both projections);
    projection_dim: visual_projection's output; visual_projection_2 gives the rest of text_dim."""
    if not 0 < projection_dim < text_dim:
        raise ValueError(f"projection_dim {projection_dim} must lie between 0 and text_dim {text_dim}")
    return ProjectorConfig(text_dim=text_dim, face_dim=clip_dim, hidden_dim=hidden_dim or text_dim,
                           kind=PHOTOMAKER_V1, options=(("projection_dim", int(projection_dim)),))


def photomaker_v2_config(text_dim: int = 2048, id_dim: int = 512, clip_dim: int = 1024, num_tokens: int = 2,
                         depth: int = 4, heads: int | None = None, dim_head: int = RESAMPLER_HEAD_WIDTH,
                         ff_mult: int = 4, token_ratio: int = 4, hidden_dim: int | None = None) -> ProjectorConfig:
    """face_dim: the face recognizer's embedding (ArcFace, 512); clip_dim: the CLIP tower's width."""
    heads = heads if heads is not None else max(1, text_dim // dim_head)
    options = dict(clip_dim=clip_dim, num_tokens=num_tokens, depth=depth, heads=heads, dim_head=dim_head,
                   ff_mult=ff_mult, token_ratio=token_ratio)
    return ProjectorConfig(text_dim=text_dim, face_dim=id_dim, hidden_dim=hidden_dim or text_dim,
                           kind=PHOTOMAKER_V2, options=tuple(sorted((k, int(v)) for k, v in options.items())))


class FuseModule(nn.Module):
    """forward(class_tokens [..., D], id_tokens [..., D]) -> [..., D]."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.mlp1 = _PostfuseMLP(2 * dim, hidden_dim, dim)
        self.mlp2 = _PostfuseMLP(dim, hidden_dim, dim)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, class_tokens: torch.Tensor, id_tokens: torch.Tensor) -> torch.Tensor:
        x = self.mlp1(torch.cat([class_tokens, id_tokens], dim=-1)) + class_tokens
        x = self.mlp2(x) + x
        return self.layer_norm(x)


class _PerceiverAttention(nn.Module):
    """Queries from the latents; keys/values from [image features || latents]."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        b, n, _ = latents.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)  # noqa: E731
        q = split(self.to_q(latents))
        k, v = (split(t) for t in self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1))
        weights = torch.softmax((q @ k.transpose(-2, -1)).float() / math.sqrt(self.dim_head), dim=-1).to(q.dtype)
        return self.to_out((weights @ v).transpose(1, 2).reshape(b, n, -1))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class _PerceiverResampler(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, in_dim: int, ff_mult: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, dim)
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(nn.ModuleList([_PerceiverAttention(dim, heads, dim_head), _feed_forward(dim, ff_mult)])
                                    for _ in range(depth))

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        for attention, ff in self.layers:
            latents = latents + attention(features, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class _QFormerPerceiver(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        o = dict(config.options)
        dim, self.num_tokens, self.dim = config.text_dim, o["num_tokens"], config.text_dim
        self.token_proj = nn.Sequential(nn.Linear(config.face_dim, config.face_dim * o["token_ratio"]), nn.GELU(),
                                        nn.Linear(config.face_dim * o["token_ratio"], dim * o["num_tokens"]))
        self.token_norm = nn.LayerNorm(dim)
        self.perceiver_resampler = _PerceiverResampler(dim, o["depth"], o["heads"], o["dim_head"], o["clip_dim"],
                                                       o["ff_mult"])

    def forward(self, id_embeds: torch.Tensor, last_hidden_state: torch.Tensor) -> torch.Tensor:
        tokens = self.token_norm(self.token_proj(id_embeds).view(-1, self.num_tokens, self.dim))
        return tokens + self.perceiver_resampler(tokens, last_hidden_state)


class _VisionTail(nn.Module):
    """The tower's final LayerNorm, kept with the v1 head so a caller that has only the
    tower's last_hidden_state (ComfyUI's CLIP vision output) gets the pooled output."""

    def __init__(self, clip_dim: int):
        super().__init__()
        self.post_layernorm = nn.LayerNorm(clip_dim)


class PhotoMakerV1Head(nn.Module):
    tokens_per_photo = 1

    def __init__(self, config: ProjectorConfig = photomaker_v1_config()):
        super().__init__()
        if config.kind != PHOTOMAKER_V1:
            raise ValueError(f"PhotoMakerV1Head is the '{PHOTOMAKER_V1}' kind, not '{config.kind}'")
        self.config = config
        projection = config.option("projection_dim")
        self.vision_model = _VisionTail(config.face_dim)
        self.visual_projection = nn.Linear(config.face_dim, projection, bias=False)
        self.visual_projection_2 = nn.Linear(config.face_dim, config.text_dim - projection, bias=False)
        self.fuse_module = FuseModule(config.text_dim, config.hidden_dim)

    def id_tokens(self, pooled: torch.Tensor | None = None, last_hidden_state: torch.Tensor | None = None,
                  id_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """[N, clip_dim] pooled outputs (or [N, T, clip_dim] last hidden states) -> [N, 1, text_dim]."""
        if pooled is None:
            if last_hidden_state is None:
                raise ValueError("PhotoMaker v1 needs the CLIP tower's pooled output or its last_hidden_state")
            pooled = self.vision_model.post_layernorm(last_hidden_state[:, 0].float())
        pooled = pooled.float()
        if pooled.ndim != 2 or pooled.shape[-1] != self.config.face_dim:
            raise ValueError(f"CLIP pooled output {tuple(pooled.shape)}: expected [photos, {self.config.face_dim}] "
                             f"(CLIP ViT-L/14)")
        return torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1).unsqueeze(1)

    def forward(self, class_tokens: torch.Tensor, id_tokens: torch.Tensor) -> torch.Tensor:
        return self.fuse_module(class_tokens, id_tokens)


class PhotoMakerV2Head(nn.Module):
    def __init__(self, config: ProjectorConfig = photomaker_v2_config()):
        super().__init__()
        if config.kind != PHOTOMAKER_V2:
            raise ValueError(f"PhotoMakerV2Head is the '{PHOTOMAKER_V2}' kind, not '{config.kind}'")
        self.config = config
        self.qformer_perceiver = _QFormerPerceiver(config)
        self.fuse_module = FuseModule(config.text_dim, config.hidden_dim)

    @property
    def tokens_per_photo(self) -> int:
        return self.config.option("num_tokens")

    def id_tokens(self, pooled: torch.Tensor | None = None, last_hidden_state: torch.Tensor | None = None,
                  id_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """[N, id_dim] face embeddings + [N, T, clip_dim] last hidden states -> [N, num_tokens, text_dim]."""
        if last_hidden_state is None or id_embeds is None:
            raise ValueError("PhotoMaker v2 needs each photo's face embedding (ArcFace, raw) and the CLIP "
                             "tower's last_hidden_state")
        id_embeds, last_hidden_state = id_embeds.float(), last_hidden_state.float()
        clip_dim = self.config.option("clip_dim")
        if id_embeds.ndim != 2 or id_embeds.shape[-1] != self.config.face_dim:
            raise ValueError(f"face embeddings {tuple(id_embeds.shape)}: expected [photos, {self.config.face_dim}]")
        if last_hidden_state.ndim != 3 or last_hidden_state.shape[-1] != clip_dim:
            raise ValueError(f"CLIP last_hidden_state {tuple(last_hidden_state.shape)}: expected "
                             f"[photos, tokens, {clip_dim}] (CLIP ViT-L/14)")
        if id_embeds.shape[0] != last_hidden_state.shape[0]:
            raise ValueError(f"{id_embeds.shape[0]} face embeddings but {last_hidden_state.shape[0]} CLIP outputs: "
                             f"one of each per photo")
        return self.qformer_perceiver(id_embeds, last_hidden_state)

    def forward(self, class_tokens: torch.Tensor, id_tokens: torch.Tensor) -> torch.Tensor:
        return self.fuse_module(class_tokens, id_tokens)


def build_photomaker_head(config: ProjectorConfig) -> nn.Module:
    return PhotoMakerV1Head(config) if config.kind == PHOTOMAKER_V1 else PhotoMakerV2Head(config)


def fuse_class_tokens(head: nn.Module, class_tokens: torch.Tensor, *, pooled: torch.Tensor | None = None,
                      last_hidden_state: torch.Tensor | None = None,
                      id_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The fused tokens for the class word's copies.

    class_tokens: [K, D] or [B, K, D], the text encoder's outputs at the K copies of the class
      word (K = photos x head.tokens_per_photo); the same identity goes into every batch item.
    pooled / last_hidden_state: the CLIP tower's outputs for the N photos (v1: either; v2:
      last_hidden_state); id_embeds: v2's [N, 512] face embeddings.
    Copy k is fused with id token k, photo-major. Result: class_tokens' shape, float32.
    """
    ids = head.id_tokens(pooled=pooled, last_hidden_state=last_hidden_state, id_embeds=id_embeds)
    ids = ids.reshape(-1, ids.shape[-1])
    tokens = class_tokens.float()
    if tokens.shape[-2] != ids.shape[0] or tokens.shape[-1] != head.config.text_dim:
        raise ValueError(f"{tokens.shape[-2]} class-token copies of width {tokens.shape[-1]}, but the identity has "
                         f"{ids.shape[0]} tokens of width {head.config.text_dim} ({head.tokens_per_photo} per photo): "
                         f"repeat the class word {head.tokens_per_photo} x photos times")
    return head(tokens, ids.to(tokens.device).expand_as(tokens))


def splice_photomaker(cond: torch.Tensor, positions: Sequence[int], head: nn.Module, *, strength: float = 1.0,
                      psi: torch.Tensor | None = None, weights: Sequence[float] | None = None,
                      **features) -> torch.Tensor:
    """cond [B, T, D] with the K class-token copies at `positions` replaced by their fused
    tokens (fuse_class_tokens); every other position bit-identical.

    psi: [B, K, D] the copies' *unweighted* text outputs (default: cond's, right when their
    prompt weight is 1); weights: their K prompt weights. At a copy the result is
    cond + strength * weight * (fused(psi) - psi), as STEA's splice_identity: exactly the
    fused token at strength 1 and weight 1, the text alone at strength 0.
    """
    if strength == 0 or len(positions) == 0:
        return cond
    index = torch.as_tensor(list(positions), dtype=torch.long, device=cond.device)
    if int(index.min()) < 0 or int(index.max()) >= cond.shape[1]:
        raise ValueError(f"class-token position out of range: {list(positions)} for {cond.shape[1]} tokens")
    at = cond[:, index].float()
    psi = at if psi is None else psi.to(device=cond.device, dtype=torch.float32)
    fused = fuse_class_tokens(head, psi, **features)
    w = torch.ones(len(positions)) if weights is None else torch.tensor([float(x) for x in weights])
    out = cond.clone()
    out[:, index] = (at + strength * w.to(cond.device).view(1, -1, 1) * (fused - psi)).to(cond.dtype)
    return out


__all__ = ["FuseModule", "PHOTOMAKER_KINDS", "PHOTOMAKER_V1", "PHOTOMAKER_V2", "PhotoMakerV1Head", "PhotoMakerV2Head",
           "RESAMPLER_HEAD_WIDTH", "build_photomaker_head", "fuse_class_tokens", "photomaker_v1_config",
           "photomaker_v2_config", "splice_photomaker"]
