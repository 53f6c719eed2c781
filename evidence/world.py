"""The synthetic identity world of the evidence run: procedurally drawn "faces" whose
identity is a known colour layout, and the stand-in models that see them.

- An identity is a 2x2 grid of colours (its "face code") plus a class word. A rendering
  draws that code inside an elliptic face at a jittered place and size on a random
  smooth background, with a mouth mark that depends on the expression word. The face
  mask, the five landmarks and the caption are known exactly (no detector involved).
- The recognizer (an ONNX file in the ArcFace format: [N,3,112,112] -> [N,512]) reads
  the aligned crop's face ellipse as a 4x4 colour layout and maps it through a fixed
  random linear layer: renderings of one identity land close together, different
  identities far apart. Training's L_id runs its differentiable torch copy, as with a
  real ArcFace.
- The VAE is TAESD-format with hand-set weights: encode = 8x8 average pooling of the
  colours (latent = 2*colour - 1, a fourth channel holding the grey level), decode =
  nearest upsampling. A random-weight VAE would make decoded one-step estimates (what
  DIP scores) meaningless; this one makes latents small images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from portraitbooth_core.face.align import ARCFACE_TEMPLATE

EXPRESSIONS = {"happy": (1.0, 1.0, 0.9), "sad": (0.1, 0.1, 0.5), "angry": (0.9, 0.1, 0.1),
               "surprised": (0.05, 0.05, 0.05)}  # expression word -> mouth colour
GRID = 2           # identity code: GRID x GRID colour cells
READOUT = 4        # the recognizer reads the face as READOUT x READOUT mean colours
LATENT_GAIN = 2.0  # model-space latent = LATENT_GAIN * (2 * colour - 1)
EMBED_DIM = 512


@dataclass(frozen=True)
class Identity:
    code: np.ndarray    # (GRID, GRID, 3) colours in 0..1
    word: str           # class word of the caption


@dataclass
class Rendering:
    image: np.ndarray       # R x R x 3 uint8
    mask: np.ndarray        # R x R uint8 0/255
    landmarks: np.ndarray   # (5, 2) float32 pixels
    box: np.ndarray         # (4,) x0 y0 x1 y1
    expression: str


def make_identities(count: int, seed: int, min_distance: float = 0.25) -> list[Identity]:
    """`count` codes whose colour layouts are pairwise far apart (rejection sampling;
    min_distance is an RMS colour difference), so that the recognizer tells every pair
    apart by a clear margin. A code is a base colour (like a skin tone: what a small
    model picks up first) plus smaller per-cell offsets (the layout)."""
    rng = np.random.default_rng(seed)
    codes: list[np.ndarray] = []
    for _ in range(1000 * count):
        if len(codes) == count:
            break
        code = np.clip(rng.uniform(0.15, 0.85, (1, 1, 3)) + rng.uniform(-0.15, 0.15, (GRID, GRID, 3)), 0, 1)
        vec = (code - 0.5).ravel()
        if all(np.linalg.norm(vec - (c - 0.5).ravel()) / np.sqrt(vec.size) > min_distance for c in codes):
            codes.append(code)
    if len(codes) < count:
        raise ValueError(f"cannot draw {count} identities {min_distance} apart; lower min_distance")
    return [Identity(code, ("man", "woman")[i % 2]) for i, code in enumerate(codes)]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    corners = torch.from_numpy(rng.uniform(0, 1, (1, 3, 2, 2))).float()
    smooth = torch.nn.functional.interpolate(corners, size=(size, size), mode="bilinear", align_corners=True)
    return smooth[0].permute(1, 2, 0).numpy()


def render(identity: Identity, expression: str, resolution: int, rng: np.random.Generator) -> Rendering:
    """One picture of `identity` with `expression`; everything else random."""
    r = resolution
    side = r * rng.uniform(0.5, 0.6)
    cx, cy = r / 2 + rng.uniform(-0.08, 0.08, 2) * r
    x0, y0 = cx - side / 2, cy - side / 2
    yy, xx = (np.mgrid[:r, :r] + 0.5)
    u, v = (xx - x0) / side, (yy - y0) / side            # face-box coordinates, 0..1 inside
    inside = ((u - 0.5) / 0.42) ** 2 + ((v - 0.5) / 0.5) ** 2 <= 1
    cell = np.clip((np.stack([v, u], -1) * GRID).astype(int), 0, GRID - 1)
    face = identity.code[cell[..., 0], cell[..., 1]]
    mouth = (u > 0.3) & (u < 0.7) & (v > 0.74) & (v < 0.86)
    face = np.where(mouth[..., None], np.array(EXPRESSIONS[expression]), face)
    image = np.where(inside[..., None], face, _background(rng, r))
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    landmarks = ARCFACE_TEMPLATE * (side / 112.0) + np.array([x0, y0])
    return Rendering((image * 255).round().astype(np.uint8), (inside * 255).astype(np.uint8),
                     landmarks.astype(np.float32), np.array([x0, y0, x0 + side, y0 + side], np.float32), expression)


def caption(identity: Identity, expression: str) -> str:
    return f"a photo of a {expression} {identity.word}"


# -- the recognizer ------------------------------------------------------------------------
def build_recognizer_onnx(path, seed: int = 0):
    """ArcFace-format ONNX: aligned crop -> (crop * face ellipse) -> 4x4 average colours
    -> fixed random linear map to 512-d. Input normalization (x-127.5)/127.5 is applied
    by the loaders, as for insightface's recognizers, so colours enter centred."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    size, cell = 112, 112 // READOUT
    yy, xx = np.mgrid[:size, :size] + 0.5
    ellipse = (((xx / size - 0.5) / 0.42) ** 2 + ((yy / size - 0.5) / 0.5) ** 2 <= 1).astype(np.float32)
    weight = rng.normal(0, 1 / np.sqrt(3 * READOUT ** 2), (EMBED_DIM, 3 * READOUT ** 2)).astype(np.float32)
    inits = [numpy_helper.from_array(ellipse[None, None], "face_ellipse"),
             numpy_helper.from_array(weight, "readout"),
             numpy_helper.from_array(np.zeros(EMBED_DIM, np.float32), "readout_bias")]
    nodes = [helper.make_node("Mul", ["input.1", "face_ellipse"], ["masked"], name="mask_face"),
             helper.make_node("AveragePool", ["masked"], ["pooled"], kernel_shape=[cell, cell],
                              strides=[cell, cell], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["flat", "readout", "readout_bias"], ["embedding"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "evidence_recognizer",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBED_DIM])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="evidence")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# -- the VAE ---------------------------------------------------------------------------------
