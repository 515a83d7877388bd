"""Recognise activations that exporters write out as several ops, and make each one op.

What exporters really write (see models/exporters/): ReLU as ``Max(x, 0)`` (jax2tf); SiLU as
``x * Sigmoid(x)``; HardSigmoid as ``Clip(x + 3, 0, 6) / 6`` or ``Min(Max(x + 3, 0), 6) * (1/6)``;
HardSwish as ``x * HardSigmoid(x)`` (torch at opset < 14, paddle2onnx), ``x * Clip(x + 3, 0, 6) / 6``
(tf2onnx, Keras 3, JAX); GELU via ``Erf`` or the tanh polynomial; LayerNorm as
ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div(/Mul/Add) (or with ReduceSum times 1/n, Reciprocal,
GlobalAveragePool over transposes); Softmax as ReduceMax/Sub/Exp/ReduceSum/Div.

How: every tensor computed from a single tensor ``x`` through elementwise, reduction and layout
ops with constant other operands (its *cone*) is a candidate when the cone holds a nonlinear
op; the cone's function is then identified numerically, by running it in onnxruntime on test
values of ``x`` and comparing with each known activation. Largest cones first, so HardSwish
wins over the HardSigmoid inside it. A cone whose inner tensors are read elsewhere is left alone.

The target form is the standard ONNX op where the model's opset has it (Relu, HardSigmoid,
Softmax; HardSwish from opset 14, LayerNormalization from 17, Gelu from 20), otherwise a
model-local function in the ``ann2snn.activations`` domain (SiLU, HardSwish, Gelu, GeluTanh,
LayerNormalization) whose body computes the same thing, so the model still runs on stock
onnxruntime. Non-ReLU activations are analog ops for the later passes (ann2snn.support).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ann2snn.ortsession import make_session
from ann2snn.state import PassState

from ._graph import const_value

log = logging.getLogger(__name__)

DOMAIN = "ann2snn.activations"
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Reciprocal", "Sqrt", "Exp", "Erf", "Tanh", "Sigmoid",
               "Clip", "Min", "Max", "Relu", "HardSigmoid", "Abs", "Cast"}
STRUCTURAL = {"ReduceMean", "ReduceSum", "ReduceMax", "GlobalAveragePool", "Transpose", "Squeeze", "Unsqueeze",
              "Reshape", "Expand"}
#: a cone is a candidate only when it holds one of these
ANCHORS = {"Erf", "Tanh", "Sigmoid", "Exp", "Sqrt", "Clip", "Min", "Max", "HardSigmoid", "Reciprocal", "Pow"}
#: the most ops one written-out activation takes (jax2tf's LayerNorm with its reshapes: 14)
MAX_CONE = 24
#: the standard op and the first opset that has it; others become functions
STANDARD_SINCE = {"HardSwish": 14, "LayerNormalization": 17, "Gelu": 20}


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _hsig(x: np.ndarray) -> np.ndarray:
    return np.clip(x / 6.0 + 0.5, 0.0, 1.0)


ELEMENTWISE_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Relu": lambda x: np.maximum(x, 0.0),
    "HardSigmoid": _hsig,
    "HardSwish": lambda x: x * _hsig(x),
    "SiLU": lambda x: x / (1.0 + np.exp(-x)),
    "Gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "GeluTanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
}


def _close(y: np.ndarray, ref: np.ndarray) -> bool:
    # tight enough to tell the erf GELU from the tanh one (they differ by up to 5e-4)
    return y.shape == ref.shape and bool(np.all(np.abs(y - ref) <= 2e-5 + 2e-5 * np.abs(ref)))


def _allowed(node: gs.Node) -> bool:
    return node.op in ELEMENTWISE | STRUCTURAL and (node.domain or "") in ("", "ai.onnx") and len(node.outputs) == 1


def _varying(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if t.name and const_value(t) is None]


def _roots(y: gs.Tensor, order: dict[str, int], limit: int = 40) -> list[gs.Tensor]:
    """Tensors ``y`` may be computed from through allowed ops, the farthest first."""
    seen: dict[str, gs.Tensor] = {}
    stack, visited = [y], 0
    while stack and visited < limit:
        t = stack.pop()
        prod = t.inputs[0] if t.inputs else None
        if prod is None or not _allowed(prod):
            continue
        visited += 1
        for i in _varying(prod):
            if i.name not in seen:
                seen[i.name] = i
                stack.append(i)
    return sorted(seen.values(), key=lambda t: order.get(t.inputs[0].name, -1) if t.inputs else -1)


def _cone(y: gs.Tensor, root: gs.Tensor) -> list[gs.Node] | None:
    """The nodes that compute ``y`` from ``root`` and constants only, or None."""
    nodes: dict[str, gs.Node] = {}
    stack = [y]
    while stack:
        t = stack.pop()
        if t is root:
            continue
        prod = t.inputs[0] if t.inputs else None
        if prod is None or not _allowed(prod):
            return None
        if prod.name in nodes:
            continue
        nodes[prod.name] = prod
        stack.extend(_varying(prod))
    return list(nodes.values())


def _closed(nodes: list[gs.Node], y: gs.Tensor, outputs: set[str]) -> bool:
    """Whether every tensor made inside the cone, other than ``y``, is read only inside it."""
    names = {n.name for n in nodes}
    for n in nodes:
        for t in n.outputs:
            if t is y:
                continue
            if t.name in outputs or any(c.name not in names for c in t.outputs):
                return False
    return True


def _evaluate(nodes: list[gs.Node], x: gs.Tensor, y: gs.Tensor, xv: np.ndarray, opset: int) -> np.ndarray | None:
    """Run the cone on ``xv`` in onnxruntime; None if it cannot run."""
    inp = gs.Variable("x", dtype=xv.dtype, shape=list(xv.shape))
    out = gs.Variable("y", dtype=None)
    mapping: dict[int, gs.Tensor] = {id(x): inp, id(y): out}
    copies = []
    for n in nodes:
        ins = []
        for t in n.inputs:
            if id(t) not in mapping:
                value = const_value(t) if t.name else None
                mapping[id(t)] = gs.Constant(f"c{len(mapping)}", np.asarray(value)) if value is not None \
                    else (gs.Variable.empty() if not t.name else gs.Variable(f"t{len(mapping)}"))
            ins.append(mapping[id(t)])
        outs = []
        for t in n.outputs:
            mapping.setdefault(id(t), gs.Variable(f"t{len(mapping)}"))
            outs.append(mapping[id(t)])
        copies.append(gs.Node(n.op, attrs=dict(n.attrs), inputs=ins, outputs=outs))
    out.dtype = None
    graph = gs.Graph(nodes=copies, inputs=[inp], outputs=[out], opset=opset)
    try:
        model = gs.export_onnx(graph.toposort(), do_type_check=False)
        model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        return np.asarray(make_session(model).run(None, {"x": xv})[0], np.float64)
    except Exception:  # not a runnable cone (e.g. a shape it cannot take): not an activation
        return None


def _test_input(x: gs.Tensor, nodes: list[gs.Node]) -> np.ndarray | None:
    """Test values of ``x``: its per-sample shape with a batch of 2 (a 1-D sweep when the shape
    is unknown and the cone is elementwise with scalar constants)."""
    rng = np.random.default_rng(0)
    shape = None
    if x.shape is not None and len(x.shape) >= 1 and all(isinstance(d, (int, np.integer)) and d > 0
                                                        for d in x.shape[1:]):
        shape = [2] + [int(d) for d in x.shape[1:]]
    elif all(n.op in ELEMENTWISE for n in nodes) and all(
            v.size == 1 for n in nodes for t in n.inputs if t.name and (v := const_value(t)) is not None):
        shape = [512]
    if shape is None:
        return None
    elementwise = all(n.op in ELEMENTWISE for n in nodes)
    far = np.geomspace(10.0, 1e4, 24)  # far from 0 too: Min(Max(x, 0), 64) is no ReLU
    sweep = np.concatenate([np.linspace(-8.0, 8.0, 401), far, -far]).astype(np.float32)
    if elementwise:  # a batch large enough for the whole sweep
        shape[0] = max(1, -(-sweep.size // int(np.prod(shape[1:]))))
    xv = (rng.standard_normal(shape) * 3.0).astype(np.float32)
    if elementwise:  # through the kinks of piecewise activations
        xv.reshape(-1)[:sweep.size] = sweep
    return xv


def _piecewise_linear(x: np.ndarray, y: np.ndarray) -> tuple[str, dict] | None:
    """``Clip(x, lo, hi)`` (a ReLU6 written as Min(Max(x, 0), 6)) or ``HardSigmoid(x; alpha, beta)``
    with other constants (e.g. the +3 folded into a bias: Min(Max(x, 0), 6) / 6)."""
    lo, hi = float(y.min()), float(y.max())
    if lo < hi and _close(y, np.clip(x, lo, hi)) and lo == 0.0:
        return "Clip", {"min": lo, "max": hi}
    inside = (y > 1e-6) & (y < 1 - 1e-6)
    if lo != 0.0 or abs(hi - 1.0) > 1e-6 or inside.sum() < 8:
        return None
    alpha, beta = np.polyfit(x[inside], y[inside], 1)
    if alpha > 0 and _close(y, np.clip(alpha * x + beta, 0.0, 1.0)):
        return "HardSigmoid", {"alpha": float(alpha), "beta": float(beta)}
    return None


def _layer_norm_fit(xv: np.ndarray, y: np.ndarray, epsilons: list[float]) -> tuple[float, np.ndarray, np.ndarray] | None:
    """(epsilon, scale, bias) when ``y`` is a LayerNorm of ``xv`` over its last axis."""
    x = xv.astype(np.float64)
    for eps in epsilons:
        z = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
        zf, yf = z.reshape(-1, z.shape[-1]), y.reshape(-1, z.shape[-1])
        zc, yc = zf - zf.mean(0), yf - yf.mean(0)
        scale = (zc * yc).sum(0) / np.maximum((zc * zc).sum(0), 1e-12)
        bias = yf.mean(0) - scale * zf.mean(0)
        if np.all(np.abs(zf * scale + bias - yf) <= 1e-4 + 1e-4 * np.abs(yf)):
            return eps, scale.astype(np.float32), bias.astype(np.float32)
    return None


def _identify(nodes: list[gs.Node], x: gs.Tensor, y: gs.Tensor, opset: int) -> tuple[str, dict] | None:
    """(activation, parameters) that the cone computes, or None."""
    xv = _test_input(x, nodes)
    if xv is None:
        return None
    with np.errstate(over="ignore"):
        yv = _evaluate(nodes, x, y, xv, opset)
    if yv is None or yv.shape != xv.shape:
        return None
    ops = {n.op for n in nodes}
    x64 = xv.astype(np.float64)
    if not ops & STRUCTURAL:
        # elementwise: the first values (the whole sweep) decide; cheaper on large tensors
        x64, yv = x64.reshape(-1)[:4096], yv.reshape(-1)[:4096]
        for name, f in ELEMENTWISE_ACTIVATIONS.items():
            if name == "Relu" and ops <= {"Relu"}:
                continue
            with np.errstate(over="ignore", invalid="ignore"):
                ref = f(x64)
            if _close(yv, ref):
                return name, {}
        return _piecewise_linear(x64, yv)
    if xv.ndim >= 2:
        for axis in range(1, xv.ndim):
            e = np.exp(x64 - x64.max(axis, keepdims=True))
            if _close(yv, e / e.sum(axis, keepdims=True)):
                return "Softmax", {"axis": axis - xv.ndim}
        consts = [float(v.reshape(())) for n in nodes if n.op == "Add" for t in n.inputs
                  if t.name and (v := const_value(t)) is not None and v.size == 1 and 0 < float(v.reshape(())) < 0.1]
        fit = _layer_norm_fit(xv, yv, consts + [1e-5, 1e-6, 1e-12, 1e-3])
        if fit is not None:
            return "LayerNormalization", {"epsilon": fit[0], "scale": fit[1], "bias": fit[2]}
    return None


def _function(name: str, opset: int) -> onnx.FunctionProto:
    """The model-local function that computes ``name`` with ops of the model's opset."""
    c = lambda v, n: helper.make_node("Constant", [], [n], value=helper.make_tensor(n, 1, [], [v]))  # noqa: E731
    if name == "SiLU":
        body = [helper.make_node("Sigmoid", ["X"], ["s"]), helper.make_node("Mul", ["X", "s"], ["Y"])]
        inputs = ["X"]
    elif name == "HardSwish":
        body = [helper.make_node("HardSigmoid", ["X"], ["s"], alpha=1.0 / 6.0, beta=0.5),
                helper.make_node("Mul", ["X", "s"], ["Y"])]
        inputs = ["X"]
    elif name in ("Gelu", "GeluTanh"):
        if name == "Gelu":
            body = [c(1.0 / math.sqrt(2.0), "k"), helper.make_node("Mul", ["X", "k"], ["u"]),
                    helper.make_node("Erf", ["u"], ["t"])]
        else:
            body = [c(math.sqrt(2.0 / math.pi), "k"), c(0.044715, "a"), c(3.0, "three"),
                    helper.make_node("Pow", ["X", "three"], ["x3"]), helper.make_node("Mul", ["x3", "a"], ["ax3"]),
                    helper.make_node("Add", ["X", "ax3"], ["p"]), helper.make_node("Mul", ["p", "k"], ["u"]),
                    helper.make_node("Tanh", ["u"], ["t"])]
        body += [c(1.0, "one"), c(0.5, "half"), helper.make_node("Add", ["t", "one"], ["t1"]),
                 helper.make_node("Mul", ["X", "t1"], ["xt"]), helper.make_node("Mul", ["xt", "half"], ["Y"])]
        inputs = ["X"]
    elif name == "LayerNormalization":  # over the last axis; opsets 13..16 (ReduceMean takes axes as attribute)
        body = [helper.make_node("ReduceMean", ["X"], ["mean"], axes=[-1]),
                helper.make_node("Sub", ["X", "mean"], ["d"]), helper.make_node("Mul", ["d", "d"], ["d2"]),
                helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
                helper.make_node("Add", ["var", "epsilon"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
                helper.make_node("Div", ["d", "sd"], ["z"]), helper.make_node("Mul", ["z", "Scale"], ["zs"]),
                helper.make_node("Add", ["zs", "B"], ["Y"])]
        inputs = ["X", "Scale", "B", "epsilon"]
    else:
        raise ValueError(name)
    return helper.make_function(DOMAIN, name, inputs, ["Y"], body, [helper.make_opsetid("", opset)],
                                doc_string=f"{name}, as ann2snn's canonical form for opsets without the standard op")


def _import_function(fn: onnx.FunctionProto, opset: int) -> gs.Function:
    """A FunctionProto as onnx-graphsurgeon's Function (through a model that holds it)."""
    model = helper.make_model(helper.make_graph([], "f", [], []), functions=[fn],
                              opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])
    return gs.import_onnx(model).functions[0]


def _replace(graph: gs.Graph, state: PassState, nodes: list[gs.Node], x: gs.Tensor, y: gs.Tensor,
             name: str, params: dict) -> gs.Node:
    """Swap the cone for one node computing ``name``; record what became of the cone's nodes."""
    last = y.inputs[0]
    opset = state.opset
    attrs: dict = {}
    inputs: list[gs.Tensor] = [x]
    domain = ""
    op = name
    if name == "HardSigmoid":
        attrs = {"alpha": params.get("alpha", 1.0 / 6.0), "beta": params.get("beta", 0.5)}
    elif name == "Clip":
        inputs = [x, gs.Constant(f"{last.name}/min", np.array(params["min"], np.float32)),
                  gs.Constant(f"{last.name}/max", np.array(params["max"], np.float32))]
    elif name == "Softmax":
        attrs = {"axis": params["axis"]}
    elif name == "LayerNormalization":
        inputs = [x, gs.Constant(f"{last.name}/scale", params["scale"]), gs.Constant(f"{last.name}/bias", params["bias"])]
        if opset >= STANDARD_SINCE[name]:
            attrs = {"axis": -1, "epsilon": float(params["epsilon"])}
        else:
            inputs.append(gs.Constant(f"{last.name}/epsilon", np.array(params["epsilon"], np.float32)))
    elif name in ("Gelu", "GeluTanh") and opset >= STANDARD_SINCE["Gelu"]:
        op, attrs = "Gelu", {"approximate": "tanh" if name == "GeluTanh" else "none"}
    if name in ("SiLU", "GeluTanh", "Gelu", "HardSwish", "LayerNormalization") and op == name \
            and opset < STANDARD_SINCE.get(name, 10 ** 6):
        domain = DOMAIN
        if not any(f.name == name and f.domain == DOMAIN for f in graph.functions):
            graph.functions.append(_import_function(_function(name, opset), opset))
        state.other_opsets[DOMAIN] = 1
    for n in nodes:
        n.outputs = []
        n.inputs = []
    new = gs.Node(op, name=last.name, attrs=attrs, inputs=inputs, outputs=[y], domain=domain or None)
    graph.nodes.append(new)
    label = f"{DOMAIN}::{op}" if domain else op
    for n in nodes:
        if n is not last:
            state.removed[n.name] = f"part of {label} written out, recognised as one op '{last.name}'"
            state.metadata.setdefault("absorbed", {})[n.name] = last.name
    return new


def _drop_noop_expands(state: PassState) -> None:
    """``Expand(x, shape)`` whose inferred output shape is x's own is the identity: jax2tf writes
    one after every reduction, with the shape computed from the input's (dynamic) batch size."""
    graph = state.graph
    for node in list(graph.nodes):
        if node.op != "Expand" or len(node.outputs) != 1 or not node.inputs:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x.shape is None or y.shape is None or list(x.shape) != list(y.shape) or const_value(node.inputs[1]) is not None \
                or any(d is None or (isinstance(d, str) and not d) for d in x.shape):
            continue
        for consumer in list(y.outputs):
            consumer.inputs = [x if t is y else t for t in consumer.inputs]
        if y in graph.outputs:
            continue
        node.outputs, node.inputs = [], []
        state.removed[node.name] = "removed: broadcasts to the shape its input already has"
    graph.cleanup()


def canonicalize_activations(state: PassState) -> PassState:
    """Rewrite written-out activations into one op each (see module doc)."""
    graph = state.graph
    _drop_noop_expands(state)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    outputs = {t.name for t in graph.outputs}
    claimed: set[str] = set()
    found: dict[str, int] = {}
    for node in reversed(list(graph.nodes)):
        if node.name in claimed or not _allowed(node):
            continue
        y = node.outputs[0]
        for x in _roots(y, order):
            if x.shape is not None and y.shape is not None and list(x.shape) != list(y.shape):
                continue  # activations keep the shape (cheap test before running anything)
            members = _cone(y, x)
            if not members or len(members) > MAX_CONE or not ({n.op for n in members} & ANCHORS) \
                    or any(n.name in claimed for n in members):
                continue
            if len(members) == 1 and node.op not in ("Max", "Min"):
                continue  # a single op is already one op (Max(x, 0) is ReLU written as Max)
            if not _closed(members, y, outputs) or (x.dtype is not None and np.dtype(x.dtype).kind != "f"):
                continue
            members.sort(key=lambda n: order[n.name])
            ident = _identify(members, x, y, state.opset)
            if ident is None:
                continue
            name, params = ident
            claimed.update(n.name for n in members)
            _replace(graph, state, members, x, y, name, params)
            found[name] = found.get(name, 0) + 1
            break
    if found:
        log.info("canonicalize_activations: %s", ", ".join(f"{v} {k}" for k, v in sorted(found.items())))
        graph.cleanup().toposort()
    return state
