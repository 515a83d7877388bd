"""IF neurons in units of their thresholds: the compile-time folding and the runtime's op swap.

An IFNeuron compares its membrane with a per-channel threshold θ and subtracts θ·spikes: five
elementwise kernels per step (Add, GreaterOrEqual, Cast, Mul, Sub). Measured in units of θ,
the same neuron has θ = 1. :func:`unit_form`, which the compiler applies when it emits a
model (passes/emit_spiking.py), folds the division by θ backwards into the weights that
produce each neuron's input current (a Conv's or Gemm's output channels, the constants of a
Mul or an Add, through Add / Sub / pooling / padding / resizing, which commute with a
positive per-channel scale, and through the running sum and running max states of a
cumulative max pool); where the chain holds anything else, one Mul by 1/θ is inserted. The
threshold tensors then hold ones. The spikes are those of the calibrated neuron up to the
float rounding of the folded weights (bit for bit when θ is a power of two).

:func:`exact_unit_ops`, at load time, replaces each IFNeuron whose threshold is all ones by
``UnitIFNeuron``: Add, a HardSigmoid that is exactly the step ``v' >= 1``, Sub: three kernels,
the same arithmetic bit for bit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ops import DEAD_THRESHOLD, DOMAIN, IF_OP, UNIT_IF_OP, unit_if_neuron_function
from .reference import ai_onnx_opset, value_types

log = logging.getLogger(__name__)

#: ops through which a positive per-channel scale of the output is a scale of input 0
_COMMUTING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Resize", "Upsample"}


@dataclass
class _Fold:
    """The edits that fold one neuron's 1/θ into the chain that produces its current."""

    scale: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> per-channel factor
    producers: list[onnx.NodeProto] = field(default_factory=list)  # nodes whose outputs are scaled
    constants: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (id(node), input) -> new value
    states: dict[str, np.ndarray] = field(default_factory=dict)  # state input -> per-channel factor


