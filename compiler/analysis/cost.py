"""The static part of the cost report: fan-out maps (synaptic operations per spike) and the
MACs of every weighted layer of a compiled model, from its weights and geometry.

The counting conventions are in the docstring of :mod:`ann2snn.analysis.report`, which runs
the model and turns spike counts into operations with these maps.
"""
from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ann2snn.runtime.compensation import is_compensated
from ann2snn.runtime.ops import DOMAIN, IF_OP, NEURON_OPS

from ..errors import ConfigError, ModelLoadError
from ..macs import WEIGHTED, step_signals
from ..modelio import load_model
from ..ortsession import make_session

log = logging.getLogger(__name__)

METADATA_KEY = "ann2snn"
RESHAPING = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast")
ELEMENTWISE = ("Add", "Sub")
SCALING = ("Mul", "Div")
POOLS = ("AveragePool", "GlobalAveragePool")


# -- static analysis: fan-out maps and MACs ---------------------------------------------------------

def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _window_taps(node: onnx.NodeProto, in_sp: Sequence[int], out_sp: Sequence[int], kernel: Sequence[int]):
    """For each kernel tap: (tap index, input indices, output indices) per spatial dim, valid positions only.

    Input index of output position o at tap k: ``o·stride − pad_begin + k·dilation``.
    """
    nd = len(kernel)
    strides = list(_attr(node, "strides", [1] * nd))
    dil = list(_attr(node, "dilations", [1] * nd))
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin = []
        for d in range(nd):
            total = max((out_sp[d] - 1) * strides[d] + (kernel[d] - 1) * dil[d] + 1 - in_sp[d], 0)
            begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    elif auto_pad == "VALID":
        begin = [0] * nd
    else:
        begin = list(_attr(node, "pads", [0] * (2 * nd)))[:nd]
    per_dim = []
    for d in range(nd):
        o = np.arange(out_sp[d])
        rows = []
        for k in range(kernel[d]):
            i = o * strides[d] - begin[d] + k * dil[d]
            ok = (i >= 0) & (i < in_sp[d])
            rows.append((i[ok], o[ok]))
        per_dim.append(rows)
    for tap in product(*(range(k) for k in kernel)):
        yield tap, [per_dim[d][tap[d]][0] for d in range(nd)], [per_dim[d][tap[d]][1] for d in range(nd)]


def conv_fanout(node: onnx.NodeProto, w: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int],
                nonzero_weights: bool = False) -> np.ndarray:
    """Synapses per input element of a Conv: shape ``(C, *spatial)`` of its input (no batch)."""
    groups = int(_attr(node, "group", 1))
    cout, cin_g = w.shape[:2]
    kernel = list(w.shape[2:])
    mask = (w != 0) if nonzero_weights else np.ones(w.shape, bool)
    # m[ci, tap]: output channels in ci's group whose weight at that tap counts
    m = mask.reshape(groups, cout // groups, cin_g, -1).sum(axis=1).reshape(groups * cin_g, -1).astype(np.float64)
    fan = np.zeros(tuple(in_shape), np.float64)
    for j, (_, i_idx, _o) in enumerate(_window_taps(node, in_shape[1:], out_shape[1:], kernel)):
        if all(len(i) for i in i_idx):
            fan[(slice(None),) + np.ix_(*i_idx)] += m[:, j].reshape((-1,) + (1,) * len(kernel))
    return fan


def conv_transpose_fanout(node: onnx.NodeProto, w: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int],
                          nonzero_weights: bool = False) -> np.ndarray | None:
    """Synapses per input element of a ConvTranspose (explicit pads only; None otherwise)."""
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID") \
            or _attr(node, "output_shape", None) is not None:
        return None
    cin, cout_g = w.shape[:2]
    kernel = list(w.shape[2:])
    nd = len(kernel)
    strides = list(_attr(node, "strides", [1] * nd))
    dil = list(_attr(node, "dilations", [1] * nd))
    begin = list(_attr(node, "pads", [0] * (2 * nd)))[:nd]
    mask = (w != 0) if nonzero_weights else np.ones(w.shape, bool)
    m = mask.reshape(cin, cout_g, -1).sum(axis=1).astype(np.float64)  # [ci, tap]
    in_sp, out_sp = in_shape[1:], out_shape[1:]
    fan = np.zeros(tuple(in_shape), np.float64)
    for j, tap in enumerate(product(*(range(k) for k in kernel))):
        hits = [None] * nd
        for d in range(nd):  # input i reaches output i·stride − pad_begin + k·dilation
            o = np.arange(in_sp[d]) * strides[d] - begin[d] + tap[d] * dil[d]
            hits[d] = ((o >= 0) & (o < out_sp[d])).astype(np.float64)
        valid = hits[0]
        for h in hits[1:]:
            valid = np.multiply.outer(valid, h)
        fan += m[:, j].reshape((-1,) + (1,) * nd) * valid
    return fan


