"""What a compiled SNN costs: firing rates, synaptic operations (SOPs), MACs and energy, per layer.

``report(snn, data, Ts)`` runs the SNN once on ``data`` for ``max(Ts)`` steps, counts the
spikes of every neuron layer at every position, and turns them into operations with fan-out
maps computed once from the compiled graph's weights and geometry.

Counting conventions (the README repeats them):

- **SOP** (synaptic operation, one accumulate): a spike of a neuron costs one SOP per synapse
  it drives. Following the spike forward, every path ends at an accumulator:
  - a weighted layer (Conv, ConvTranspose, Gemm, MatMul with constant weights): one SOP per
    weight tap that connects the spiking element to an output element that exists. For Conv
    this depends on the position (padding edges, strides, dilations, groups); for Gemm /
    MatMul it is the number of outputs. By default every weight counts (the dense structure, as hardware that
    stores the layer would execute it); ``nonzero_weights=True`` counts only nonzero weights.
  - otherwise the element the spike reaches, at one SOP per element: the next neuron's
    membrane (a residual Add: the spike, scaled by θ, is added into the next neuron's input),
    the readout (a graph output), or any other op that consumes it (e.g. a MaxPool on spikes).
  Weight-free linear ops on the way route the spike without costing anything themselves:
  Flatten, Reshape, Transpose, Squeeze/Unsqueeze, Identity, Concat, constant Pad, Add/Sub, and the Mul/Div
  by a constant that applies θ (it is part of the synaptic weight, as in the folded case).
  AveragePool / GlobalAveragePool count as folded into the consumer's weights (as the compiler
  folds θ through them): an element's fan-out is the sum, over the pool windows that contain
  it, of the fan-out of that window's output. For non-overlapping windows (kernel = stride,
  global pooling) this is exactly the number of synapses of the composed layer; for
  overlapping windows it counts one accumulate per path. A pool read by a neuron directly
  costs one SOP per window a spike falls in.
- Biases, the membrane update, the cumulative max-pool state and the readout average are not
  counted (as in the paper's SOP count).
- **MAC**: a weighted layer whose input is analog performs multiply-accumulates: by default
  the conventional dense count (every kernel tap of every output position, padding included,
  as ``ann2snn inspect`` and published FLOP counts); ``mac_count="valid"`` counts one per
  synapse exactly like SOPs (taps that fall on padding excluded). Under
  direct coding this is every weighted layer before the first neuron. Its input is the same
  at every step, so by default it is counted once per input (``E_MAC x MACs_1 + E_AC x SOPs``,
  the usual direct-coding estimate); ``analog_once=False`` counts it at every step, as the
  plain step graph executes it (``T x`` its MACs). The analog tail runs once per input. The
  ANN's MACs are those of the same weighted layers, all analog, counted the same way, from
  the compiled graph (BatchNorm is folded, so it costs nothing).
- SOPs and spikes at T count every step in ``[0, T)``: the steps before the readout window
  (t0) are spent too.
- **Energy**: ``SOPs x E_sop + MACs x E_mac`` per input, under each ``EnergyModel``: the paper's
  (77 fJ per SOP, 12.5 pJ per FLOP, 1 FLOP per MAC: the paper's ResNet-34 figures, 22 frames/s/W
  for the ANN, match 3.6 G MACs at 12.5 pJ each) and the 45 nm one (0.9 pJ per accumulate,
  4.6 pJ per multiply-accumulate). Firing rate = spikes / (neurons x steps), over all T steps.
- **SOPs90 / SOPs95**: SOPs per input at the smallest T whose accuracy reaches 90% / 95% of the
  ANN's (needs labels and the ANN).
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ann2snn.runtime.ops import COUNTING_OPS, IF_OP, NEURON_OPS

from ..errors import Ann2SnnError, ConfigError, DataError, ModelLoadError
from ..modelio import load_model, write_atomic
from ..ortsession import make_session

log = logging.getLogger(__name__)

METADATA_KEY = "ann2snn"
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
RESHAPING = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast")
ELEMENTWISE = ("Add", "Sub")
SCALING = ("Mul", "Div")
POOLS = ("AveragePool", "GlobalAveragePool")


class PlotUnavailableError(Ann2SnnError):
    """matplotlib, needed for ``--plot``, is not installed."""

    exit_code = 2


# -- energy -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EnergyModel:
    """Energy per synaptic operation (accumulate) and per multiply-accumulate, in joules."""

    name: str
    sop_j: float
    mac_j: float
    note: str = ""


def paper_energy(sop_fj: float = 77.0, flop_pj: float = 12.5, flops_per_mac: float = 1.0) -> EnergyModel:
    """Bu, Li & Yu's constants (ROLLS chip): 77 fJ per SOP, 12.5 pJ per ANN FLOP, 1 FLOP per MAC."""
    return EnergyModel("paper", sop_fj * 1e-15, flop_pj * 1e-12 * flops_per_mac,
                       f"{sop_fj:g} fJ/SOP, {flop_pj:g} pJ/FLOP, {flops_per_mac:g} FLOP/MAC")


