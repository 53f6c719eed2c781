"""Differentiable torch copy of an ArcFace ONNX recognizer, for training's identity loss.

Built from the very same ONNX file as the onnxruntime recognizer (via onnx2torch), so
inference and training agree on what "the same person" means. Besides the final
embedding it can expose a "shallow" feature: the last activation of one resolution stage,
average-pooled to a vector. The feature's name travels in weight-file metadata.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..optional import require
from .align import align_faces_torch
from .arcface import input_normalization

# "final" is the embedding; "stageK" is the last activation at 1/2**K of the input size
# (112 -> 56, 28, 14, 7 for K = 1..4 in an IResNet), global-average-pooled.
FEATURES = ("final", "stage1", "stage2", "stage3", "stage4")


def fold_identity_initializers(model) -> int:
    """Remove Identity nodes whose input is an initializer, renaming their consumers' inputs.

    Some exporters route weights through Identity nodes; onnx2torch then sees a weight
    that is not an initializer and fails or builds a slow generic node. Returns the count.
    """
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    rename, keep = {}, []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    return len(rename)


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _stage_nodes(gm: torch.fx.GraphModule, size: int) -> dict[str, torch.fx.Node]:
    """Feature name -> fx node ending each resolution stage.

    A stage ends at its last residual merge (a node joining two 4-D activations of that
    resolution): later nodes at the same size already belong to the next stage's first,
    downsampling block. Networks without residual merges use the last node at that size.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(torch.zeros(1, 3, size, size))
    last: dict[int, torch.fx.Node] = {}
    merge: dict[int, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        shape = _shape(node)
        if shape is None or len(shape) != 4 or shape[2] != shape[3]:
            continue
        last[shape[2]] = node
        if sum(1 for a in node.args if (_shape(a) or ())[2:] == shape[2:]) >= 2:
            merge[shape[2]] = node
    found = {}
    for k in range(1, 5):
        res = size // (2 ** k)
        if res in last:
            found[f"stage{k}"] = merge.get(res, last[res])
    return found


class TorchArcFace(nn.Module):
    """ArcFace as a frozen torch module; input RGB in 0..1, aligned [B,3,S,S]."""

    def __init__(self, model_path: str | os.PathLike, feature: str = "final",
                 device: str | torch.device | None = None):
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        onnx = require("onnx", "The differentiable ArcFace recognizer")
        onnx2torch = require("onnx2torch", "The differentiable ArcFace recognizer")
        self.path, self.feature = os.fspath(model_path), feature
        model = onnx.load(self.path)
        fold_identity_initializers(model)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        self.input_size = dims[2].dim_value or 112
        gm = onnx2torch.convert(model)
        gm.eval()
        if feature != "final":
            nodes = _stage_nodes(gm, self.input_size)
            if feature not in nodes:
                raise ValueError(f"{self.path}: no activation at the resolution of {feature!r}; "
                                 f"available: {['final', *nodes]}")
            out = next(n for n in gm.graph.nodes if n.op == "output")
            out.args = ((out.args[0], nodes[feature]),)
            gm.recompile()
        self.net = gm.requires_grad_(False)
        mean, std = input_normalization(self.path)
        self.register_buffer("mean", torch.tensor(mean / 255.0))
        self.register_buffer("std", torch.tensor(std / 255.0))
        if device is not None:  # built on the CPU (onnx2torch, the stage search), then moved once
            self.to(device)

    def train(self, mode: bool = True) -> "TorchArcFace":
        # Always eval: BatchNorm must use its running statistics, never the batch's.
        return super().train(False)

    def forward_all(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw final embedding [B,D], selected feature as an L2-normalized vector [B,C])."""
        crops = crops.to(self.mean.device)  # callers may hand CPU crops to a GPU recognizer
        out = self.net((crops - self.mean) / self.std)
        if self.feature == "final":
            return out, F.normalize(out, dim=-1)
        final, fmap = out
        return final, F.normalize(fmap.mean(dim=(2, 3)), dim=-1)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """The selected feature of aligned crops, L2-normalized: [B, D or C]."""
        return self.forward_all(crops)[1]

    def embed_faces(self, images: torch.Tensor, landmarks) -> torch.Tensor:
        """Align (differentiably) then embed: images [B,3,H,W] 0..1, landmarks [B,5,2] pixels."""
        return self(align_faces_torch(images, landmarks, self.input_size))