def pool_transpose(node: onnx.NodeProto, f_out: np.ndarray, in_shape: Sequence[int]) -> np.ndarray:
    """Adjoint of the window-sum of an AveragePool: each input element gets the sum of f over its windows."""
    if node.op_type == "GlobalAveragePool":
        return np.broadcast_to(f_out, tuple(in_shape)).astype(np.float64).copy()
    kernel = list(_attr(node, "kernel_shape", []))
    fan = np.zeros(tuple(in_shape), np.float64)
    for _, i_idx, o_idx in _window_taps(node, in_shape[2:], f_out.shape[2:], kernel):
        if all(len(i) for i in i_idx):
            fan[(slice(None), slice(None)) + np.ix_(*i_idx)] += f_out[(slice(None), slice(None)) + np.ix_(*o_idx)]
    return fan


def _reduce_to(m: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Sum a map over the axes along which ``shape`` was broadcast to ``m.shape``."""
    shape = tuple(shape)
    lead = m.ndim - len(shape)
    if lead:
        m = m.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, (a, b) in enumerate(zip(shape, m.shape)) if a == 1 and b != 1)
    return m.sum(axis=axes, keepdims=True) if axes else m


class _Graph:
    """Shapes, producers, consumers and constants of a graph (batch dimension set to 1)."""

    def __init__(self, nodes: Sequence[onnx.NodeProto], shapes: dict[str, tuple[int, ...]],
                 consts: dict[str, np.ndarray], outputs: Sequence[str]) -> None:
        self.nodes, self.shapes, self.consts, self.outputs = list(nodes), shapes, consts, set(outputs)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            if n.op_type == "Constant" and n.output:
                v = _attr(n, "value", None)
                if v is not None:
                    self.consts[n.output[0]] = numpy_helper.to_array(v)
            for x in dict.fromkeys(n.input):
                if x:
                    self.consumers.setdefault(x, []).append(n)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise ModelLoadError(f"tensor '{name}' has no static shape in the compiled model; "
                                 "recompile it with the current ann2snn (per-sample shapes must be static)")
        return self.shapes[name]

    def weight(self, node: onnx.NodeProto) -> np.ndarray | None:
        return self.consts.get(node.input[1]) if len(node.input) > 1 else None

    def own_fanout(self, node: onnx.NodeProto, nonzero_weights: bool) -> np.ndarray | None:
        """Synapses per element of the data input of a weighted node, or None if not modelled."""
        w = self.weight(node)
        if w is None:
            return None
        x_shape = self.shape(node.input[0])
        mask = (w != 0) if nonzero_weights else np.ones(w.shape, bool)
        if node.op_type == "Conv":
            return conv_fanout(node, w, x_shape[1:], self.shape(node.output[0])[1:], nonzero_weights)[None]
        if node.op_type == "ConvTranspose":
            fan = conv_transpose_fanout(node, w, x_shape[1:], self.shape(node.output[0])[1:], nonzero_weights)
            return None if fan is None else fan[None]
        if node.op_type == "Gemm" and not _attr(node, "transA", 0) and w.ndim == 2:
            per_k = mask.sum(axis=0) if _attr(node, "transB", 0) else mask.sum(axis=1)
            return np.broadcast_to(per_k.astype(np.float64), x_shape).copy()
        if node.op_type == "MatMul" and w.ndim == 2:
            return np.broadcast_to(mask.sum(axis=1).astype(np.float64), x_shape).copy()
        return None


    def macs(self, node: onnx.NodeProto, nonzero_weights: bool, count: str) -> int:
        """MACs of a weighted node per sample: ``valid`` = its synapses (taps on padding excluded),
        ``dense`` = the conventional count (every kernel tap of every output, as ``inspect``)."""
        fan = self.own_fanout(node, nonzero_weights)
        if fan is None:
            return 0
        if count == "valid":
            return int(round(fan.sum()))
        w = self.weight(node)
        taps = int(np.count_nonzero(w)) if nonzero_weights else int(w.size)
        if node.op_type == "Conv":  # every output position runs the whole kernel of its group
            return int(np.prod(self.shape(node.output[0])[2:])) * taps
        if node.op_type == "ConvTranspose":  # every input position scatters the whole kernel
            return int(np.prod(self.shape(node.input[0])[2:])) * taps
        rows = int(np.prod(self.shape(node.input[0])[1:-1])) if len(self.shape(node.input[0])) > 2 else 1
        return rows * taps


def _merge(into: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> None:
    for k, v in new.items():
        into[k] = into[k] + v if k in into else v


class _Router:
    """Follows a spike tensor to its accumulators; fan-out maps keyed by the accumulating node."""

    def __init__(self, g: _Graph, nonzero_weights: bool) -> None:
        self.g, self.nonzero = g, nonzero_weights
        self.memo: dict[str, dict[str, np.ndarray]] = {}

    def route(self, name: str) -> dict[str, np.ndarray]:
        if name in self.memo:
            return self.memo[name]
        g = self.g
        shape = g.shape(name)
        out: dict[str, np.ndarray] = {}
        for c in g.consumers.get(name, []):
            _merge(out, self._through(c, name, shape))
        if name in g.outputs:
            _merge(out, {f"readout:{name}": np.ones(shape)})
        self.memo[name] = out
        return out

    def _mapped(self, c: onnx.NodeProto, fn) -> dict[str, np.ndarray]:
        return {k: fn(v) for k, v in self.route(c.output[0]).items()}

    def _through(self, c: onnx.NodeProto, name: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        g, op = self.g, c.op_type
        slots = [i for i, x in enumerate(c.input) if x == name]
        ones = {c.name: np.ones(shape)}
        if op in WEIGHTED and slots == [0]:
            fan = g.own_fanout(c, self.nonzero)
            if fan is not None:
                return {c.name: fan.reshape(shape)}
            log.warning("fan-out of %s '%s' is not modelled (non-constant or unusual weights): "
                        "counting one SOP per spike", op, c.name)
            return ones
        if op in RESHAPING and slots == [0]:
            return self._mapped(c, lambda m: m.reshape(shape))
        if op == "Transpose":
            perm = list(_attr(c, "perm", list(range(len(shape)))[::-1]))
            return self._mapped(c, lambda m: m.transpose(np.argsort(perm)))
        if op in SCALING and slots == [0] and c.input[1] in g.consts:
            return self._mapped(c, lambda m: _reduce_to(m, shape))
        if op == "Mul" and slots == [1] and c.input[0] in g.consts:
            return self._mapped(c, lambda m: _reduce_to(m, shape))
        if op in ELEMENTWISE and len(slots) == 1:
            return self._mapped(c, lambda m: _reduce_to(m, shape))
        if op in POOLS and slots == [0]:
            return self._mapped(c, lambda m: pool_transpose(c, m, shape))
        if op == "Concat" and len(slots) == 1:
            axis = int(_attr(c, "axis", 0)) % len(shape)
            start = sum(g.shape(x)[axis] for x in c.input[:slots[0]])
            sl = (slice(None),) * axis + (slice(start, start + shape[axis]),)
            return self._mapped(c, lambda m: m[sl])
        if op == "Pad" and slots == [0] and _attr(c, "mode", b"constant") in (b"constant", "constant") \
                and len(c.input) > 1 and c.input[1] in g.consts and (len(c.input) < 4 or not c.input[3]):
            pads = [int(v) for v in g.consts[c.input[1]]]
            begin = pads[:len(shape)]
            if all(b >= 0 for b in pads):
                sl = tuple(slice(b, b + n) for b, n in zip(begin, shape))
                return self._mapped(c, lambda m: m[sl])
        if op not in (*NEURON_OPS, "MaxPool"):
            log.warning("spikes reach %s '%s', whose fan-out is not modelled: counting one SOP per element", op, c.name)
        return ones  # the element reaches a neuron's membrane, or an op that is not an accumulator-free router


def _static_shapes(model: onnx.ModelProto, feeds_shapes: dict[str, tuple[int, ...]],
                   needed: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors (``needed``, default all) with the batch dimension set to 1: shape
    inference, then one run on zeros for those it leaves open."""
    shapes: dict[str, tuple[int, ...]] = {}
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if dims and all(d is not None for d in dims[1:]):
            shapes[vi.name] = (1,) + tuple(dims[1:])
    missing = [o for n in model.graph.node for o in n.output
               if o and o not in shapes and (needed is None or o in needed)]
    if missing:
        run = onnx.ModelProto()
        run.CopyFrom(model)
        types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
        run.graph.output.extend(helper.make_tensor_value_info(o, types.get(o, onnx.TensorProto.FLOAT), None)
                                for o in missing if o not in {x.name for x in run.graph.output})
        inits = {i.name for i in model.graph.initializer}
        feeds = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            feeds[vi.name] = np.zeros(feeds_shapes.get(vi.name, shapes.get(vi.name, ())), dtype)
        try:
            sess = make_session(run)
            names = [o.name for o in run.graph.output]
            for nm, v in zip(names, sess.run(names, feeds)):
                if isinstance(v, np.ndarray):
                    shapes[nm] = (1,) + tuple(v.shape[1:]) if v.ndim else ()
        except Exception as exc:  # noqa: BLE001 - a tensor left without a shape is reported where it is needed
            log.debug("shape run failed: %s", exc)
    return shapes


@dataclass
class NetworkCost:
    """The static part of a report: fan-out maps, MACs and layer list of a compiled model."""

    neurons: list[dict[str, Any]]  # name, spikes, units, shape
    fanout: dict[str, dict[str, np.ndarray]]  # spike tensor -> accumulating layer -> per-element fan-out
    layers: list[dict[str, Any]]  # accumulating layers: name, op, part, analog_macs_per_step, ann_macs
    tail_macs: int
    ann_macs: int

    def synapses(self, spikes: str) -> float:
        """Total fan-out of one neuron layer (its SOPs if every neuron fired once)."""
        return float(sum(m.sum() for m in self.fanout[spikes].values()))


MAC_COUNTS = ("dense", "valid")


def analyse(model: str | os.PathLike[str] | onnx.ModelProto, *, nonzero_weights: bool = False,
            mac_count: str = "dense") -> NetworkCost:
    """Fan-out maps of every neuron layer and the MACs of every weighted layer of a compiled model."""
    if mac_count not in MAC_COUNTS:
        raise ConfigError(f"mac_count must be one of {', '.join(MAC_COUNTS)}, got {mac_count!r} (--macs)")
    proto = load_model(model)
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ModelLoadError("the model has no ann2snn metadata: it is not a compiled spiking model; "
                             "compile it first with `ann2snn compile model.onnx -o model.snn.onnx`")
    meta = json.loads(props[METADATA_KEY])
    state_shapes = {st["input"]: (1,) + tuple(st["shape"]) for st in meta["states"]}
    shapes = _static_shapes(proto, state_shapes)
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    g = _Graph(proto.graph.node, shapes, consts, [o.name for o in proto.graph.output if o.name in meta["step_outputs"]])
    router = _Router(g, nonzero_weights)
    neurons, fanout = [], {}
    for n in meta["neurons"]:
        neurons.append({"name": n["node"], "op": n.get("op", IF_OP), "spikes": n["spikes"], "units": int(n["units"]),
                        "shape": list(n["shape"])})
        fanout[n["spikes"]] = {k: v.reshape(tuple(n["shape"])) for k, v in router.route(n["spikes"]).items()}

    # analog tensors: reachable from the real inputs without passing through a neuron
    state_inputs = {st["input"] for st in meta["states"]}
    inits = set(consts)
    analog = {vi.name for vi in proto.graph.input if vi.name not in state_inputs and vi.name not in inits}
    for n in proto.graph.node:
        if n.op_type not in NEURON_OPS and not is_compensated(n) and any(x in analog for x in n.input):
            analog.update(o for o in n.output if o)
    # real values computed every step, not spikes: the increments of expectation-compensated ops
    # (--nonlinear compensate) and the currents of weighted ops up to the next neuron (a Conv
    # after a Conv with no neuron between them); the weighted ops that read them cost MACs at every step
    increments, currents = step_signals(
        ((n.op_type, n.input, n.output, "neuron" if n.op_type in NEURON_OPS else
          "compensated" if is_compensated(n) else "") for n in proto.graph.node), analog)
    targets = {t for per in fanout.values() for t in per}
    bodies = {f.name: f for f in proto.functions if f.domain == DOMAIN}
    layers = []
    ann_macs = 0
    for n in proto.graph.node:
        product = _activation_product_macs(g, n, bodies)
        if product:  # a MatMul of two activations (attention): in the prefix once, compensated every step
            ann_macs += product
            compensated = is_compensated(n)
            layers.append({"name": n.name, "op": n.op_type, "part": "spiking", "ann_macs": product,
                           "analog_macs_per_step": 0 if compensated else product,
                           "increment_macs_per_step": product if compensated else 0, "current_macs_per_step": 0})
            continue
        macs = 0
        if n.op_type in WEIGHTED:
            macs = g.macs(n, nonzero_weights, mac_count)
            ann_macs += macs
        if n.op_type in WEIGHTED or n.name in targets:
            layers.append({"name": n.name, "op": n.op_type, "part": "spiking", "ann_macs": macs,
                           "analog_macs_per_step": macs if n.op_type in WEIGHTED and n.input[0] in analog else 0,
                           "increment_macs_per_step": macs if n.op_type in WEIGHTED and n.input[0] in increments
                           else 0,
                           "current_macs_per_step": macs if n.op_type in WEIGHTED and n.input[0] in currents
                           and n.input[0] not in increments else 0})
    layers += [{"name": t, "op": "readout", "part": "spiking", "ann_macs": 0, "analog_macs_per_step": 0,
                "increment_macs_per_step": 0, "current_macs_per_step": 0}
               for t in sorted(targets) if t.startswith("readout:")]
    tail_macs = 0
    for layer in _tail_layers(proto, meta, nonzero_weights, mac_count):
        layers.append(layer)
        tail_macs += layer["tail_macs"]
        ann_macs += layer["ann_macs"]
    return NetworkCost(neurons, fanout, layers, tail_macs, ann_macs)


def _activation_product_macs(g: _Graph, node: onnx.NodeProto, bodies: dict[str, onnx.FunctionProto]) -> int:
    """MACs per sample of a MatMul whose two inputs are activations (no constant weight): a plain
    one (time-constant, in the prefix) or the op inside an expectation-compensated function, which
    multiplies the running means at every step. 0 for anything else."""
    if node.domain in ("", "ai.onnx") and node.op_type == "MatMul":
        if g.weight(node) is not None or node.input[0] in g.consts:
            return 0
    elif is_compensated(node):
        body = bodies.get(node.op_type)
        inner = next((n for n in body.node if n.name == "op"), None) if body is not None else None
        if inner is None or inner.op_type != "MatMul" or inner.domain not in ("", "ai.onnx") \
                or not all(i.startswith("mean") for i in inner.input):  # both factors vary in time
            return 0
    else:
        return 0
    a, out = g.shapes.get(node.input[0]), g.shapes.get(node.output[0])
    if not a or not out:
        return 0
    return int(np.prod(out)) * int(a[-1])


def _tail_layers(proto: onnx.ModelProto, meta: dict[str, Any], nonzero_weights: bool,
                 mac_count: str) -> list[dict[str, Any]]:
    """The weighted layers of the analog tail, which runs once per input on the readout."""
    tail = meta.get("tail")
    if not tail:
        return []
    fn = next(f for f in proto.functions if f.domain == tail["domain"] and f.name == tail["function"])
    weighted = [n for n in fn.node if n.op_type in WEIGHTED]
    if not weighted:
        return []
    types = meta.get("types", {})

    def vi(name: str) -> onnx.ValueInfoProto:  # as SpikingSession builds the tail (both metadata formats)
        t = types.get(name, {})
        info = onnx.ValueInfoProto(name=name)
        if t.get("onnx_type"):
            info.type.ParseFromString(base64.b64decode(t["onnx_type"]))
        elif t.get("shape") is not None:
            info.CopyFrom(helper.make_tensor_value_info(name, t.get("elem_type") or onnx.TensorProto.FLOAT, t["shape"]))
        else:
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        return info

    inputs = [vi(i) for i in fn.input]
    graph = helper.make_graph(list(fn.node), "tail", inputs, [vi(o) for o in fn.output])
    model = helper.make_model(graph, opset_imports=list(fn.opset_import), ir_version=proto.ir_version)
    feeds = {}
    for info in inputs:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
        if dims and all(d is not None for d in dims[1:]):
            feeds[info.name] = (1,) + tuple(dims[1:])
    needed = {x for n in weighted for x in (n.input[0], n.output[0])}
    g = _Graph(fn.node, _static_shapes(model, feeds, needed), {}, fn.output)
    layers = []
    for n in weighted:
        macs = g.macs(n, nonzero_weights, mac_count)
        layers.append({"name": n.name, "op": n.op_type, "part": "tail", "ann_macs": macs,
                       "analog_macs_per_step": 0, "tail_macs": macs})
    return layers
