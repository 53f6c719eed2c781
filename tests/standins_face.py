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

    def op(self, op_type: str, inputs: list[str], node_name: str | None = None, **attrs) -> str:
        out = self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name or out, **attrs))
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
                       seed: int = 0, identity_initializer: bool = True, mxnet: bool = False) -> Path:
    """An IResNet-shaped recognizer: [N,3,112,112] -> [N,dim], like glintr100 / w600k_r50.

    widths=(64,128,256,512), blocks=(3,13,30,3) gives an R100-sized network (~24 GFLOPs)
    for timing. identity_initializer feeds the stem weight through an Identity node, as
    some exporters do (onnx2torch needs those folded first).

    mxnet=True gives the layout of the older MXNet conversions (arcface_r100_v1 and kin):
    input "data" with a fixed batch of 1, and the normalization inside the graph as its first
    nodes, "_minus0" (x - 127.5) and "_mulscalar0" (x / 128), so insightface feeds raw pixels.
    """
    g = _Graph(seed)
    w0 = widths[0]
    stem_w = g.const(g.rng.normal(0, np.sqrt(2.0 / 27), (w0, 3, 3, 3)), "stem_w")
    source = "input.1"
    if mxnet:
        source = g.op("Sub", ["data", g.const(np.full((1, 3, 1, 1), 127.5))], node_name="_minus0")
        source = g.op("Mul", [source, g.const(np.full((1, 3, 1, 1), 0.0078125))], node_name="_mulscalar0")
    if identity_initializer:
        stem_w = g.op("Identity", [stem_w])
    x = g.op("Conv", [source, stem_w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
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
    out_name = "fc1" if mxnet else "683"  # the real files' output names; nothing depends on them
    g.nodes[-1].output[0] = out_name
    inp = helper.make_tensor_value_info("data" if mxnet else "input.1", TensorProto.FLOAT,
                                        [1 if mxnet else "None", 3, 112, 112])
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [1 if mxnet else "None", dim])
    return g.save(Path(path), [inp], [out])


# The SCRFD stand-in "detects" white dots: each stride-8 cell holding a pure white pixel
# (all three channels at least ~250) scores ~1, any other ~0; the box is 64x64 around the
# cell's anchor and the landmarks sit at these pixel offsets from it. Strides 16/32 never
# fire. So a white dot at (x, y) is a face box (x-32, y-32, x+32, y+32) with known
# landmarks, up to one cell (8 px). Photos dimmed a little hold no such pixel: white dots
# painted on them are their only "faces".
SCRFD_HALF_BOX = 32.0
SCRFD_LANDMARK_OFFSETS = np.array([[-12, -8], [12, -8], [0, 4], [-9, 16], [9, 16]], dtype=np.float32)


# The output layouts of the real SCRFD exports with landmarks. All have 9 outputs in the
# same order: scores, then box distances, then landmark offsets, each for strides 8, 16, 32
# (insightface reads them by position). They differ in the batch axis, in whether the row
# counts are fixed, and in the input size:
SCRFD_LAYOUTS = {
    # buffalo_l's det_10g.onnx (and buffalo_m's det_2.5g.onnx): insightface's original export,
    # dynamic input but 2-D outputs with row counts fixed for a 640x640 input.
    "det_10g": dict(batched=False, rows_for=640, input_size=None,
                    names=("448", "471", "494", "451", "474", "497", "454", "477", "500")),
    # antelopev2's scrfd_10g_bnkps.onnx: a leading batch axis, dynamic rows.
    "scrfd_10g_bnkps": dict(batched=True, rows_for=None, input_size=None,
                            names=tuple(f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32))),
    # The SCRFD model zoo's fixed-shape export, e.g. scrfd_2.5g_bnkps_shape640x640.onnx.
    "scrfd_2.5g_shape640": dict(batched=False, rows_for=640, input_size=640,
                                names=tuple(f"out{i}" for i in range(9))),
}


def build_scrfd_onnx(path: Path, batched: bool = False, layout: str | None = None) -> Path:
    """SCRFD-like detector of the dots below, with 9 outputs (scores/boxes/kps per stride) in
    one of SCRFD_LAYOUTS; without `layout`, det_10g's (batched=True: scrfd_10g_bnkps's)."""
    spec = SCRFD_LAYOUTS[layout or ("scrfd_10g_bnkps" if batched else "det_10g")]
    batched = spec["batched"]
    g = _Graph(0)
    peak = g.op("ReduceMin", ["input.1"], axes=[1], keepdims=1)  # the darkest channel: white only
    scores, boxes, kps = [], [], []
    for stride in (8, 16, 32):
        m = g.op("MaxPool", [peak], kernel_shape=[stride, stride], strides=[stride, stride], ceil_mode=1)
        if stride == 8:
            logit = g.op("Mul", [g.op("Sub", [m, g.const(0.95)]), g.const(200.0)])
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
    for name, out in zip(outs, spec["names"]):  # stable output names, like the real export's
        g.nodes.append(helper.make_node("Identity", [name], [out]))
    side = spec["input_size"]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, side or "?", side or "?"])
    lead = [1] if batched else []
    rows = [(spec["rows_for"] // s) ** 2 * 2 if spec["rows_for"] else "?" for s in (8, 16, 32)]
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, lead + [rows[i % 3], w])
               for i, (out, w) in enumerate(zip(spec["names"], [1] * 3 + [4] * 3 + [10] * 3))]
    return g.save(Path(path), [inp], outputs)


def build_genderage_onnx(path: Path) -> Path:
    """A genderage.onnx stand-in in the real file's format: input "data" [1,3,96,96] of raw
    pixels, normalized inside the graph by a first BatchNormalization named "bn_data" (the
    MXNet conversion insightface recognizes), output "fc1" [1,3] = (female, male, age / 100).

    Behaviour: male when the crop is redder than it is blue, female otherwise; the age grows
    with the mean green, between 20 and 50."""
    g = _Graph(0)
    x = g.op("BatchNormalization", ["data", g.const(np.full(3, 1 / 128)), g.const(np.zeros(3)),
                                    g.const(np.full(3, 127.5)), g.const(np.full(3, 1.0 - 1e-5))],
             node_name="bn_data", epsilon=1e-5)
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)  # mean R, G, B in -1..1
    weights = np.array([[-4.0, 0.0, 4.0], [4.0, 0.0, -4.0], [0.0, 0.15, 0.0]])
    x = g.op("Gemm", [x, g.const(weights), g.const([0.0, 0.0, 0.35])], transB=1)
    g.nodes[-1].output[0] = "fc1"
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 96, 96])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3])
    return g.save(Path(path), [inp], [out])


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
