"""Every op the spiking part accepts: a small network using it converts, and the SNN's output
approaches the ANN's as T grows (error at T=256 well below the error at T=16)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import ann2snn
from ann2snn.runtime import SpikingSession
from conftest import build, run_ort

HEAD = "c1 = Conv <pads=[1,1,1,1]> (x, W1)\n r1 = Relu (c1)\n"  # [N,4,6,6] spikes
TAIL_GAP = "g = GlobalAveragePool (q)\n f = Flatten (g)\n y = MatMul (f, Wy)\n"

# name -> (body after the first neuron, ending in tensor q with C_q channels, extra weights {name: shape}, opset)
CASES: dict[str, tuple[str, dict[str, tuple[int, ...]], int]] = {
    "conv_grouped_strided_dilated": (
        "c2 = Conv <group=2, pads=[2,2,2,2], strides=[2,2], dilations=[2,2]> (r1, W2)\n q = Relu (c2)\n",
        {"W2": (4, 2, 3, 3)}, 17),
    "conv_depthwise": ("c2 = Conv <group=4, pads=[1,0,1,0]> (r1, W2)\n q = Relu (c2)\n", {"W2": (4, 1, 3, 3)}, 17),
    "conv_transpose": ("c2 = ConvTranspose <strides=[2,2]> (r1, W2)\n q = Relu (c2)\n", {"W2": (4, 4, 2, 2)}, 17),
    "matmul_gemm": ("f1 = Flatten (r1)\n m = MatMul (f1, M)\n h = Add (m, bm)\n r2 = Relu (h)\n"
                    " h2 = Gemm <transB=1> (r2, G)\n q0 = Relu (h2)\n q = Unsqueeze (q0, ax23)\n",
                    {"M": (144, 8), "bm": (8,), "G": (4, 8)}, 17),
    "const_add_sub_mul_div": ("a = Mul (r1, k1)\n b = Add (a, k2)\n d = Sub (b, k3)\n e = Div (d, k4)\n"
                              " c2 = Conv <pads=[1,1,1,1]> (e, W2)\n q = Relu (c2)\n",
                              {"k1": (1, 4, 1, 1), "k2": (1, 4, 1, 1), "k3": (1,), "k4": (1,), "W2": (4, 4, 3, 3)}, 17),
    "residual_add": ("c2 = Conv <pads=[1,1,1,1]> (r1, W2)\n r2 = Relu (c2)\n c3 = Conv <pads=[1,1,1,1]> (r2, W3)\n"
                     " a = Add (c3, r1)\n q = Relu (a)\n", {"W2": (4, 4, 3, 3), "W3": (4, 4, 3, 3)}, 17),
    "sum_of_branches": ("c2 = Conv <pads=[1,1,1,1]> (r1, W2)\n r2 = Relu (c2)\n c3 = Conv <pads=[1,1,1,1]> (r2, W3)\n"
                        " a = Sum (c3, r1, c2)\n q = Relu (a)\n", {"W2": (4, 4, 3, 3), "W3": (4, 4, 3, 3)}, 17),
    "concat": ("c2 = Conv <pads=[1,1,1,1]> (r1, W2)\n r2 = Relu (c2)\n k = Concat <axis=1> (r1, r2)\n"
               " c3 = Conv (k, W3)\n q = Relu (c3)\n", {"W2": (4, 4, 3, 3), "W3": (4, 8, 1, 1)}, 17),
    "average_pool": ("p = AveragePool <kernel_shape=[2,2], strides=[2,2]> (r1)\n c2 = Conv <pads=[1,1,1,1]> (p, W2)\n"
                     " q = Relu (c2)\n", {"W2": (4, 4, 3, 3)}, 17),
    "global_average_pool": ("c2 = Conv <pads=[1,1,1,1]> (r1, W2)\n q = Relu (c2)\n", {"W2": (4, 4, 3, 3)}, 17),
    "maxpool_pre_neuron": ("c2 = Conv <pads=[1,1,1,1]> (r1, W2)\n r2 = Relu (c2)\n"
                           " q = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r2)\n", {"W2": (4, 4, 3, 3)}, 17),
    "maxpool_on_spikes": ("p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r1)\n c2 = Conv <pads=[1,1,1,1]> (p, W2)\n"
                          " c3 = Conv <pads=[1,1,1,1], strides=[2,2]> (r1, W3)\n a = Add (c2, c3)\n q = Relu (a)\n",
                          {"W2": (4, 4, 3, 3), "W3": (4, 4, 3, 3)}, 17),
    "pad": ("p = Pad (r1, pads)\n c2 = Conv (p, W2)\n q = Relu (c2)\n", {"pads": (8,), "W2": (4, 4, 3, 3)}, 17),
    "resize_nearest": ("u = Resize <mode=\"nearest\"> (r1, , scales)\n c2 = Conv <pads=[1,1,1,1]> (u, W2)\n"
                       " q = Relu (c2)\n", {"scales": (4,), "W2": (4, 4, 3, 3)}, 17),
    "resize_linear": ("u = Resize <mode=\"linear\"> (r1, , scales)\n c2 = Conv <pads=[1,1,1,1]> (u, W2)\n"
                      " q = Relu (c2)\n", {"scales": (4,), "W2": (4, 4, 3, 3)}, 17),
    "upsample_opset9": ("u = Upsample <mode=\"nearest\"> (r1, scales)\n c2 = Conv <pads=[1,1,1,1]> (u, W2)\n"
                        " q = Relu (c2)\n", {"scales": (4,), "W2": (4, 4, 3, 3)}, 9),
    "layout_ops": ("t = Transpose <perm=[0,1,3,2]> (r1)\n u = Unsqueeze (t, ax2)\n s = Squeeze (u, ax2)\n"
                   " i = Identity (s)\n d = Dropout (i)\n fr = Reshape (d, shp)\n m = MatMul (fr, M)\n r2 = Relu (m)\n"
                   " q = Unsqueeze (r2, ax23)\n", {"shp": (2,), "M": (144, 8)}, 17),
    "slice_split": ("s1, s2 = Split <axis=1> (r1, split)\n l = Slice (s1, st, en, axs)\n k = Concat <axis=1> (l, s2)\n"
                    " c2 = Conv <pads=[1,1,1,1]> (k, W2)\n q = Relu (c2)\n",
                    {"split": (2,), "st": (1,), "en": (1,), "axs": (1,), "W2": (4, 3, 3, 3)}, 17),
}

INTS = {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "ax2": [2], "ax23": [2, 3], "shp": [0, -1], "split": [2, 2],
        "st": [0], "en": [1], "axs": [1]}
FLOATS = {"scales": [1.0, 1.0, 2.0, 2.0], "k1": None, "k2": None, "k3": [0.1], "k4": [1.5]}


def make_case(name: str):
    """The case's model (random weights, seeded by its name) and 96 inputs."""
    body, shapes, opset = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    c_q = 8 if name == "layout_ops" else 4
    weights = {"W1": rng.normal(0, 0.5, (4, 2, 3, 3)), "Wy": rng.normal(0, 0.5, (c_q, 3))}
    decls = ["float[N,2,6,6] x", "float[4,2,3,3] W1", f"float[{c_q},3] Wy"]
    ints = {}
    for w, shape in shapes.items():
        if w in INTS:
            ints[w] = np.array(INTS[w], np.int64)
            decls.append(f"int64[{len(INTS[w])}] {w}")
        else:
            value = FLOATS.get(w)
            weights[w] = np.asarray(value, np.float32).reshape(shape) if value is not None else rng.normal(0.5, 0.3, shape)
            decls.append(f"float[{','.join(map(str, shape))}] {w}")
    for w in ("ax2", "ax23", "shp"):
        if w in body and w not in ints:
            ints[w] = np.array(INTS[w], np.int64)
            decls.append(f"int64[{len(INTS[w])}] {w}")
    text = f"g ({', '.join(decls)}) => (float[N,3] y) {{\n {HEAD} {body} {TAIL_GAP}}}"
    model = build(text, weights, opset=opset, ints=ints)
    return model, rng.uniform(0, 1, (96, 2, 6, 6)).astype(np.float32)