class _Folder:
    """Plans, per neuron, the constant edits that scale its current; reads the graph only."""

    def __init__(self, proto: onnx.ModelProto, nodes: list[onnx.NodeProto], state_out_of: dict[str, str],
                 ranks: dict[str, int]) -> None:
        g = proto.graph
        self.values = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.producer = {o: n for n in nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in nodes:
            for i in dict.fromkeys(n.input):
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.state_out_of = state_out_of
        self.state_of_out = {o: i for i, o in state_out_of.items()}
        self.ranks = ranks
        self.taken: set[str] = set()  # tensors already scaled for an earlier neuron

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.values:
            return self.values[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def fold(self, neuron: onnx.NodeProto, d: np.ndarray) -> _Fold | None:
        """The edits that divide ``neuron``'s current by θ (``d`` = 1/θ per channel), or None."""
        current = neuron.input[0]
        edits = _Fold()
        if not self._plan(current, d, edits):
            return None
        for s, f in edits.states.items():  # a scaled state must come back scaled the same way
            out = self.state_out_of[s]
            if out not in edits.scale or not np.array_equal(edits.scale[out], f):
                return None
        on_path = {id(n) for n in edits.producers}
        for t in edits.scale:
            if t in self.outputs and not (t in self.state_of_out and self.state_of_out[t] in edits.states):
                return None
            for user in self.consumers.get(t, []):
                if id(user) not in on_path and user is not neuron:
                    return None  # someone else reads a tensor that would change
        return edits

    def _zero_or_copying_pad(self, node: onnx.NodeProto, attrs: dict) -> bool:
        """A Pad that commutes with a positive scale: it copies edge / reflected values, or pads
        with a constant 0 (the attribute of opset < 11, or the optional third input)."""
        mode = attrs.get("mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            return True
        if float(attrs.get("value", 0.0)) != 0.0:
            return False
        if len(node.input) < 3 or not node.input[2]:
            return True
        value = self.constant(node.input[2])
        return value is not None and not np.any(value)

    def _plan(self, t: str, d: np.ndarray, edits: _Fold) -> bool:
        if t in edits.scale:
            return np.array_equal(edits.scale[t], d)
        if t in self.taken:
            return False
        edits.scale[t] = d
        if t in self.state_out_of:
            edits.states[t] = d
            return True
        node = self.producer.get(t)
        if node is None or node.domain not in ("", "ai.onnx") or list(node.output).index(t) != 0:
            return False
        op, rank = node.op_type, self.ranks.get(t)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if op == "Conv":
            w = self.constant(node.input[1])
            if w is None or d.size not in (1, w.shape[0]):
                return False
            d = np.broadcast_to(d, (w.shape[0],))
            edits.constants[(id(node), 1)] = (w * d.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
            if len(node.input) > 2 and node.input[2]:
                b = self.constant(node.input[2])
                if b is None:
                    return False
                edits.constants[(id(node), 2)] = (b * d).astype(np.float32)
        elif op == "Gemm":
            w, trans_b = self.constant(node.input[1]), int(attrs.get("transB", 0))
            if w is None or w.ndim != 2 or d.size not in (1, w.shape[0 if trans_b else 1]):
                return False
            d = np.broadcast_to(d, (w.shape[0 if trans_b else 1],))
            edits.constants[(id(node), 1)] = (w * (d[:, None] if trans_b else d[None, :])).astype(np.float32)
            if len(node.input) > 2 and node.input[2]:
                c = self.constant(node.input[2])
                if c is None or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
                    return False
                edits.constants[(id(node), 2)] = (c * d).astype(np.float32)
        elif op in ("Add", "Sub", "Mul"):
            if rank is None or rank < 2:
                return False
            per_channel = d.reshape((-1,) + (1,) * (rank - 2))
            varying = [k for k, i in enumerate(node.input) if self.constant(i) is None]
            if op == "Mul":  # x · c: scale the constant
                if len(varying) != 1:
                    return False
                k = 1 - varying[0]
                edits.constants[(id(node), k)] = (self.constant(node.input[k]) * per_channel).astype(np.float32)
            else:
                for k, i in enumerate(node.input):
                    if k in varying:
                        if not self._plan(i, d, edits):
                            return False
                    else:
                        edits.constants[(id(node), k)] = (self.constant(i) * per_channel).astype(np.float32)
        elif op in _COMMUTING or (op == "Pad" and self._zero_or_copying_pad(node, attrs)):
            if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
                return False
            if not self._plan(node.input[0], d, edits):
                return False
        else:
            return False
        edits.producers.append(node)
        return True


def _ranks(types: dict[str, onnx.TypeProto]) -> dict[str, int]:
    return {name: len(t.tensor_type.shape.dim) for name, t in types.items()
            if t.HasField("tensor_type") and t.tensor_type.HasField("shape")}


def _channels(theta: np.ndarray, rank: int | None) -> np.ndarray | None:
    """θ as a per-channel vector (axis 1 of a rank-``rank`` tensor it broadcasts against), if it
    is one, or as one value if it is a scalar."""
    if theta.size == 1:
        return theta.reshape(1).astype(np.float32)
    if rank is None or theta.ndim > rank:
        return None
    axis = 1 - (rank - theta.ndim)  # numpy broadcasting aligns the shapes from the right
    if axis < 0 or any(n != 1 for k, n in enumerate(theta.shape) if k != axis):
        return None
    return theta.reshape(-1).astype(np.float32)


def unit_form(proto: onnx.ModelProto, state_out_of: dict[str, str],
              types: dict[str, onnx.TypeProto] | None = None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The step model with every IFNeuron (constant θ > 0, per channel) in units of θ: 1/θ
    folded into its current, its threshold initializer holding ones; channels with the
    dead-channel threshold get their current multiplied by 0 (they never fire, as before).
    ``types``: the value types of ``proto``'s tensors if already inferred (ranks are read from them).

    Returns the new model and, per state it rescales, the factor (broadcastable to a sample)
    that converts a state of the step graph into this form's units (multiply) and back (divide).
    """
    original = list(proto.graph.node)  # one list, so that id() of a node stays valid
    folder = _Folder(proto, original, state_out_of, _ranks(types if types is not None else value_types(proto)))
    nodes = []
    for n in original:
        nodes.append(onnx.NodeProto())
        nodes[-1].CopyFrom(n)
    by_id = {id(n): k for k, n in enumerate(original)}
    extra_inits: list[onnx.TensorProto] = []
    factors: dict[str, np.ndarray] = {}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    ones: dict[str, np.ndarray] = {}  # threshold initializers that now hold ones
    folded = 0
    for k, node in enumerate(original):
        if node.domain != DOMAIN or node.op_type != IF_OP or len(node.input) < 3:
            continue
        theta = folder.constant(node.input[2])
        dc = _channels(theta, folder.ranks.get(node.input[0])) if theta is not None else None
        if dc is None or not np.all(np.isfinite(dc)) or np.any(dc <= 0) or node.input[1] not in state_out_of:
            continue
        # one value: a layer-wise threshold; a dead channel's current is dropped instead of divided by 1e30
        d = np.where(dc >= np.float32(DEAD_THRESHOLD), np.float32(0), 1.0 / dc).astype(np.float32)
        edits = folder.fold(node, d)
        current, replacement = node.input[0], []
        if edits is not None:
            folder.taken.update(edits.scale)
            for (nid, j), value in edits.constants.items():
                target = nodes[by_id[nid]]
                name = f"{target.name or target.output[0]}/unit_input{j}"
                extra_inits.append(numpy_helper.from_array(value, name))
                target.input[j] = name
            for s, f in edits.states.items():
                factors[s] = f.reshape((-1,) + (1,) * max(folder.ranks.get(s, 2) - 2, 0))
            folded += 1
        else:  # one Mul by 1/θ in front of the neuron
            rank = folder.ranks.get(current, 2)
            name = f"{node.name}/inverse_threshold"
            extra_inits.append(numpy_helper.from_array(d.reshape((-1,) + (1,) * max(rank - 2, 0)), name))
            replacement.append(helper.make_node("Mul", [current, name], [f"{current}/in_thresholds"],
                                                name=f"{node.name}/to_unit"))
            current = f"{current}/in_thresholds"
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        kept.input[0] = current
        replacement.append(kept)
        ones[node.input[2]] = np.ones(theta.shape, np.float32)
        factors[node.input[1]] = d.reshape(theta.shape)
        replaced[k] = replacement
    if not replaced:
        return proto, {}
    new = onnx.ModelProto()
    _copy_fields(proto, new, skip={"graph"})
    _copy_fields(proto.graph, new.graph, skip={"node", "initializer"})  # the weights are copied once, below
    for k, n in enumerate(nodes):
        new.graph.node.extend(replaced.get(k, [n]))
    used = {i for n in new.graph.node for i in n.input} | {i.name for i in new.graph.input}
    new.graph.initializer.extend(numpy_helper.from_array(ones[i.name], i.name) if i.name in ones else i
                                 for i in proto.graph.initializer if i.name in used)  # folded ones replaced
    new.graph.initializer.extend(extra_inits)
    log.debug("unit-threshold form: %d IF neurons, %d with 1/θ folded into their inputs", len(replaced), folded)
    return new, factors


def _copy_fields(src: onnx.ModelProto | onnx.GraphProto, dst: onnx.ModelProto | onnx.GraphProto, skip: set[str]) -> None:
    """Copy every set field of ``src`` into ``dst`` except those named in ``skip``."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if isinstance(value, (str, bytes, int, float)):
            setattr(dst, fd.name, value)
        elif hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        else:
            getattr(dst, fd.name).CopyFrom(value)


def exact_unit_ops(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with every IFNeuron whose threshold is a constant of ones replaced by
    UnitIFNeuron: the same arithmetic bit for bit (v' = v + I; the HardSigmoid step is exactly
    v' >= 1; v' - 1·s = v' - s), in three elementwise kernels instead of five. The compiler
    emits its IF neurons in units of their thresholds (see :func:`unit_form`), so every IF
    neuron of a model compiled by this version qualifies; others are left as they are."""
    values = {i.name: i for i in proto.graph.initializer}
    targets = []
    for k, node in enumerate(proto.graph.node):
        if node.domain == DOMAIN and node.op_type == IF_OP and len(node.input) == 3 and node.input[2] in values:
            theta = numpy_helper.to_array(values[node.input[2]])
            if theta.dtype == np.float32 and theta.size and np.all(theta == np.float32(1)):
                targets.append(k)
    if not targets:
        return proto
    new = onnx.ModelProto()
    _copy_fields(proto, new, skip={"graph"})
    _copy_fields(proto.graph, new.graph, skip={"node", "initializer"})
    chosen = set(targets)
    for k, node in enumerate(proto.graph.node):
        if k in chosen:
            new.graph.node.append(helper.make_node(UNIT_IF_OP, [node.input[0], node.input[1]], list(node.output),
                                                   domain=DOMAIN, name=node.name))
        else:
            new.graph.node.append(node)
    used = {i for n in new.graph.node for i in n.input} | {o.name for o in new.graph.output}
    new.graph.initializer.extend(i for i in proto.graph.initializer if i.name in used)
    if not any(f.domain == DOMAIN and f.name == UNIT_IF_OP for f in new.functions):
        new.functions.append(unit_if_neuron_function(ai_onnx_opset(new)))
    log.debug("unit-threshold neuron kernel for %d IF neurons", len(targets))
    return new
