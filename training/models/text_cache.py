"""The frozen text encoder's encodings of captions, computed once per caption."""
from __future__ import annotations

import torch


class TextCache:
    """CLIP encodings of captions (first 77-token chunk), computed once: CLIP is frozen.
    Bounded (one encoding is 77 x 768 floats, 236 KB): small datasets hit every time,
    large ones fill it once and encode the rest on the fly."""

    def __init__(self, clip, limit: int = 2048):
        self.clip, self.limit, self.cache = clip, limit, {}

    def __call__(self, caption: str) -> torch.Tensor:
        hit = self.cache.get(caption)
        if hit is None:
            tokens = self.clip.tokenize(caption)
            tokens = {k: v[:1] for k, v in tokens.items()}
            with torch.no_grad():
                hit = self.clip.encode_from_tokens(tokens).detach().float().cpu()
            if len(self.cache) < self.limit:
                self.cache[caption] = hit
        return hit