#: cases whose spike values fold entirely into weights: no explicit scaling Mul remains
FULLY_FOLDED = {"conv_grouped_strided_dilated", "conv_depthwise", "conv_transpose", "matmul_gemm", "average_pool",
                "global_average_pool", "pad", "resize_nearest", "resize_linear", "layout_ops", "maxpool_pre_neuron"}


def relative_errors(model, x, Ts, name: str = "", **options) -> list[float]:
    snn = ann2snn.compile(model, {"x": x[:64]}, iters=100, batch=32, **options)
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    assert meta["tail"] is None  # the op under test stays in the spiking part
    n_relu = sum(n.op_type == "Relu" for n in model.graph.node)
    assert sum(n.op_type == "IFNeuron" for n in snn.graph.node) == n_relu
    if name in FULLY_FOLDED:
        assert not [n.name for n in snn.graph.node if n.name.endswith("/scale")], name
    ref = run_ort(model, {"x": x[64:]})[0]
    res = SpikingSession(snn).run_many({"x": x[64:]}, Ts)
    return [float(np.abs(res[T]["y"] - ref).mean() / np.abs(ref).mean()) for T in Ts]


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_converts_and_converges(name: str) -> None:
    model, x = make_case(name)
    e16, e256 = relative_errors(model, x, [16, 256], name, method="max")
    assert e256 < e16 / 2 and e256 < 0.05, (name, e16, e256)


def test_residual_matches_as_closely_as_a_plain_cnn() -> None:
    errs = {n: relative_errors(*make_case(n), [256])[0] for n in ("residual_add", "global_average_pool")}
    assert errs["residual_add"] < 0.05 and errs["global_average_pool"] < 0.05, errs