def cmos45_energy(ac_pj: float = 0.9, mac_pj: float = 4.6) -> EnergyModel:
    """The common 45 nm CMOS figures: 0.9 pJ per 32-bit float accumulate, 4.6 pJ per multiply-accumulate."""
    return EnergyModel("45nm", ac_pj * 1e-12, mac_pj * 1e-12, f"{ac_pj:g} pJ/AC, {mac_pj:g} pJ/MAC")


DEFAULT_ENERGY: tuple[EnergyModel, ...] = (paper_energy(), cmos45_energy())


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
        if n.op_type not in NEURON_OPS and any(x in analog for x in n.input):
            analog.update(o for o in n.output if o)
    targets = {t for per in fanout.values() for t in per}
    layers = []
    ann_macs = 0
    for n in proto.graph.node:
        macs = 0
        if n.op_type in WEIGHTED:
            macs = g.macs(n, nonzero_weights, mac_count)
            ann_macs += macs
        if n.op_type in WEIGHTED or n.name in targets:
            layers.append({"name": n.name, "op": n.op_type, "part": "spiking", "ann_macs": macs,
                           "analog_macs_per_step": macs if n.op_type in WEIGHTED and n.input[0] in analog else 0})
    layers += [{"name": t, "op": "readout", "part": "spiking", "ann_macs": 0, "analog_macs_per_step": 0}
               for t in sorted(targets) if t.startswith("readout:")]
    tail_macs = 0
    for layer in _tail_layers(proto, meta, nonzero_weights, mac_count):
        layers.append(layer)
        tail_macs += layer["tail_macs"]
        ann_macs += layer["ann_macs"]
    return NetworkCost(neurons, fanout, layers, tail_macs, ann_macs)


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


# -- counting spikes during a run -------------------------------------------------------------------

class SpikeCounter:
    """Per-position spike counts of every neuron layer, summed over samples, at every T in ``Ts``.

    Pass ``on_step`` to ``SpikingSession.run_many`` (with the spike tensors as probes); call
    ``start()`` before each batch.
    """

    def __init__(self, shapes: dict[str, Sequence[int]], Ts: Sequence[int], signed: bool = False) -> None:
        self.Ts = sorted(set(Ts))
        self.signed = signed  # spikes may be -1: count |spikes|
        self._Tset = set(self.Ts)
        self.names = list(shapes)
        self.totals = {T: {s: np.zeros(tuple(sh), np.float64) for s, sh in shapes.items()} for T in self.Ts}
        self.samples = 0
        self._cur: dict[str, np.ndarray] = {}

    def start(self) -> None:
        self._cur = {}

    def on_step(self, t: int, values: dict[str, np.ndarray]) -> None:
        cur = self._cur
        if t == 0:
            self.samples += next(iter(values.values())).shape[0] if values else 0
        for s in self.names:
            # float32 sums of 0/1 are exact below 2**24 samples; a signed neuron's -1 is a spike too,
            # and a burst of k spikes is k spikes
            v = np.add.reduce(np.abs(values[s]) if self.signed else values[s], axis=0)
            if s in cur:
                cur[s] += v
            else:
                cur[s] = v.astype(np.float64)
        if t + 1 in self._Tset:
            tot = self.totals[t + 1]
            for s in self.names:
                tot[s] += cur[s]


