"""Stand-in face models the tests build: same file formats and signatures as the real ones.

No real SCRFD/ArcFace/BiSeNet weights can be downloaded here, so the tests make models
with the real interfaces (insightface pack ONNX files, facexlib state dicts) whose
behaviour is known, and check our loading, routing and decoding code against them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13  # insightface's packs use opsets 11-13


class _Graph:
    """Tiny ONNX graph builder: add nodes and random initializers, then save."""

    def __init__(self, seed: int):
        self.nodes, self.inits, self.rng, self.n = [], [], np.random.default_rng(seed), 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, array, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def const_int(self, values) -> str:
        name = self.name("shape")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1) -> str:
        w = self.rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k))
        return self.op("Conv", [x, self.const(w, "w")], kernel_shape=[k, k], strides=[stride, stride],
                       pads=[k // 2] * 4)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.8, 1.2, c), r.normal(0, 0.05, c), r.normal(0, 0.05, c), r.uniform(0.8, 1.2, c)]
        return self.op("BatchNormalization", [x, *[self.const(p, "bn") for p in params]], epsilon=1e-5)

    def prelu(self, x: str, c: int) -> str:
        return self.op("PRelu", [x, self.const(np.full((c, 1, 1), 0.25), "slope")])

    def save(self, path: Path, inputs, outputs) -> Path:
        graph = helper.make_graph(self.nodes, "standin", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="standin")
        model.ir_version = 8
        onnx.checker.check_model(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        return path


def build_arcface_onnx(path: Path, widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1), dim: int = 512,
                       seed: int = 0, identity_initializer: bool = True) -> Path:
    """An IResNet-shaped recognizer: [N,3,112,112] -> [N,dim], like glintr100 / w600k_r50.

    widths=(64,128,256,512), blocks=(3,13,30,3) gives an R100-sized network (~24 GFLOPs)
    for timing. identity_initializer feeds the stem weight through an Identity node, as
    some exporters do (onnx2torch needs those folded first).
    """
    g = _Graph(seed)
    w0 = widths[0]
    stem_w = g.const(g.rng.normal(0, np.sqrt(2.0 / 27), (w0, 3, 3, 3)), "stem_w")
    if identity_initializer:
        stem_w = g.op("Identity", [stem_w])
    x = g.op("Conv", ["input.1", stem_w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = g.prelu(g.bn(x, w0), w0)
    cin = w0
    for width, count in zip(widths, blocks):
        for i in range(count):
            stride = 2 if i == 0 else 1
            y = g.bn(x, cin)
            y = g.prelu(g.bn(g.conv(y, cin, width), width), width)
            y = g.bn(g.conv(y, width, width, stride=stride), width)
            short = x if (stride == 1 and cin == width) else g.bn(g.conv(x, cin, width, 1, stride), width)
            x, cin = g.op("Add", [y, short]), width
    x = g.op("Flatten", [g.bn(x, cin)], axis=1)
    fc = g.const(g.rng.normal(0, np.sqrt(1.0 / (cin * 49)), (dim, cin * 49)), "fc")
    x = g.op("Gemm", [x, fc, g.const(np.zeros(dim), "fcb")], transB=1)
    x = g.bn(x, dim)
    g.nodes[-1].output[0] = "683"  # glintr100 names its output like this; nothing depends on it
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    out = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", dim])
    return g.save(Path(path), [inp], [out])


# The SCRFD stand-in "detects" bright dots: each stride-8 cell whose brightest pixel is
# white scores ~1; the box is 64x64 around the cell's anchor and the landmarks sit at
# these pixel offsets from it. Strides 16/32 never fire. So a white dot at (x, y) is a
# face box (x-32, y-32, x+32, y+32) with known landmarks, up to one cell (8 px).
SCRFD_HALF_BOX = 32.0
SCRFD_LANDMARK_OFFSETS = np.array([[-12, -8], [12, -8], [0, 4], [-9, 16], [9, 16]], dtype=np.float32)


def build_scrfd_onnx(path: Path, batched: bool = False) -> Path:
    """SCRFD-10g-like detector: input [1,3,?,?], 9 outputs (scores/boxes/kps per stride)."""
    g = _Graph(0)
    peak = g.op("ReduceMax", ["input.1"], axes=[1], keepdims=1)
    scores, boxes, kps = [], [], []
    for stride in (8, 16, 32):
        m = g.op("MaxPool", [peak], kernel_shape=[stride, stride], strides=[stride, stride], ceil_mode=1)
        if stride == 8:
            logit = g.op("Mul", [g.op("Sub", [m, g.const(0.5)]), g.const(20.0)])
        else:
            logit = g.op("Sub", [g.op("Mul", [m, g.const(0.0)]), g.const(10.0)])
        s = g.op("Reshape", [g.op("Transpose", [g.op("Sigmoid", [logit])], perm=[0, 2, 3, 1]),
                             g.const_int([-1, 1])])
        s = g.op("Reshape", [g.op("Concat", [s, s], axis=1), g.const_int([-1, 1])])  # 2 anchors per cell
        zero = g.op("Mul", [s, g.const(0.0)])
        d = g.op("Add", [zero, g.const(np.full((1, 4), SCRFD_HALF_BOX / stride))])
        k = g.op("Add", [zero, g.const((SCRFD_LANDMARK_OFFSETS / stride).reshape(1, 10))])
        if batched:
            s, d, k = (g.op("Unsqueeze", [t, g.const_int([0])]) for t in (s, d, k))
        scores.append(s), boxes.append(d), kps.append(k)
    outs = scores + boxes + kps
    for i, name in enumerate(outs):  # stable output names, like the real export's
        g.nodes.append(helper.make_node("Identity", [name], [f"out{i}"]))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])
    lead = [1] if batched else []
    outputs = [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, lead + ["?", w])
               for i, w in enumerate([1] * 3 + [4] * 3 + [10] * 3)]
    return g.save(Path(path), [inp], outputs)


def build_bisenet_state(path: Path, label: int, seed: int = 0) -> Path:
    """A facexlib BiSeNet state dict that labels every pixel `label` (saved with torch.save).

    Random weights everywhere except the main head: its 3x3 conv is zeroed and its BN bias
    set to 1, so the head's features are a constant 1 after ReLU, and the 1x1 classifier
    reads that constant only for `label`. Parsing must then mark exactly its crop region.
    """
    import torch
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(seed)
    net = BiSeNet(num_class=19).eval()
    head = net.conv_out
    with torch.no_grad():
        head.conv.conv.weight.zero_()
        head.conv.bn.weight.fill_(1.0)
        head.conv.bn.bias.fill_(1.0)
        head.conv.bn.running_mean.zero_()
        head.conv.bn.running_var.fill_(1.0)
        head.conv_out.weight.zero_()
        head.conv_out.weight[label, 0] = 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
