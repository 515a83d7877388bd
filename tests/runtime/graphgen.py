"""Hypothesis strategies that build small, valid ONNX ANNs with the shapes real networks have.

``cases()`` draws a :class:`Case`: an ANN (``onnx.ModelProto``), calibration inputs and test
inputs. A graph is an input stage, a random sequence of building blocks, and one or more
heads:

* inputs: a float image ``[N, C, H, W]``, a float vector ``[N, F]``, int64 token ids
  ``[N, L]`` (Gather from an embedding table), or an image / vector with a second integer
  input that is Cast to float and added;
* spatial blocks: Conv (1x1 / 3x3, stride 1 / 2, bias or not, depthwise, BatchNorm after)
  with an activation; squeeze-excitation gates (GlobalAveragePool -> Conv -> act -> Conv ->
  Sigmoid / HardSigmoid, multiplied into the trunk); residual Add; Concat along channels;
  Split into two along channels, both used; Resize (nearest / linear, by constant scales
  or by sizes computed from the input's shape); MaxPool / AveragePool / GlobalAveragePool /
  GlobalMaxPool, and Conv -> MaxPool -> activation (a max pool on a time-varying signal:
  cumulative pooling in the SNN); LayerNorm over channels written out; BatchNormalization;
  a lone activation;
* flat blocks: Gemm / MatMul(+Add) with an activation; gates; residual Add; Concat;
  Split; LayerNorm (written out, or the op at opset 17); Softmax (written out, or the op);
* activations: Relu, Clip(0, 6), LeakyRelu, PRelu, Sigmoid, HardSigmoid, HardSwish, Tanh,
  Elu, and the decomposed forms exporters write (SiLU = x*Sigmoid(x); HardSwish =
  x*Clip(x+3, 0, 6)/6 and x*HardSigmoid(x); GELU by Erf and by the tanh polynomial);
* heads: Flatten / GlobalAveragePool -> Gemm, a 1x1 Conv (dense output), Softmax or
  Sigmoid on the logits; optionally a second head or an intermediate tensor as an extra
  graph output.

A *profile* steers the activations: ``mixed`` (any, ReLU most often), ``relu`` (Relu /
ReLU6 only, at least one block), ``no_neuron`` (no ReLU-like activation anywhere: nothing
for the compiler to make a neuron of), ``almost_analog`` (the input goes through a Sigmoid
first, every block uses a non-ReLU activation, one Relu layer just before the head).

Sizes are tiny (spatial 4-8, up to 16 after a Resize; channels 1-6, a few more after a
Concat; dense layers <= 32 features, a Flatten up to 512) and
every graph input and output has the symbolic batch ``N``. Weights come from a seed drawn by
hypothesis (He-like scale). Every model passes ``onnx.checker.check_model(full_check=True)``
(checked in :func:`build_case`) and runs in onnxruntime (tests/runtime/test_forms.py checks it).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

#: activations, simplest first (hypothesis shrinks towards the start of a list); an entry
#: listed twice is drawn twice as often (sampled_from is uniform over the list)
NEURON_ACTS = ["relu", "relu6"]
OTHER_ACTS = ["sigmoid", "tanh", "linear", "leaky_relu", "prelu", "hard_sigmoid", "hard_swish", "elu", "silu",
              "hard_swish_hsig", "gelu_erf", "gelu_tanh"]
#: x*Clip(x+3, 0, 6)/6 holds a Clip(0, 6): a ReLU6 the compiler may turn into a neuron
MIXED_ONLY_ACTS = ["hard_swish_clip"]
ALL_ACTS = ["relu", "sigmoid", "relu6", "relu", *OTHER_ACTS[1:], *MIXED_ONLY_ACTS, "relu"]
PROFILES = ["mixed", "relu", "no_neuron", "almost_analog", "relu"]
INPUT_KINDS = ["image", "vector", "tokens", "image_int", "vector_int", "image"]
SPATIAL_BLOCKS = ["conv", "se_gate", "residual", "concat", "split", "pool", "resize", "norm", "act", "conv", "pool"]
FLAT_BLOCKS = ["gemm", "gate", "residual", "concat", "split", "norm", "softmax", "act"]
OPSETS = [13, 17, 11]

CALIB_SAMPLES = 32
TEST_SAMPLES = 17  # the largest batch the tests run; smaller batches are slices of it


@dataclass
class Tensor:
    """A tensor of the graph being built: its name and its shape without the batch."""

    name: str
    shape: tuple[int, ...]


class Case:
    """A drawn ANN with its calibration and test inputs; ``recipe`` says how it was built."""

    def __init__(self, model: onnx.ModelProto, calib: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
                 recipe: list[str] | None = None) -> None:
        self.model, self.calib, self.inputs, self.recipe = model, calib, inputs, list(recipe or [])

    def __repr__(self) -> str:  # hypothesis prints the drawn value: keep it readable
        return f"Case({self.sha}: {' | '.join(self.recipe)})"

    @property
    def sha(self) -> str:
        """Short sha256 of the model bytes (names regression files)."""
        return hashlib.sha256(self.model.SerializeToString(deterministic=True)).hexdigest()[:12]


class Builder:
    """Appends nodes and initializers with unique names; knows the opset's op signatures."""

    def __init__(self, opset: int, seed: int) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.n = 0
        self.recipe: list[str] = []

    # -- plumbing ------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, value: np.ndarray | float | list, dtype=np.float32, base: str = "c") -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.fresh(f"{op_type.lower()}_out") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], **attrs) -> str:
        return self.op(op_type, inputs, **attrs)[0]

    def he(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return self.rng.normal(0.0, math.sqrt(2.0 / max(fan_in, 1)), shape)

    def bias(self, n: int) -> np.ndarray:
        return self.rng.normal(0.0, 0.1, n)

    def add_input(self, name: str, elem: int, shape: tuple[int, ...]) -> Tensor:
        self.inputs.append(helper.make_tensor_value_info(name, elem, ["N", *shape]))
        return Tensor(name, shape)

    def add_output(self, t: Tensor) -> None:
        if t.name not in {o.name for o in self.outputs}:
            self.outputs.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, ["N", *t.shape]))

    # -- opset-dependent ops ---------------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        """ReduceMean / ReduceMax / ReduceSum over ``axes`` (axes an input from opset 13 for
        ReduceSum, from 18 for the others)."""
        if op_type == "ReduceSum" and self.opset >= 13:
            return self.op1(op_type, [x, self.const(axes, np.int64, "axes")], keepdims=keepdims)
        return self.op1(op_type, [x], axes=axes, keepdims=keepdims)

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        if self.opset >= 13:
            return self.op("Split", [x, self.const(sizes, np.int64, "split")], n_out=len(sizes), axis=axis)
        return self.op("Split", [x], n_out=len(sizes), axis=axis, split=sizes)

    def clip(self, x: str, lo: float, hi: float) -> str:
        return self.op1("Clip", [x, self.const(lo, base="min"), self.const(hi, base="max")])

    def resize(self, x: Tensor, mode: str, by: str) -> Tensor:
        c, h, w = x.shape
        roi = "" if self.opset >= 13 else self.const(np.zeros(0, np.float32), base="roi")
        attrs = {"mode": mode}
        if mode == "nearest":
            attrs["nearest_mode"] = "floor"
            attrs["coordinate_transformation_mode"] = "asymmetric"
        else:
            attrs["coordinate_transformation_mode"] = "half_pixel"
        if by == "scales":
            out = self.op1("Resize", [x.name, roi, self.const([1, 1, 2, 2], base="scales")], **attrs)
        else:
            empty = "" if self.opset >= 13 else self.const(np.zeros(0, np.float32), base="scales")
            # sizes from the input's own shape (the batch is symbolic), as exporters write it
            lead = self.op1("Slice", [self.op1("Shape", [x.name]), self.const([0], np.int64, "start"),
                                      self.const([2], np.int64, "end")])
            sizes = self.op1("Concat", [lead, self.const([2 * h, 2 * w], np.int64, "hw")], axis=0)
            out = self.op1("Resize", [x.name, roi, empty, sizes], **attrs)
        return Tensor(out, (c, 2 * h, 2 * w))

    # -- activations -------------------------------------------------------------------------
    def act(self, x: Tensor, kind: str) -> Tensor:
        """``kind`` applied to ``x`` (single ops, or the decomposed forms exporters write)."""
        n = x.name
        if kind == "linear":
            return x
        if kind == "relu":
            y = self.op1("Relu", [n])
        elif kind == "relu6":
            y = self.clip(n, 0.0, 6.0)
        elif kind == "leaky_relu":
            y = self.op1("LeakyRelu", [n], alpha=0.1)
        elif kind == "prelu":
            ch = x.shape[0] if len(x.shape) == 3 else x.shape[-1]
            slope_shape = (ch, 1, 1) if len(x.shape) == 3 else (ch,)
            y = self.op1("PRelu", [n, self.const(self.rng.uniform(0.05, 0.3, slope_shape), base="slope")])
        elif kind == "sigmoid":
            y = self.op1("Sigmoid", [n])
        elif kind == "hard_sigmoid":
            y = self.op1("HardSigmoid", [n], alpha=1.0 / 6.0, beta=0.5)
        elif kind == "hard_swish":
            if self.opset >= 14:
                y = self.op1("HardSwish", [n])
            else:  # not in this opset: the form exporters write instead
                return self.act(x, "hard_swish_hsig")
        elif kind == "tanh":
            y = self.op1("Tanh", [n])
        elif kind == "elu":
            y = self.op1("Elu", [n], alpha=1.0)
        elif kind == "silu":
            y = self.op1("Mul", [n, self.op1("Sigmoid", [n])])
        elif kind == "hard_swish_clip":  # x * Clip(x + 3, 0, 6) / 6
            shifted = self.op1("Add", [n, self.const(3.0, base="three")])
            y = self.op1("Div", [self.op1("Mul", [n, self.clip(shifted, 0.0, 6.0)]), self.const(6.0, base="six")])
        elif kind == "hard_swish_hsig":  # x * HardSigmoid(x)
            y = self.op1("Mul", [n, self.op1("HardSigmoid", [n], alpha=1.0 / 6.0, beta=0.5)])
        elif kind == "gelu_erf":  # 0.5 * x * (1 + Erf(x / sqrt(2))), as torch exports it
            e = self.op1("Erf", [self.op1("Div", [n, self.const(math.sqrt(2.0), base="sqrt2")])])
            y = self.op1("Mul", [self.op1("Mul", [n, self.op1("Add", [e, self.const(1.0, base="one")])]),
                                 self.const(0.5, base="half")])
        elif kind == "gelu_tanh":  # 0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
            cube = self.op1("Pow", [n, self.const(3.0, base="three")])
            inner = self.op1("Add", [n, self.op1("Mul", [cube, self.const(0.044715, base="k")])])
            t = self.op1("Tanh", [self.op1("Mul", [inner, self.const(math.sqrt(2.0 / math.pi), base="s2pi")])])
            y = self.op1("Mul", [self.op1("Mul", [n, self.const(0.5, base="half")]),
                                 self.op1("Add", [t, self.const(1.0, base="one")])])
        else:
            raise ValueError(kind)
        return Tensor(y, x.shape)

    # -- layers ------------------------------------------------------------------------------
    def conv(self, x: Tensor, out_ch: int, k: int = 1, stride: int = 1, bias: bool = True, depthwise: bool = False,
             bn: bool = False) -> Tensor:
        c, h, w = x.shape
        group = c if depthwise else 1
        if depthwise:
            out_ch = c
        p = k // 2
        wt = self.const(self.he((out_ch, c // group, k, k), (c // group) * k * k), base="W")
        ins = [x.name, wt] + ([self.const(self.bias(out_ch), base="B")] if bias else [])
        y = self.op1("Conv", ins, kernel_shape=[k, k], pads=[p, p, p, p], strides=[stride, stride], group=group)
        shape = (out_ch, (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1)
        if bn:
            y = self.batchnorm(Tensor(y, shape)).name
        return Tensor(y, shape)

    def batchnorm(self, x: Tensor) -> Tensor:
        c = x.shape[0]
        scale, b = self.const(self.rng.uniform(0.5, 1.5, c), base="bn_g"), self.const(self.bias(c), base="bn_b")
        mean, var = self.const(self.rng.normal(0, 0.1, c), base="bn_m"), self.const(self.rng.uniform(0.5, 1.5, c), base="bn_v")
        return Tensor(self.op1("BatchNormalization", [x.name, scale, b, mean, var]), x.shape)

    def dense(self, x: Tensor, out: int, form: str = "gemm_transB") -> Tensor:
        """A fully connected layer on the last axis (2-D input for the Gemm forms)."""
        f = x.shape[-1]
        if form == "gemm_transB":
            y = self.op1("Gemm", [x.name, self.const(self.he((out, f), f), base="W"), self.const(self.bias(out), base="B")],
                         transB=1)
        elif form == "gemm":
            y = self.op1("Gemm", [x.name, self.const(self.he((f, out), f), base="W"), self.const(self.bias(out), base="B")])
        elif form == "matmul_add":
            y = self.op1("Add", [self.op1("MatMul", [x.name, self.const(self.he((f, out), f), base="W")]),
                                 self.const(self.bias(out), base="B")])
        else:  # matmul without bias
            y = self.op1("MatMul", [x.name, self.const(self.he((f, out), f), base="W")])
        return Tensor(y, (*x.shape[:-1], out))

    def layernorm(self, x: Tensor, axis: int) -> Tensor:
        """LayerNorm over ``axis`` written out the way exporters write it."""
        ax = axis % len(x.shape) + 1  # with the batch
        n = x.name
        d = self.op1("Sub", [n, self.reduce("ReduceMean", n, [ax])])
        var = self.reduce("ReduceMean", self.op1("Pow", [d, self.const(2.0, base="two")]), [ax])
        sd = self.op1("Sqrt", [self.op1("Add", [var, self.const(1e-5, base="eps")])])
        normed = self.op1("Div", [d, sd])
        size = x.shape[ax - 1]
        pshape = [1] * len(x.shape)
        pshape[ax - 1] = size
        gamma = self.const(self.rng.uniform(0.5, 1.5, pshape), base="ln_g")
        beta = self.const(self.rng.normal(0, 0.1, pshape), base="ln_b")
        return Tensor(self.op1("Add", [self.op1("Mul", [normed, gamma]), beta]), x.shape)

    def softmax(self, x: Tensor, decomposed: bool) -> Tensor:
        if not decomposed:
            return Tensor(self.op1("Softmax", [x.name], axis=-1), x.shape)
        ax = len(x.shape)
        d = self.op1("Sub", [x.name, self.reduce("ReduceMax", x.name, [ax])])
        e = self.op1("Exp", [d])
        return Tensor(self.op1("Div", [e, self.reduce("ReduceSum", e, [ax])]), x.shape)


# -- strategies ------------------------------------------------------------------------------
@st.composite
def cases(draw: st.DrawFn, profiles: list[str] | None = None, input_kinds: list[str] | None = None,
          max_blocks: int = 4) -> Case:
    """A Case: a valid ANN with calibration and test inputs (see the module docstring)."""
    profile = draw(st.sampled_from(profiles or PROFILES))
    kind = draw(st.sampled_from(input_kinds or INPUT_KINDS))
    opset = draw(st.sampled_from(OPSETS))
    seed = draw(st.integers(0, 2**32 - 1))
    b = Builder(opset, seed)
    b.recipe.append(f"{profile} opset{opset} seed{seed}")
    acts = {"mixed": ALL_ACTS, "relu": NEURON_ACTS, "no_neuron": OTHER_ACTS, "almost_analog": OTHER_ACTS}[profile]

    # the relu profile always has a block (else it has no activation at all: no_neuron's job)
    min_blocks = 1 if profile == "relu" else 0

    def act_kind() -> str:
        return draw(st.sampled_from(acts))

    data_rng = np.random.default_rng(seed ^ 0x5EED)
    feeds: list[tuple[str, str, tuple[int, ...], int]] = []  # (name, distribution, sample shape, bound)

    # -- input stage
    if kind in ("image", "image_int"):
        c, h, w = draw(st.integers(1, 3)), draw(st.integers(4, 8)), draw(st.integers(4, 8))
        x = b.add_input("image", TensorProto.FLOAT, (c, h, w))
        feeds.append(("image", "uniform", (c, h, w), 0))
        b.recipe.append(f"image {c}x{h}x{w}")
    elif kind in ("vector", "vector_int"):
        f = draw(st.integers(2, 32))
        x = b.add_input("features", TensorProto.FLOAT, (f,))
        feeds.append(("features", "normal", (f,), 0))
        b.recipe.append(f"vector {f}")
    else:
        length, vocab, dim = draw(st.integers(2, 6)), draw(st.integers(3, 20)), draw(st.integers(2, 8))
        ids = b.add_input("tokens", TensorProto.INT64, (length,))
        feeds.append(("tokens", "int", (length,), vocab))
        table = b.const(b.rng.normal(0, 1, (vocab, dim)), base="embedding")
        x = Tensor(b.op1("Gather", [table, ids.name], axis=0), (length, dim))
        b.recipe.append(f"tokens {length} vocab {vocab} dim {dim}")
    if kind.endswith("_int"):
        elem, np_dt = draw(st.sampled_from([(TensorProto.INT64, "int64"), (TensorProto.INT32, "int32")]))
        shape = (1, *x.shape[1:]) if len(x.shape) == 3 else x.shape
        aux = b.add_input("extra", elem, shape)
        feeds.append(("extra", np_dt, shape, 4))
        scaled = b.op1("Mul", [b.op1("Cast", [aux.name], to=TensorProto.FLOAT), b.const(0.25, base="quarter")])
        x = Tensor(b.op1("Add", [x.name, scaled]), x.shape)
        b.recipe.append(f"+ int input {np_dt}{list(shape)} cast and added")
    if profile == "almost_analog":
        x = b.act(x, "sigmoid")
        b.recipe.append("sigmoid first")
    exposed: list[Tensor] = []  # candidates for an extra graph output

    # -- token sequences: a per-token dense layer, then to a vector
    if kind == "tokens":
        a = act_kind()
        x = b.act(b.dense(x, draw(st.integers(2, 8)), draw(st.sampled_from(["matmul_add", "matmul"]))), a)
        ln = draw(st.booleans())
        if ln:
            x = b.layernorm(x, -1)
        pooled = draw(st.booleans())
        x = (Tensor(b.reduce("ReduceMean", x.name, [1], keepdims=0), x.shape[1:]) if pooled
             else Tensor(b.op1("Flatten", [x.name], axis=1), (x.shape[0] * x.shape[1],)))
        b.recipe.append(f"per-token dense {a}{' layernorm' if ln else ''} -> {'mean' if pooled else 'flatten'}")

    # -- spatial blocks
    dense_head = False
    if len(x.shape) == 3:
        for _ in range(draw(st.integers(min_blocks, max_blocks))):
            x = spatial_block(draw, b, x, act_kind)
            exposed.append(x)
        dense_head = draw(st.booleans())
        if not dense_head:
            if draw(st.booleans()) or x.shape[0] * x.shape[1] * x.shape[2] > 512:
                x = Tensor(b.op1("GlobalAveragePool", [x.name]), (x.shape[0], 1, 1))
                b.recipe.append("gap")
            x = Tensor(b.op1("Flatten", [x.name], axis=1), (x.shape[0] * x.shape[1] * x.shape[2],))
            b.recipe.append("flatten")
    # -- flat blocks
    if not dense_head:
        for _ in range(draw(st.integers(min_blocks if len(x.shape) == 1 and not exposed else 0, max(max_blocks - 1, 1)))):
            x = flat_block(draw, b, x, act_kind)
            exposed.append(x)

    # -- heads
    if profile == "almost_analog":  # the one ReLU layer, near the end
        x = b.act(b.conv(x, draw(st.integers(1, 6))) if dense_head else b.dense(x, draw(st.integers(2, 16))), "relu")
        b.recipe.append("conv1x1 relu" if dense_head else "gemm relu")
    classes = draw(st.integers(2, 10))
    if dense_head:
        y = b.conv(x, classes)
        b.recipe.append(f"head conv1x1 -> {classes}")
    else:
        y = b.dense(x, classes, draw(st.sampled_from(["gemm_transB", "gemm", "matmul_add"])))
        post = draw(st.sampled_from(["logits", "softmax", "softmax_decomposed", "sigmoid"]))
        if post == "sigmoid":
            y = b.act(y, "sigmoid")
        elif post != "logits":
            y = b.softmax(y, post == "softmax_decomposed")
        b.recipe.append(f"head gemm -> {classes} {post}")
    b.add_output(y)
    extra = draw(st.sampled_from(["none", "second_head", "intermediate"]))
    if extra == "second_head":
        src = x if not exposed or draw(st.booleans()) else draw(st.sampled_from(exposed))
        second = b.conv(src, draw(st.integers(1, 4))) if len(src.shape) == 3 else b.dense(src, draw(st.integers(1, 6)))
        b.add_output(second)
        b.recipe.append(f"second head {list(second.shape)}")
    inputs = {i.name for i in b.inputs}
    exposed = [t for t in exposed if t.name not in inputs]
    if extra == "intermediate" and exposed:
        t = draw(st.sampled_from(exposed))
        b.add_output(t)
        b.recipe.append(f"intermediate output {list(t.shape)}")

    def data(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = {}
        for name, dist, shape, bound in feeds:
            if dist == "uniform":
                out[name] = rng.uniform(0, 1, (n, *shape)).astype(np.float32)
            elif dist == "normal":
                out[name] = rng.normal(0, 1, (n, *shape)).astype(np.float32)
            else:
                out[name] = rng.integers(0, bound, (n, *shape)).astype(np.int64 if dist == "int" else dist)
        return out

    return build_case(b, data(CALIB_SAMPLES, data_rng), data(TEST_SAMPLES, data_rng))


def spatial_block(draw: st.DrawFn, b: Builder, x: Tensor, act_kind) -> Tensor:
    """One spatial block on ``x`` ([C, H, W]); returns the new trunk."""
    kind = draw(st.sampled_from(SPATIAL_BLOCKS))
    c, h, w = x.shape
    if kind == "conv":
        k = draw(st.sampled_from([3, 1]))
        stride = 2 if min(h, w) >= 6 and draw(st.booleans()) else 1
        depthwise = c > 1 and draw(st.booleans())
        bias, bn = draw(st.booleans()), draw(st.booleans())
        a = act_kind()
        y = b.act(b.conv(x, draw(st.integers(1, 6)), k, stride, bias, depthwise, bn), a)
        b.recipe.append(f"conv{k}x{k}/s{stride}{' dw' if depthwise else ''}{' bn' if bn else ''} -> {y.shape[0]} {a}")
        return y
    if kind == "se_gate":
        inner, gate = act_kind(), draw(st.sampled_from(["sigmoid", "hard_sigmoid"]))
        g = Tensor(b.op1("GlobalAveragePool", [x.name]), (c, 1, 1))
        g = b.act(b.conv(b.act(b.conv(g, max(1, c // 2)), inner), c), gate)
        trunk_first = draw(st.booleans())
        y = b.op1("Mul", [x.name, g.name] if trunk_first else [g.name, x.name])
        b.recipe.append(f"se gate ({inner}, {gate})")
        return Tensor(y, x.shape)
    if kind == "residual":
        a1, a2 = act_kind(), act_kind()
        branch = b.conv(b.act(b.conv(x, c, 3), a1), c, 3)
        y = b.act(Tensor(b.op1("Add", [x.name, branch.name]), x.shape), a2)
        b.recipe.append(f"residual ({a1}) add {a2}")
        return y
    if kind == "concat":
        a = act_kind()
        left = b.act(b.conv(x, draw(st.integers(1, max(1, 6 - c)))), a)
        right = x if draw(st.booleans()) else b.act(b.conv(x, draw(st.integers(1, 3)), 3), act_kind())
        y = b.op1("Concat", [left.name, right.name], axis=1)
        b.recipe.append(f"concat ({a}) {left.shape[0]}+{right.shape[0]}")
        return Tensor(y, (left.shape[0] + right.shape[0], h, w))
    if kind == "split":
        if c < 2:
            x = b.conv(x, draw(st.integers(2, 6)))
            c = x.shape[0]
        first = draw(st.integers(1, c - 1))
        p, q = b.split(x.name, [first, c - first], axis=1)
        a1, a2 = act_kind(), act_kind()
        left = b.act(Tensor(p, (first, h, w)), a1)
        right = b.act(b.conv(Tensor(q, (c - first, h, w)), c - first), a2)
        if first == c - first and draw(st.booleans()):
            b.recipe.append(f"split {first}+{c - first} ({a1}, conv {a2}) add")
            return Tensor(b.op1("Add", [left.name, right.name]), left.shape)
        b.recipe.append(f"split {first}+{c - first} ({a1}, conv {a2}) concat")
        return Tensor(b.op1("Concat", [right.name, left.name], axis=1), x.shape)
    if kind == "pool":
        pool = draw(st.sampled_from(["max2", "avg2", "max3s1", "avg3s1", "gap", "gmp", "conv_max2"]))
        if pool.endswith("2") and min(h, w) < 2:
            pool = "gap"
        b.recipe.append(pool)
        if pool in ("gap", "gmp"):
            return Tensor(b.op1("GlobalAveragePool" if pool == "gap" else "GlobalMaxPool", [x.name]), (c, 1, 1))
        if pool == "conv_max2":  # conv, then max pool before the activation
            y = b.conv(x, draw(st.integers(1, 6)), 3)
            y = Tensor(b.op1("MaxPool", [y.name], kernel_shape=[2, 2], strides=[2, 2]), (y.shape[0], h // 2, w // 2))
            a = act_kind()
            b.recipe[-1] = f"conv3x3 -> {y.shape[0]} maxpool2 {a}"
            return b.act(y, a)
        op_type = "MaxPool" if pool.startswith("max") else "AveragePool"
        if pool.endswith("2"):
            return Tensor(b.op1(op_type, [x.name], kernel_shape=[2, 2], strides=[2, 2]), (c, h // 2, w // 2))
        return Tensor(b.op1(op_type, [x.name], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), x.shape)
    if kind == "resize":
        mode, by = draw(st.sampled_from(["nearest", "linear"])), draw(st.sampled_from(["scales", "sizes"]))
        if 2 * max(h, w) > 16:  # keep it small: halve with a pool instead
            b.recipe.append("avg2 (instead of a resize)")
            return Tensor(b.op1("AveragePool", [x.name], kernel_shape=[2, 2], strides=[2, 2]), (c, h // 2, w // 2))
        b.recipe.append(f"resize x2 {mode} by {by}")
        return b.resize(x, mode, by)
    if kind == "norm":
        norm = draw(st.sampled_from(["layernorm", "batchnorm"]))
        b.recipe.append(f"{norm} (channels)")
        return b.layernorm(x, 0) if norm == "layernorm" else b.batchnorm(x)
    a = act_kind()
    b.recipe.append(f"act {a}")
    return b.act(x, a)


def flat_block(draw: st.DrawFn, b: Builder, x: Tensor, act_kind) -> Tensor:
    """One block on a vector ``x`` ([F]); returns the new trunk."""
    kind = draw(st.sampled_from(FLAT_BLOCKS))
    f = x.shape[0]
    if kind == "gemm":
        form, a = draw(st.sampled_from(["gemm_transB", "gemm", "matmul_add", "matmul"])), act_kind()
        y = b.act(b.dense(x, draw(st.integers(2, 32)), form), a)
        b.recipe.append(f"{form} -> {y.shape[0]} {a}")
        return y
    if kind == "gate":
        gate = draw(st.sampled_from(["sigmoid", "hard_sigmoid"]))
        g = b.act(b.dense(x, f), gate)
        b.recipe.append(f"gate {gate}")
        return Tensor(b.op1("Mul", [x.name, g.name]), x.shape)
    if kind == "residual":
        a1, a2 = act_kind(), act_kind()
        branch = b.dense(b.act(b.dense(x, f), a1), f)
        b.recipe.append(f"residual ({a1}) add {a2}")
        return b.act(Tensor(b.op1("Add", [x.name, branch.name]), x.shape), a2)
    if kind == "concat":
        a = act_kind()
        left = b.act(b.dense(x, draw(st.integers(2, 16))), a)
        right = x if draw(st.booleans()) else b.act(b.dense(x, draw(st.integers(2, 16))), act_kind())
        b.recipe.append(f"concat ({a}) {left.shape[0]}+{right.shape[0]}")
        return Tensor(b.op1("Concat", [left.name, right.name], axis=1), (left.shape[0] + right.shape[0],))
    if kind == "split":
        if f < 2:
            x = b.dense(x, draw(st.integers(2, 16)))
            f = x.shape[0]
        first = draw(st.integers(1, f - 1))
        p, q = b.split(x.name, [first, f - first], axis=1)
        a1, a2 = act_kind(), act_kind()
        left = b.act(Tensor(p, (first,)), a1)
        right = b.act(b.dense(Tensor(q, (f - first,)), f - first), a2)
        b.recipe.append(f"split {first}+{f - first} ({a1}, gemm {a2}) concat")
        return Tensor(b.op1("Concat", [left.name, right.name], axis=1), x.shape)
    if kind == "norm":
        if b.opset >= 17 and draw(st.booleans()):
            gamma = b.const(b.rng.uniform(0.5, 1.5, f), base="ln_g")
            beta = b.const(b.rng.normal(0, 0.1, f), base="ln_b")
            b.recipe.append("LayerNormalization op")
            return Tensor(b.op1("LayerNormalization", [x.name, gamma, beta], axis=-1, epsilon=1e-5), x.shape)
        b.recipe.append("layernorm (written out)")
        return b.layernorm(x, -1)
    if kind == "softmax":
        decomposed = draw(st.booleans())
        b.recipe.append(f"softmax{' (written out)' if decomposed else ''}")
        return b.softmax(x, decomposed)
    a = act_kind()
    b.recipe.append(f"act {a}")
    return b.act(x, a)


def build_case(b: Builder, calib: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> Case:
    """The model of a finished builder, checked with full_check."""
    ir = 8 if b.opset >= 15 else 7
    graph = helper.make_graph(b.nodes, "generated", b.inputs, b.outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)], ir_version=ir,
                              producer_name="tests/graphgen.py")
    onnx.checker.check_model(model, full_check=True)
    return Case(model, calib, inputs, list(b.recipe))