def _counting_session(model: onnx.ModelProto, counter_holder: list):
    """A SpikingSession that probes every spike tensor and feeds the counter on every step."""
    from ann2snn.runtime import SpikingSession

    class CountingSession(SpikingSession):
        def run_many(self, inputs, Ts, t0=None, on_step=None):  # noqa: ANN001
            counter = counter_holder[0]
            counter.start()

            def hook(t: int, values: dict[str, np.ndarray]) -> None:
                counter.on_step(t, values)
                if on_step is not None:
                    on_step(t, values)
            return super().run_many(inputs, Ts, t0, on_step=hook)

    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    return CountingSession(model, probes=[n["spikes"] for n in meta["neurons"]])


def _simulate(session: Any, data: Any, Ts: Sequence[int], label_key: str, batch_size: int,
              t0: int | None, show_progress: bool) -> dict[str, Any]:
    """SNN accuracy without an ANN reference (the part of ``evaluate`` that needs no ANN)."""
    from ..data.arrays import as_array_dict, check_arrays
    from ..progress import progress

    specs = session.input_specs
    arrays = as_array_dict(data, specs, "report data")
    check_arrays(arrays, specs, "report data")
    n = arrays[specs[0].name].shape[0]
    labels = arrays.get(label_key)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != n:
            raise DataError(f"report data has {labels.shape[0]} labels under '{label_key}' for {n} samples")
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size} (--batch-size)")
    preds: dict[int, list[np.ndarray]] = {T: [] for T in Ts}
    out_name = session.output_names[0]
    for i in progress(range(0, n, batch_size), math.ceil(n / batch_size), "simulating", show_progress):
        res = session.run_many({s.name: arrays[s.name][i:i + batch_size] for s in specs}, Ts, t0)
        for T in Ts:
            preds[T].append(res[T][out_name].argmax(axis=1))
    rows = [{"T": T, "accuracy": float((np.concatenate(preds[T]) == labels).mean()) if labels is not None else None}
            for T in Ts]
    return {"samples": int(n), "ann_accuracy": None, "t0": session.t0 if t0 is None else int(t0), "snn": rows}


def sops_at_fraction(rows: Sequence[dict[str, Any]], ann_accuracy: float | None, fraction: float) -> dict[str, Any] | None:
    """The row (T, SOPs, ...) of the smallest T whose accuracy reaches ``fraction`` of the ANN's, or None."""
    if ann_accuracy is None:
        return None
    for r in sorted(rows, key=lambda r: r["T"]):
        if r.get("accuracy") is not None and r["accuracy"] >= fraction * ann_accuracy:
            return {"T": r["T"], "accuracy": r["accuracy"], "sops_per_input": r["sops_per_input"],
                    "energy_j": r.get("energy_j")}
    return None