def pooling_taesd_state_dict() -> dict[str, torch.Tensor]:
    """TAESD keys with weights that make it an exact 8x average-pool / nearest-upsample
    autoencoder. Every residual Block's convs are zero (Block = ReLU of its input, and
    all activations are kept non-negative by offsets), stride-2 convs average 2x2."""
    import comfy.taesd.taesd as taesd_module

    model = taesd_module.TAESD()
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}

    def centre(key: str, pairs, value: float = 1.0, taps=((1, 1),)):
        for out_c, in_c in pairs:
            for ky, kx in taps:
                sd[key][out_c, in_c, ky, kx] = value

    enc, dec = "taesd_encoder", "taesd_decoder"
    centre(f"{enc}.0.weight", [(c, c) for c in range(3)])                # colours 0..1 into channels 0-2
    for idx in (2, 6, 10):                                               # stride-2 convs: 2x2 means
        centre(f"{enc}.{idx}.weight", [(c, c) for c in range(3)], 0.25, ((1, 1), (1, 2), (2, 1), (2, 2)))
    centre(f"{enc}.14.weight", [(c, c) for c in range(3)], 2.0)          # latent = 2 * colour - 1
    centre(f"{enc}.14.weight", [(3, c) for c in range(3)], 2.0 / 3)      # channel 3: grey level
    sd[f"{enc}.14.bias"][:] = -1.0
    # Decoder: Clamp (tanh(x/3)*3, near-linear on [-1, 1]), then channel c = latent + 3 >= 0.
    centre(f"{dec}.1.weight", [(c, c) for c in range(3)])
    sd[f"{dec}.1.bias"][:3] = 3.0
    for idx in (7, 12, 17):                                              # the convs after each upsample
        centre(f"{dec}.{idx}.weight", [(c, c) for c in range(3)])
    centre(f"{dec}.19.weight", [(c, c) for c in range(3)], 0.5)          # colour = (latent + 1) / 2
    sd[f"{dec}.19.bias"][:] = -1.0
    # TAESD.encode divides by vae_scale and SD1.5's latent format then multiplies by
    # 0.18215, decode multiplies by it again before the Clamp: vae_scale = 0.18215 / 2
    # gives the UNet latents of 2 * (2 * colour - 1) (std ~0.5, near SD's) while the
    # decoder's Clamp still sees 2 * colour - 1, where it is near-linear.
    sd["vae_scale"] = torch.tensor(0.18215 / LATENT_GAIN)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def build_checkpoint(path, seed: int = 0):
    """SD1.5-format checkpoint: the tests' tiny random UNet and random CLIP-L, with the
    pooling VAE above (ComfyUI loads it as TAESD)."""
    import os

    from safetensors.torch import save_file

    from standins.sd15 import clip_l_state_dict, tiny_unet_state_dict

    sd: dict[str, torch.Tensor] = {}
    for prefix, part in (("model.diffusion_model.", tiny_unet_state_dict(seed)),
                         ("cond_stage_model.", clip_l_state_dict(seed + 1)),
                         ("first_stage_model.", pooling_taesd_state_dict())):
        sd.update({prefix + k: v.contiguous() for k, v in part.items()})
    tmp = f"{path}.{os.getpid()}.part"
    save_file(sd, tmp, metadata={"portraitbooth_standin": "evidence run: tiny random UNet, pooling TAESD"})
    os.replace(tmp, path)
    return path
