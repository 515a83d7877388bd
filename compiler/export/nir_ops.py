"""How each ONNX op of a compiled step graph becomes NIR nodes: one handler per op, and the
table ``HANDLERS`` (op type -> handler). An op missing here is reported as having no NIR
equivalent; a new op that NIR can express gets a handler and an entry."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from .nir_builder import META, NirBuilder, _dense, _ints


def _conv(ex: NirBuilder, node: onnx.NodeProto) -> None:
    x = node.input[0]
    w = ex.const(node.input[1])
    b = ex.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    shape = ex.shape(x, node)
    if shape is None:
        return
    if w is None or (len(node.input) > 2 and node.input[2] and b is None) or x not in ex.src:
        return ex.problem(node, "has a weight or bias that is not constant")
    if w.ndim != 4:
        return ex.problem(node, f"is a {w.ndim - 2}-D convolution; the NIR export handles Conv2d only")
    a = ex.attrs(node)
    k = w.shape[2:]
    stride = _ints(a.get("strides", [1, 1]))
    dilation = _ints(a.get("dilations", [1, 1]))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((-(-n // s) - 1) * s + (kk - 1) * d + 1 - n, 0) for n, s, kk, d in zip(shape[1:], stride, k, dilation)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = list(a.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        return ex.problem(node, f"pads asymmetrically ({pads}); NIR's Conv2d pads both sides alike",
                          "re-export the model with symmetric padding")
    bias = np.zeros(w.shape[0], np.float32) if b is None else np.asarray(b, np.float32).reshape(-1)
    groups = int(a.get("group", 1))
    meta = {"groups": groups, "groups_note": "the grouped weight is written as its dense block-diagonal equivalent "
            "(nir 1.0.8 cannot read grouped Conv2d back)"} if groups > 1 else {}
    ex.emit(node, ex.nir.Conv2d(input_shape=tuple(shape[1:]), weight=_dense(np.asarray(w, np.float32), groups),
                                stride=stride, padding=tuple(int(p) for p in pads[:2]), dilation=dilation,
                                groups=1, bias=bias), [x],
            weights=node.input[1], spike_value="folded into the weights (per input channel)", **meta)


def _gemm(ex: NirBuilder, node: onnx.NodeProto) -> None:
    a = ex.attrs(node)
    w = ex.const(node.input[1])
    c = ex.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if a.get("transA", 0) or w is None or node.input[0] not in ex.src or (len(node.input) > 2 and node.input[2] and c is None):
        return ex.problem(node, "is not x @ W + b with constant W and b")
    w = np.asarray(w, np.float32) * np.float32(a.get("alpha", 1.0))
    weight = np.ascontiguousarray(w if a.get("transB", 0) else w.T)
    if c is None:
        new = ex.nir.Linear(weight)
    else:
        c = np.asarray(c, np.float32)
        c = c.reshape(-1) if c.size > 1 else c.reshape(())
        bias = np.broadcast_to(c, (weight.shape[0],)) * np.float32(a.get("beta", 1.0))
        new = ex.nir.Affine(weight, np.ascontiguousarray(bias, dtype=np.float32))
    ex.emit(node, new, [node.input[0]], weights=node.input[1], spike_value="folded into the weights (per input)")


def _matmul(ex: NirBuilder, node: onnx.NodeProto) -> None:
    w = ex.const(node.input[1])
    shape = ex.shape(node.input[0], node)
    if shape is None:
        return
    if w is None or w.ndim != 2 or len(shape) != 1 or node.input[0] not in ex.src:
        return ex.problem(node, "is not x @ W with a 2-D x and a constant 2-D W")
    ex.emit(node, ex.nir.Linear(np.ascontiguousarray(np.asarray(w, np.float32).T)), [node.input[0]],
            weights=node.input[1], spike_value="folded into the weights (per input)")


def _add_sub(ex: NirBuilder, node: onnx.NodeProto) -> None:
    ins = list(node.input)
    states = [x for x in ins if x in ex.state_in]
    if states and len(ins) == 2:  # the running sum / increment of cumulative max pooling
        other = ins[1 - ins.index(states[0])]
        if node.op_type == "Add" and other in ex.src:
            ex.cumulative[node.output[0]] = node.name
            return ex.passthrough(node, other)
        if node.op_type == "Sub" and ins[0] in ex.src:
            return ex.passthrough(node, ins[0])
        return ex.problem(node, "uses a state in a way the NIR export does not know")
    signals = [x for x in ins if x in ex.src]
    consts = [ex.const(x) for x in ins if x not in ex.src]
    if any(c is None for c in consts):
        return ex.problem(node, "has an input that is neither constant nor computed from the model's inputs")
    if len(signals) == len(ins):  # branches meet: NIR sums every edge that enters a node
        shapes = {ex.shapes.get(x) for x in signals}
        if len(shapes) != 1 or None in shapes:
            return ex.problem(node, f"adds branches of different shapes {sorted(map(str, shapes))}")
        sources = list(ex.src[ins[0]])
        for x in ins[1:]:
            if node.op_type == "Sub":
                shape = ex.shapes[x]
                sources.append(ex.add(f"{node.name}/negate", ex.nir.Scale(np.full(shape, -1, np.float32)), ex.src[x],
                                      onnx_op="Sub", role="negates the subtrahend; NIR sums the edges that meet"))
            else:
                sources += ex.src[x]
        ex.src[node.output[0]] = sources
        if all(x in ex.static for x in ins):
            ex.static.add(node.output[0])
        return
    if len(signals) != 1 or len(ins) != 2 or node.op_type == "Sum":
        return ex.problem(node, "adds constants in a form the NIR export does not handle")
    x, c = signals[0], consts[0]
    sign = -1.0 if node.op_type == "Sub" else 1.0
    if node.op_type == "Sub" and ins[0] != x:  # c - x
        return ex.elementwise(node, x, np.float32(-1), c, role="y = c - x")
    # MatMul + Add(bias): merge into an Affine when nothing else reads the MatMul's output
    prev = ex.src[x][0] if len(ex.src[x]) == 1 else None
    if prev is not None and isinstance(ex.nodes[prev], ex.nir.Linear) and ex.uses[x] == 1:
        shape = ex.shapes.get(node.output[0])
        if shape is not None and len(shape) == 1:
            old = ex.nodes[prev]
            new = ex.nir.Affine(old.weight, ex.per_sample(sign * np.asarray(c, np.float32), shape))
            new.metadata = {**old.metadata, f"{META}bias": ",".join(i for i in ins if i != x),
                            f"{META}bias_node": node.name}
            ex.nodes[prev] = new
            ex.src[node.output[0]] = [prev]
            return
    ex.elementwise(node, x, np.float32(1), sign * np.asarray(c, np.float32), role=f"y = x {'-' if sign < 0 else '+'} c")


def _mul_div(ex: NirBuilder, node: onnx.NodeProto) -> None:
    signals = [x for x in node.input if x in ex.src]
    other = [x for x in node.input if x not in ex.src]
    c = ex.const(other[0]) if len(other) == 1 else None
    if len(signals) != 1 or c is None or (node.op_type == "Div" and node.input[0] != signals[0]):
        return ex.problem(node, "is not a product with a constant")
    c = np.asarray(c, np.float32)
    scale = c if node.op_type == "Mul" else (np.float32(1) / c).astype(np.float32)
    role = ("spike value: spikes (0/1) times the threshold each spike stands for" if node.name.endswith("/scale")
            else f"y = x {'*' if node.op_type == 'Mul' else '/'} c")
    ex.elementwise(node, signals[0], scale, np.float32(0), role=role)


def _flatten(ex: NirBuilder, node: onnx.NodeProto) -> None:
    x = node.input[0]
    shape, out = ex.shape(x, node), ex.shapes.get(node.output[0])
    if shape is None:
        return
    if out == shape:
        return ex.passthrough(node, x)
    if (node.op_type == "Flatten" and ex.attrs(node).get("axis", 1) != 1) or out != (int(np.prod(shape)),):
        return ex.problem(node, f"reshapes {list(shape)} to {list(out or [])}; NIR can only flatten a sample to 1-D")
    ex.emit(node, ex.nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0, end_dim=-1), [x],
            note="start_dim/end_dim count per-sample axes (NIR shapes have no batch axis)")


def _pool_geometry(ex: NirBuilder, node: onnx.NodeProto, shape):
    a = ex.attrs(node)
    if node.op_type == "GlobalAveragePool":
        return tuple(shape[1:]), tuple(shape[1:]), (0, 0), a
    k = _ints(a.get("kernel_shape", [1, 1]))
    pads = list(a.get("pads", [0] * 2 * len(k)))
    auto = a.get("auto_pad", b"NOTSET")
    if len(k) != 2 or pads[:2] != pads[2:] or a.get("ceil_mode", 0) or (auto not in (b"NOTSET", "NOTSET", b"VALID", "VALID")) \
            or any(d != 1 for d in a.get("dilations", [1, 1])):
        return None
    return k, _ints(a.get("strides", [1, 1])), tuple(int(p) for p in pads[:2]), a


def _avgpool(ex: NirBuilder, node: onnx.NodeProto) -> None:
    shape = ex.shape(node.input[0], node)
    if shape is None:
        return
    geo = _pool_geometry(ex, node, shape)
    if len(shape) != 3 or geo is None:
        return ex.problem(node, "is not a 2-D pooling with symmetric padding, floor rounding and no dilation")
    k, s, p, a = geo
    meta = {}
    if any(p) and not a.get("count_include_pad", 0):
        ex.approx(node.name, "ai.onnx::AveragePool", "averages only the unpadded entries at the border "
                  "(count_include_pad = 0)", "AvgPool2d, whose border windows divide by the full kernel size")
        meta["approximation"] = "border windows: ONNX divides by the unpadded count, NIR AvgPool2d by the kernel size"
    ex.emit(node, ex.nir.AvgPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array(p)), [node.input[0]],
            **meta)


def _maxpool(ex: NirBuilder, node: onnx.NodeProto) -> None:
    x = node.input[0]
    shape = ex.shape(x, node)
    if shape is None:
        return
    geo = _pool_geometry(ex, node, shape)
    if len(shape) != 3 or geo is None:
        return ex.problem(node, "is not a 2-D pooling with symmetric padding, floor rounding and no dilation")
    k, s, p, _ = geo
    if x in ex.cumulative:
        mode = ("cumulative: max pooling of the running sum of its input, passing on the increment of the max "
                "(two zero-initialised states, acc and max)")
    elif x in ex.static:
        mode = "on a current constant in time (analog prefix): an exact max pooling"
    else:
        mode = "instant: max pooling of each step's current"
    ex.approx(node.name, "ai.onnx::MaxPool", "is a max pooling, for which NIR has no node",
              "an AvgPool2d placeholder of the same geometry (smaller values; replace it by your platform's "
              "max pooling, as its metadata describes)")
    ex.emit(node, ex.nir.AvgPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array(p)), [x],
            placeholder_for="MaxPool", maxpool_mode=mode, kernel_size=np.array(k), stride=np.array(s),
            padding=np.array(p), approximation="AvgPool2d stands in for MaxPool: NIR has no max pooling")


DOMAIN_OF_IF = "ann2snn"


def _if_neuron(ex: NirBuilder, node: onnx.NodeProto) -> None:
    neuron = ex.neurons.get(node.name)
    theta = ex.const(node.input[2])
    shape = ex.shape(node.input[0], node)
    if neuron is None or theta is None or shape is None:
        return ex.problem(node, "is a neuron without its metadata or constant threshold",
                          "re-compile the model with this version of ann2snn")
    th = ex.per_sample(theta, tuple(neuron["shape"]))
    v0 = float(neuron.get("v0", 0.5))
    dead = int(neuron.get("dead_channels", 0))
    ex.approx(node.name, f"{DOMAIN_OF_IF}::IFNeuron",
              f"resets by subtraction and starts at v(0) = {v0:g}*v_threshold, which NIR's IF (reset to a fixed "
              "v_reset, no initial state, fires at v > v_threshold) cannot express",
              "an IF node with v_reset = 0 (the true reset rule and v(0) in its metadata)")
    key = ex.emit(node, ex.nir.IF(r=np.ones(th.shape, np.float32), v_threshold=th, v_reset=np.zeros(th.shape, np.float32)),
                  [node.input[0]], region="spiking",
                  threshold_initializer=node.input[2], channel_axis=int(neuron["channel_axis"]),
                  reset="subtraction: v -= v_threshold on a spike (NIR IF: v = v_reset; v_reset = 0 is written "
                        "for readers that ignore this)",
                  fire="v >= v_threshold (NIR IF: v > v_threshold)",
                  v_init_fraction=v0, v_init=(np.float32(v0) * th).astype(np.float32),
                  initial_state="v(0) = v_init = v_init_fraction * v_threshold (NIR IF starts at 0)",
                  dead_channels=dead, dead_threshold="channels that never activated have v_threshold = 1e30: "
                                                     "they never fire",
                  spikes="0/1; the value v_threshold a spike stands for is folded into the consuming weights, "
                         "or applied by a Scale node")
    ex.src[node.output[0]] = [key]
    ex.static.discard(node.output[0])


HANDLERS: dict[str, Callable[[NirBuilder, onnx.NodeProto], None]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _add_sub,
    "Sub": _add_sub,
    "Sum": _add_sub,
    "Mul": _mul_div,
    "Div": _mul_div,
    "Flatten": _flatten,
    "Reshape": _flatten,
    "AveragePool": _avgpool,
    "GlobalAveragePool": _avgpool,
    "MaxPool": _maxpool,
    "Identity": lambda ex, node: ex.passthrough(node, node.input[0]),
    "Dropout": lambda ex, node: ex.passthrough(node, node.input[0]),
}