def report(
    snn: str | os.PathLike[str] | onnx.ModelProto,
    data: Any,
    Ts: Sequence[int],
    *,
    ann: str | os.PathLike[str] | onnx.ModelProto | None = None,
    label_key: str = "label",
    batch_size: int = 256,
    t0: int | None = None,
    energy: Sequence[EnergyModel] = DEFAULT_ENERGY,
    nonzero_weights: bool = False,
    analog_once: bool = True,
    mac_count: str = "dense",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Firing rates, SOPs, MACs and energy per input, per layer and in total, at each T.

    One simulation of ``max(Ts)`` steps serves every T. With labels under ``label_key`` the
    SNN's accuracy is reported; with ``ann`` (the original ANN) also the ANN's accuracy, the
    agreement, and SOPs90 / SOPs95. The ANN's MACs always come from the compiled graph.
    """
    from ann2snn.runtime.session import check_T

    Ts = sorted({check_T(T) for T in Ts})
    if not Ts:
        raise ConfigError("report needs at least one T (-T)")
    if not energy:
        raise ConfigError("report needs at least one energy model")
    proto = load_model(snn)
    cost = analyse(proto, nonzero_weights=nonzero_weights, mac_count=mac_count)
    holder: list[SpikeCounter] = []
    session = _counting_session(proto, holder)
    signed = any(n["op"] in COUNTING_OPS for n in cost.neurons)
    holder.append(SpikeCounter({n["spikes"]: n["shape"] for n in cost.neurons}, Ts, signed=signed))
    if ann is not None:
        from .evaluate import evaluate
        acc = evaluate(ann, session, data, Ts, label_key=label_key, batch_size=batch_size, t0=t0,
                       show_progress=show_progress)
    else:
        acc = _simulate(session, data, Ts, label_key, batch_size, t0, show_progress)
    counter = holder[0]
    result = summarise(cost, counter, acc, energy, analog_once)
    result["conventions"] = {"weights": "nonzero" if nonzero_weights else "dense",
                             "analog_macs": "once per input" if analog_once else "every step",
                             "mac_count": mac_count}
    result["model"] = str(snn) if isinstance(snn, (str, os.PathLike)) else None
    result["ann_model"] = str(ann) if isinstance(ann, (str, os.PathLike)) else None
    return result


def summarise(cost: NetworkCost, counter: SpikeCounter, acc: dict[str, Any], energy: Sequence[EnergyModel],
              analog_once: bool = True) -> dict[str, Any]:
    """Turn spike counts and fan-out maps into the report dictionary (JSON-ready)."""
    n = max(counter.samples, 1)
    Ts = counter.Ts
    by_T_acc = {r["T"]: r for r in acc["snn"]}
    # SOPs per input of every (neuron layer, accumulating layer) pair at every T
    pair = {T: {s: {k: float((counter.totals[T][s] * f).sum()) / n for k, f in per.items()}
                for s, per in cost.fanout.items()} for T in Ts}
    neuron_rows = []
    for nl in cost.neurons:
        s = nl["spikes"]
        rows = []
        for T in Ts:
            spikes = float(counter.totals[T][s].sum()) / n
            rows.append({"T": T, "spikes_per_input": spikes, "firing_rate": spikes / (nl["units"] * T),
                         "sops_per_input": sum(pair[T][s].values())})
        neuron_rows.append({"name": nl["name"], "spikes": s, "units": nl["units"],
                            "synapses": cost.synapses(s), "fanout_mean": cost.synapses(s) / nl["units"],
                            "targets": sorted(cost.fanout[s]), "by_T": rows})
    layer_rows = []
    for layer in cost.layers:
        sources = [nl["name"] for nl in cost.neurons if layer["name"] in cost.fanout[nl["spikes"]]]
        if layer["analog_macs_per_step"]:
            sources.append("analog input")
        if layer["part"] == "tail":
            sources.append("readout")
        rows = []
        for T in Ts:
            sops = sum(pair[T][s].get(layer["name"], 0.0) for s in cost.fanout)
            macs = layer["analog_macs_per_step"] * (1 if analog_once else T) + layer.get("tail_macs", 0)
            rows.append({"T": T, "sops_per_input": sops, "macs_per_input": macs,
                         "energy_j": {e.name: sops * e.sop_j + macs * e.mac_j for e in energy}})
        layer_rows.append({"name": layer["name"], "op": layer["op"], "part": layer["part"], "inputs": sources,
                           "ann_macs": layer["ann_macs"], "by_T": rows})
    ann_energy = {e.name: cost.ann_macs * e.mac_j for e in energy}
    analog_step = sum(layer["analog_macs_per_step"] for layer in cost.layers)
    snn_rows = []
    for i, T in enumerate(Ts):
        sops = sum(r["by_T"][i]["sops_per_input"] for r in neuron_rows)
        macs = analog_step * (1 if analog_once else T) + cost.tail_macs
        spikes = sum(r["by_T"][i]["spikes_per_input"] for r in neuron_rows)
        units = sum(nl["units"] for nl in cost.neurons)
        e = {m.name: sops * m.sop_j + macs * m.mac_j for m in energy}
        row = {"T": T, "sops_per_input": sops, "macs_per_input": macs, "spikes_per_input": spikes,
               "firing_rate": spikes / (units * T) if units else 0.0, "energy_j": e,
               "ann_over_snn_energy": {k: (ann_energy[k] / v if v else None) for k, v in e.items()}}
        row.update({k: v for k, v in by_T_acc.get(T, {}).items() if k != "T"})
        snn_rows.append(row)
    ann_acc = acc.get("ann_accuracy")
    on_spikes = sum(r["ann_macs"] for r in layer_rows if r["part"] == "spiking" and "analog input" not in r["inputs"]
                    and r["inputs"])
    tail = sum(r["ann_macs"] for r in layer_rows if r["part"] == "tail")
    share = {"total": cost.ann_macs, "spiking": on_spikes, "tail": tail, "prefix": cost.ann_macs - on_spikes - tail}
    return {
        "samples": int(acc["samples"]), "t0": acc["t0"], "Ts": Ts,
        "mac_share": share,
        "energy_models": [asdict(e) for e in energy],
        "ann": {"macs": cost.ann_macs, "accuracy": ann_acc, "energy_j": ann_energy},
        "snn": snn_rows,
        "sops90": sops_at_fraction(snn_rows, ann_acc, 0.90),
        "sops95": sops_at_fraction(snn_rows, ann_acc, 0.95),
        "neuron_layers": neuron_rows,
        "synaptic_layers": layer_rows,
    }


# -- presentation -------------------------------------------------------------------------------------

def _si(x: float, unit: str = "") -> str:
    for f, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def _joules(x: float) -> str:
    for f, p in ((1, "J"), (1e-3, "mJ"), (1e-6, "µJ"), (1e-9, "nJ"), (1e-12, "pJ")):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}"
    return f"{x:.3g} J"


def _pct(x: float | None) -> str:
    return f"{x * 100:.2f}%" if x is not None else "-"


def format_report(result: dict[str, Any], layer_T: int | None = None) -> str:
    """Markdown tables of a ``report`` result; per-layer tables at ``layer_T`` (default: the largest T)."""
    Ts = result["Ts"]
    layer_T = Ts[-1] if layer_T is None else layer_T
    if layer_T not in Ts:
        raise ConfigError(f"--layer-T {layer_T} is not one of the simulated T ({', '.join(map(str, Ts))})")
    j = Ts.index(layer_T)
    models = [e["name"] for e in result["energy_models"]]
    ann = result["ann"]
    conv = result.get("conventions", {})
    lines = [f"samples: {result['samples']}, readout t0: {result['t0']}, weights counted: "
             f"{conv.get('weights', 'dense')}, MACs: {conv.get('mac_count', 'dense')}, analog-input MACs: "
             f"{conv.get('analog_macs', 'once per input')}",
             "energy: " + "; ".join(f"{e['name']} = {e['note']}" for e in result["energy_models"]),
             f"ANN: {_si(ann['macs'])}MAC per input, accuracy {_pct(ann['accuracy'])}, energy "
             + ", ".join(f"{k} {_joules(v)}" for k, v in ann["energy_j"].items())]
    share = result.get("mac_share")
    if share and share["total"]:
        pct = {k: 100.0 * share[k] / share["total"] for k in ("spiking", "prefix", "tail")}
        lines.append(f"weighted work of the ANN: {pct['spiking']:.1f}% on spikes, {pct['prefix']:.1f}% in the "
                     f"time-constant analog prefix, {pct['tail']:.1f}% in the analog tail"
                     + (" (less than half spikes: see `ann2snn inspect`)" if pct["spiking"] < 50 else ""))
    lines.append("")
    head = "| T | accuracy | spikes/input | firing rate | SOPs/input | MACs/input | " + \
        " | ".join(f"energy {m} | ANN/SNN {m}" for m in models) + " |"
    lines += [head, "|" + "---|" * (6 + 2 * len(models))]
    for r in result["snn"]:
        cells = [str(r["T"]), _pct(r.get("accuracy")), _si(r["spikes_per_input"]), f"{r['firing_rate']:.4f}",
                 _si(r["sops_per_input"]), _si(r["macs_per_input"])]
        for m in models:
            ratio = r["ann_over_snn_energy"][m]
            cells += [_joules(r["energy_j"][m]), f"{ratio:.2f}x" if ratio is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for key, label in (("sops90", "SOPs90"), ("sops95", "SOPs95")):
        s = result.get(key)
        if ann["accuracy"] is None:
            lines.append(f"{label}: needs labels and the ANN (--ann)")
        elif s is None:
            lines.append(f"{label}: not reached at any simulated T")
        else:
            lines.append(f"{label}: {_si(s['sops_per_input'])}SOP per input at T={s['T']} "
                         f"(accuracy {_pct(s['accuracy'])}; " +
                         ", ".join(f"{k} {_joules(v)}" for k, v in s["energy_j"].items()) + ")")
    lines += ["", f"Neuron layers at T={layer_T}:", "",
              "| layer | neurons | mean fan-out | firing rate | spikes/input | SOPs/input |", "|---|---|---|---|---|---|"]
    for nl in result["neuron_layers"]:
        r = nl["by_T"][j]
        lines.append(f"| {nl['name']} | {nl['units']} | {nl['fanout_mean']:.1f} | {r['firing_rate']:.4f} | "
                     f"{_si(r['spikes_per_input'])} | {_si(r['sops_per_input'])} |")
    m0 = models[0]
    tot = sum(layer["by_T"][j]["energy_j"][m0] for layer in result["synaptic_layers"]) or 1.0
    lines += ["", f"Synaptic layers at T={layer_T}:", "",
              f"| layer | op | input from | SOPs/input | MACs/input | ANN MACs | share of {m0} energy |",
              "|---|---|---|---|---|---|---|"]
    for layer in result["synaptic_layers"]:
        r = layer["by_T"][j]
        lines.append(f"| {layer['name']} | {layer['op']} | {', '.join(layer['inputs']) or '-'} | "
                     f"{_si(r['sops_per_input'])} | {_si(r['macs_per_input'])} | {_si(layer['ann_macs'])} | "
                     f"{r['energy_j'][m0] / tot * 100:.1f}% |")
    return "\n".join(lines)


def require_matplotlib() -> None:
    """Raise PlotUnavailableError (naming ``pip install matplotlib``) if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailableError("--plot needs matplotlib, which is not installed; "
                                   "`pip install matplotlib` (or drop --plot)") from None


def plot_report(result: dict[str, Any], path: str | os.PathLike[str], energy_model: str | None = None) -> None:
    """Accuracy against energy per input (one point per T, the ANN as a reference line) and a
    per-layer bar chart of SOPs per input at each T, written atomically to ``path``."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [e["name"] for e in result["energy_models"]]
    Ts = result["Ts"]
    ann = result["ann"]
    labelled = any(r.get("accuracy") is not None for r in result["snn"])
    key = "accuracy" if labelled else "agreement" if any("agreement" in r for r in result["snn"]) else None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in ([energy_model] if energy_model else models):
        xs = [r["energy_j"][m] * 1e6 for r in result["snn"]]
        ys = [r[key] * 100 for r in result["snn"]] if key else Ts
        ax1.plot(xs, ys, "o-", label=f"SNN ({m})")
        for x, y, T in zip(xs, ys, Ts):
            ax1.annotate(f"T={T}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        color = ax1.lines[-1].get_color()
        ax1.axvline(ann["energy_j"][m] * 1e6, color=color, linestyle=":", label=f"ANN energy ({m})")
        if key == "accuracy" and ann["accuracy"] is not None:
            ax1.plot([ann["energy_j"][m] * 1e6], [ann["accuracy"] * 100], "*", color=color, markersize=12)
    if key == "accuracy" and ann["accuracy"] is not None:
        ax1.axhline(ann["accuracy"] * 100, color="gray", linestyle="--", label="ANN accuracy")
    ax1.set_xscale("log")
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
    ax1.set_xlabel("energy per input (µJ)")
    ax1.set_ylabel({"accuracy": "accuracy (%)", "agreement": "agreement with ANN (%)", None: "T"}[key])
    ax1.legend(fontsize=8)
    ax1.set_title("accuracy vs energy")
    layers = [la for la in result["synaptic_layers"] if any(r["sops_per_input"] for r in la["by_T"])]
    width = 0.8 / max(len(Ts), 1)
    x = np.arange(len(layers))
    for i, T in enumerate(Ts):
        ax2.bar(x + i * width, [la["by_T"][i]["sops_per_input"] for la in layers], width, label=f"T={T}")
    ax2.set_xticks(x + width * (len(Ts) - 1) / 2)
    ax2.set_xticklabels([la["name"] for la in layers], rotation=30, ha="right", fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("SOPs per input")
    ax2.set_title("SOPs per synaptic layer")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fmt = os.path.splitext(str(path))[1].lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
