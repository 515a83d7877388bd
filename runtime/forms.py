"""Faster execution forms of a spiking step model, derived from it at load time.

The stateful step graph stays the artifact; this module only reads it. Each form keeps the
invariant stated in runtime/reference.py: the reference's step outputs and states.

* **Prefix split.** Nodes whose inputs are constant in time (input normalisation, the
  first convolution under direct coding) form a *prefix* model, run once per input. The
  *reduced step* model takes the prefix's outputs as inputs and runs every step.
  The states are bound to two preallocated buffer sets used in turn (IOBinding).
* **Layered (multi-step) execution.** The stateful nodes (IF, signed and symmetric neurons,
  the accumulate / increment ops of cumulative max pooling, and the expectation-compensated
  ops with their running sums, total and step count) are the only nodes that link timesteps; every
  other per-step node acts on each sample alone (checked against a table; otherwise the
  form is refused and the step form is used). So a *chunk model* runs Tc timesteps in one
  call: each stateless node once on a batch of Tc·B (one larger Conv / Gemm instead of Tc
  small ones), each stateful node unrolled Tc times through its state(s) (a compensated op
  whose steps are linked only by its running sums and count runs its Tc steps at once). The neuron ops
  keep their own functions (the same float32 arithmetic). Time goes in chunks, so memory does not grow
  with T; an unrolled chunk is one onnxruntime call with top-level ops only (a Loop / Scan
  body runs slower).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ann2snn.device import CPU_EP, open_session

from .compensation import is_compensated
from .kernels import COUNTING_KERNEL_OPS, KERNEL_DOMAIN
from .ops import COUNTING_OPS, DOMAIN, IF_OP, NEURON_OPS, SYMMETRIC_OPS, UNIT_IF_OP
from .reference import ai_onnx_opset, value_types

log = logging.getLogger(__name__)

#: ops known to act on each sample of the batch (axis 0) independently, with the attribute
#: checks that keep them so (StepPlan._check_per_sample); anything else in a stage makes the
#: layered form refuse the graph. Elementwise ops broadcast against constants or other [B, ...]
#: tensors; the rest are listed in the tables below
_PER_SAMPLE = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Sum", "Relu", "Clip",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "MaxPool", "Flatten", "Pad", "Resize", "Upsample",
    "Identity", "Cast", "Neg", "Abs", "Max", "Min", "BatchNormalization", "LeakyRelu", "Sigmoid",
    "Tanh", "Softmax", "Concat", "Split", "Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
    "Constant", "Exp", "Sqrt", "Pow", "Where", "Equal", "Greater", "Less", "GreaterOrEqual",
    # the modern activations and the ops of transformers (issue 16)
    "Erf", "Gelu", "HardSigmoid", "HardSwish", "PRelu", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Mish",
    "ThresholdedRelu", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "LessOrEqual", "Not", "And", "Or",
    "IsNaN", "IsInf", "LayerNormalization", "InstanceNormalization", "GroupNormalization", "LogSoftmax",
    "Hardmax", "LpNormalization", *(f"Reduce{r}" for r in ("Mean", "Sum", "Max", "Min", "Prod", "L1", "L2",
                                                          "SumSquare", "LogSum", "LogSumExp")),
}
#: the model-local activation functions of canonicalize_activations (domain ann2snn.activations):
#: elementwise, or (LayerNormalization) normalising from its ``axis`` on
_PER_SAMPLE_FUNCTIONS = {"SiLU", "HardSwish", "Gelu", "GeluTanh", "LayerNormalization"}
_ACTIVATION_DOMAIN = "ann2snn.activations"
#: ops whose ``axis`` attribute must not name the batch axis, with its default (None: required).
#: Softmax / LogSoftmax / Hardmax before opset 13 coerce to 2-D at ``axis`` (default 1): the
#: batch stays in the leading part as long as the axis is not 0. LayerNormalization normalises
#: over the axes from ``axis`` on, so 0 would mix the samples
_AXIS_OPS = {"Concat": None, "Split": 0, "Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "Flatten": 1,
             "LayerNormalization": -1, "LpNormalization": -1}


#: the layered form runs an expectation-compensated op's steps at once where it can
#: (StepPlan._over_time); False unrolls every one, one copy per step
OVER_TIME = True

#: the layered form declares its spike tensors' shapes (see _subgraph_model); False builds chunk
#: models without them, as before (benchmarks/kernels.py --without-shapes times both)
SHAPE_SPIKES = True


@dataclass
class Cut:
    """A stateful node: ``drive`` is computed by the graph, ``produced`` is fed back to it."""

    kind: str  # "if" | "signed" | "accumulate" | "increment" | "chain"
    drive: str
    produced: str
    state_in: str
    state_out: str
    node: str
    count_in: str = ""  # "signed": the spike-count state, the node's second one
    count_out: str = ""
    #: "chain" (an expectation-compensated op): every (state input, state output) of the node,
    #: in the order of its inputs; its outputs are its result(s), then these states' next values
    chain: tuple[tuple[str, str], ...] = ()
    #: "chain": the op's function when its steps can run at once (see StepPlan._over_time), else None
    body: onnx.FunctionProto | None = None


def _emits_totals(body: onnx.FunctionProto) -> bool:
    """Whether a compensated function is in its totals form (runtime/compensation.py,
    ``totals``): it returns its totals and keeps no total state (it forms no increment)."""
    return not any(n.name == "increment" for n in body.node)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _subgraph_model(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str],
                    types: dict[str, onnx.TypeProto], name: str, shaped: Iterable[str] = ()) -> onnx.ModelProto:
    """A model of ``nodes`` (in order) with the given inputs and outputs; shapes left symbolic.
    ``shaped``: inner tensors whose types (batch axis symbolic) are given as value_info."""
    used = {i for n in nodes for i in n.input} | set(outputs)
    inits = [i for i in proto.graph.initializer if i.name in used and i.name not in inputs]

    def vi(tensor: str) -> onnx.ValueInfoProto:
        info = onnx.ValueInfoProto(name=tensor)
        if tensor in types:
            info.type.CopyFrom(types[tensor])
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
                dims = info.type.tensor_type.shape.dim
                if len(dims):  # the batch becomes Tc·B in the layered form
                    dims[0].Clear()
                    dims[0].dim_param = "rows"
        else:
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        return info

    graph = helper.make_graph(nodes, name, [vi(i) for i in inputs], [vi(o) for o in outputs], inits)
    # onnxruntime's layout optimiser fuses a residual Add into the Conv before it only where it
    # knows the shapes of both sides equal: it cannot infer them through a compiled kernel
    # (a custom op's symbolic shapes do not come through), nor through the layered form's
    # Split / Concat of the steps. The fusion changes the sum's last bits, so every form gets
    # the shapes the reference (the step graph with the neuron functions inlined) has
    shaped = set(shaped) | {n.output[0] for n in nodes if n.domain == KERNEL_DOMAIN}
    graph.value_info.extend(vi(t) for t in sorted(shaped) if t in types and t not in outputs and t not in inputs)
    model = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    return model


class StepPlan:
    """The step model split into a prefix (time-constant) part and the per-step remainder,
    plus, when the graph allows it, the stages of the layered form."""

    def __init__(self, proto: onnx.ModelProto, states: list[tuple[str, str, tuple[int, ...]]], step_outputs: list[str],
                 session_options: ort.SessionOptions, types: dict[str, onnx.TypeProto] | None = None,
                 providers: Sequence[Any] = (CPU_EP,)) -> None:
        """``states``: (state input, state output, sample shape) of every state. ``types``: the
        value types of ``proto``'s tensors if already inferred (tensors without one are taken as
        float). ``providers``: the onnxruntime providers of every session (ann2snn.device)."""
        self.proto, self.step_outputs, self.so = proto, list(step_outputs), session_options
        self.providers = list(providers)
        graph = proto.graph
        self.state_order = [i for i, _, _ in states]
        self.state_in = set(self.state_order)
        self.state_out_of = {i: o for i, o, _ in states}
        self.state_shape = {i: tuple(int(d) for d in shape) for i, _, shape in states}
        self.inits = {i.name for i in graph.initializer}
        self.data_inputs = [i.name for i in graph.input if i.name not in self.state_in and i.name not in self.inits]
        self.types = types if types is not None else value_types(proto)
        static_made: set[str] = set(self.inits)
        varying: set[str] = set(self.state_in)
        statics, prefix_nodes, rest_nodes = [], [], []
        for node in graph.node:  # nodes are in topological order (checked by onnx.checker)
            ins = [i for i in node.input if i]
            if all(i in static_made for i in ins):  # constants only: copied to whoever needs them
                static_made.update(node.output)
                statics.append(node)
            elif any(i in varying for i in ins):
                varying.update(node.output)
                rest_nodes.append(node)
            else:
                prefix_nodes.append(node)
        self.statics, self.static_made, self.varying = statics, static_made, varying
        #: step outputs computed every step, and those constant in time (computed once by the
        #: prefix, or a data input): the reduced step model outputs only the former. A graph
        #: output that is not computed by the reduced model would be one of its inputs passed
        #: through, and onnxruntime does not write such an output into a bound buffer: that left
        #: uninitialised memory in every step after the first (the no-neuron and mostly-analog
        #: graphs of issue 22)
        self.varying_outputs = [o for o in step_outputs if o in varying]
        self.constant_outputs = [o for o in step_outputs if o not in varying]
        needed = {i for n in rest_nodes for i in n.input} | set(step_outputs)
        made_here = dict.fromkeys(o for n in prefix_nodes for o in n.output)
        made_here.update((o, None) for o in self.constant_outputs if o in static_made)
        self.prefix_outputs = [t for t in made_here if t in needed]
        self.prefix_nodes = self._static_closure(prefix_nodes + [helper.make_node("Identity", [o], [o])
                                                                 for o in self.constant_outputs if o in static_made],
                                                 statics) + prefix_nodes
        self.rest_nodes = self._static_closure(rest_nodes, statics) + rest_nodes
        self._static_ids = {id(n) for n in statics}
        used = {i for n in rest_nodes for i in n.input}
        #: inputs of the reduced step model: states, prefix outputs, data inputs used directly
        self.reduced_inputs = (self.state_order + self.prefix_outputs + [i for i in self.data_inputs if i in used])
        self.prefix: ort.InferenceSession | None = None
        self.reduced: ort.InferenceSession | None = None
        #: outputs of the reduced step model: the varying step outputs, then the next states
        self.reduced_outputs = self.varying_outputs + [self.state_out_of[s] for s in self.state_order]
        if self.prefix_outputs and self.reduced_outputs:
            self.prefix = self._session(self.prefix_nodes, self.data_inputs, self.prefix_outputs, "ann2snn_prefix")
            self.reduced = self._session(self.rest_nodes, self.reduced_inputs, self.reduced_outputs,
                                         "ann2snn_step_reduced")
        elif self.prefix_outputs and not self.reduced_outputs:  # nothing varies (no neuron): the prefix is all
            self.prefix = self._session(self.prefix_nodes, self.data_inputs, self.prefix_outputs, "ann2snn_prefix")
        self.inplace = self._inplace_states()
        self.cuts: dict[str, Cut] | None = None
        self.refusal: str | None = None
        try:
            self.cuts = self._check_layered()
        except _Refuse as exc:
            self.refusal = str(exc)
            log.info("layered execution not available: %s", exc)
        self._chunk_sessions: dict[int, ort.InferenceSession] = {}

    def _inplace_states(self) -> set[str]:
        """States whose next value may be written over the current one: the state is read by
        one node only, and that node reads it before anything writes the next value (an
        IFNeuron's integrate step; the elementwise Add of a running sum)."""
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.rest_nodes:
            for i in dict.fromkeys(node.input):
                consumers.setdefault(i, []).append(node)
        outputs = {o.name for o in self.proto.graph.output}
        safe = set()
        for s_in in self.state_order:
            users = consumers.get(s_in, [])
            if len(users) != 1 or s_in in outputs:
                continue
            node, s_out = users[0], self.state_out_of[s_in]
            # a neuron's states are its inputs / outputs 1 (v) and, for the counting ops, 2 (count):
            # v is read once by the integrate step; count is read by the elementwise Add that writes
            # count_next, which depends (through the spikes) on every other read of count
            # (the kernels read each element of a state before writing its next value)
            positions = (1, 2) if node.op_type in (*COUNTING_OPS, *COUNTING_KERNEL_OPS) else (1,)
            neuron = ((node.domain == DOMAIN and node.op_type in (*NEURON_OPS, UNIT_IF_OP))
                      or node.domain == KERNEL_DOMAIN) \
                and list(node.input).count(s_in) == 1 \
                and any(node.input[k] == s_in and node.output[k] == s_out for k in positions)
            running_sum = node.domain in ("", "ai.onnx") and node.op_type == "Add" and node.output[0] == s_out
            if neuron or running_sum:
                safe.add(s_in)
        return safe

    def _session(self, nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str], name: str) -> ort.InferenceSession:
        model = _subgraph_model(self.proto, nodes, inputs, outputs, self.types, name)
        return open_session(model.SerializeToString(), self.so, self.providers, "the step graph")

    def chunk_session(self, steps: int) -> ort.InferenceSession:
        """The session of :meth:`chunk_model` for ``steps`` timesteps (built once, then cached)."""
        if steps not in self._chunk_sessions:
            self._chunk_sessions[steps] = open_session(self.chunk_model(steps).SerializeToString(), self.so,
                                                       self.providers, "the layered step graph")
        return self._chunk_sessions[steps]

    # -- layered form ---------------------------------------------------------------------
    def _cuts(self) -> dict[str, Cut]:
        """Recognise every node that touches a state; refuse the graph for anything else."""
        cuts: dict[str, Cut] = {}
        state_outs = set(self.state_out_of.values())
        for node in self.proto.graph.node:
            touching = [i for i in node.input if i in self.state_in]
            if not touching:
                continue
            if not node.name or node.name in cuts:
                raise _Refuse("a stateful node without a unique name")
            # the symmetric neuron (signed activation sites, re-spiked compensated ops) has the
            # IF neuron's signature: (current, v, threshold) -> (spikes, v_next)
            single = (node.domain == DOMAIN and node.op_type in (IF_OP, UNIT_IF_OP, *SYMMETRIC_OPS)) \
                or (node.domain == KERNEL_DOMAIN and node.op_type == "IFChunk")
            counting = (node.domain == DOMAIN and node.op_type in COUNTING_OPS) \
                or (node.domain == KERNEL_DOMAIN and node.op_type in COUNTING_KERNEL_OPS)
            if single and node.input[1] in self.state_in \
                    and node.input[0] not in self.state_in and node.output[1] == self.state_out_of[node.input[1]]:
                if any(i in self.varying for i in node.input[2:]):
                    raise _Refuse(f"threshold of {node.name} varies in time")
                cuts[node.name] = Cut("if", node.input[0], node.output[0], node.input[1], node.output[1], node.name)
            elif counting and len(touching) == 2 \
                    and node.input[1] in self.state_in and node.input[2] in self.state_in \
                    and node.output[1] == self.state_out_of[node.input[1]] \
                    and node.output[2] == self.state_out_of[node.input[2]]:
                if node.input[3] in self.varying:
                    raise _Refuse(f"threshold of {node.name} varies in time")
                cuts[node.name] = Cut("signed", node.input[0], node.output[0], node.input[1], node.output[1], node.name,
                                      node.input[2], node.output[2])
            elif is_compensated(node):
                cuts[node.name] = self._compensated_cut(node, touching)
            elif node.op_type == "Add" and len(touching) == 1 and node.output[0] == self.state_out_of[touching[0]]:
                other = node.input[1] if node.input[0] == touching[0] else node.input[0]
                cuts[node.name] = Cut("accumulate", other, node.output[0], touching[0], node.output[0], node.name)
            elif node.op_type == "Sub" and node.input[1] in self.state_in and node.input[0] in state_outs \
                    and self.state_out_of[node.input[1]] == node.input[0]:
                cuts[node.name] = Cut("increment", node.input[0], node.output[0], node.input[1], node.input[0], node.name)
            else:
                raise _Refuse(f"node {node.name} ({node.op_type}) uses a state in an unrecognised way")
        return cuts

    def _compensated_cut(self, node: onnx.NodeProto, touching: list[str]) -> Cut:
        """An expectation-compensated op (runtime/compensation.py): its states (the running sum
        of each time-varying input, the previous total) are its inputs in order, and its
        outputs after the first are their next values in the same order."""
        if len(set(touching)) != len(touching) or len(node.output) != 1 + len(touching) \
                or list(node.output[1:]) != [self.state_out_of[s] for s in touching]:
            raise _Refuse(f"node {node.name} ({node.op_type}): its states are not fed back one to one")
        if ai_onnx_opset(self.proto) < 13 and any(i in self.varying and self._sample_shape(i) is None
                                                  for i in node.input if i not in self.state_in):
            raise _Refuse(f"node {node.name} ({node.op_type}): an input of unknown shape under opset < 13")
        return Cut("chain", "", node.output[0], touching[0], self.state_out_of[touching[0]], node.name,
                   chain=tuple((s, self.state_out_of[s]) for s in touching), body=self._over_time(node, touching))

    def _over_time(self, node: onnx.NodeProto, touching: list[str]) -> onnx.FunctionProto | None:
        """The function of compensated ``node`` if all its steps of a chunk can run at once, else
        None (it is then unrolled, one copy per step). Its only links between steps are running
        sums (a CumSum over time, the same sequential adds) and the step count (exact integers),
        so the op itself, f(S_t / t), runs once on the chunk's Tc·B rows, and the increments are
        time differences of the totals t·f(·): the step graph's arithmetic, element for element.
        Not for a guarded op (a total kept where it is not finite depends on the one before), an
        op that may not act per sample, or a function of another shape than compensation.py's."""
        if not SHAPE_SPIKES or not OVER_TIME:
            return None
        body = next((f for f in self.proto.functions if f.domain == node.domain and f.name == node.op_type), None)
        if body is None:
            return None
        names = [n.name for n in body.node]
        emits_totals = _emits_totals(body)
        k = len(touching) - (0 if emits_totals else 1)  # running sums, then the total
        expected = {"op", "total", *(() if emits_totals else ("increment",)), *(f"accumulate{i}" for i in range(k)),
                    *(f"mean{i}" for i in range(k))}
        named = [n for n in names if n]
        if k < 1 or not expected <= set(names) or len(named) != len(set(named)) \
                or set(names) - expected - {"", "row_max", "shift", "scale"}:
            return None  # e.g. the guard's nodes (is_nan, ...): unrolled
        inner = next(n for n in body.node if n.name == "op")
        formal = list(body.input)
        actual = dict(zip(formal, node.input))
        proxy = onnx.NodeProto()
        proxy.CopyFrom(inner)
        del proxy.input[:]
        # the op's own inputs as the node's: a mean (or the max-shifted mean0) has its input's shape
        proxy.input.extend(actual[f"x{i[4:]}"] if i.startswith("mean") else actual["x0"] if i == "shifted"
                           else actual.get(i, i) for i in inner.input)
        proxy.name = node.name
        per_sample = (inner.op_type in _PER_SAMPLE and inner.domain in ("", "ai.onnx")) \
            or (inner.op_type in _PER_SAMPLE_FUNCTIONS and inner.domain == _ACTIVATION_DOMAIN)
        try:
            if not per_sample:
                return None
            self._check_per_sample(proxy)
        except _Refuse:
            return None
        if self._rank(node.output[0]) is None or any(self._rank(actual[f"x{i}"]) is None for i in range(k)):
            return None
        return body

    def _sample_shape(self, tensor: str) -> tuple[int, ...] | None:
        """The shape of one sample of ``tensor`` (all but the batch axis), if known."""
        t = self.types.get(tensor)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dims = t.tensor_type.shape.dim[1:]
        return tuple(int(d.dim_value) for d in dims) if all(d.HasField("dim_value") for d in dims) else None

    def _check_layered(self) -> dict[str, Cut]:
        """The cuts, after checking that every other per-step node acts on each sample alone."""
        cuts = self._cuts()
        handled = {c.state_in for c in cuts.values()} | {c.count_in for c in cuts.values() if c.count_in} \
            | {s for c in cuts.values() for s, _ in c.chain}
        if handled != self.state_in:
            raise _Refuse("some states are not handled by a recognised stateful node")
        for node in self.rest_nodes:
            if node.name in cuts or id(node) in self._static_ids:
                continue
            if not (node.op_type in _PER_SAMPLE and node.domain in ("", "ai.onnx")
                    or node.op_type in _PER_SAMPLE_FUNCTIONS and node.domain == _ACTIVATION_DOMAIN):
                raise _Refuse(f"node {node.name} ({node.domain}::{node.op_type}) is not known to act per sample")
            self._check_per_sample(node)
        return cuts

    def chunk_model(self, steps: int) -> onnx.ModelProto:
        """The step graph unrolled over ``steps`` timesteps with every layer batched over them.

        Inputs: the prefix outputs (and data inputs) at batch B, and the states; outputs: the
        step outputs as ``[steps·B, ...]`` (time-major) and the states after the last step.
        Each stateless node runs once on all steps; each stateful node becomes ``steps``
        copies of itself chained through its state(s) (IFNeuron keeps its exact arithmetic),
        except running sums and increments (a CumSum / a difference over time) and the
        compensated ops that allow it (running sums by CumSum, the op once on all rows:
        StepPlan._over_time).
        """
        if self.cuts is None:
            raise ValueError(f"layered execution is not available: {self.refusal}")
        nodes: list[onnx.NodeProto] = []
        inits: list[onnx.TensorProto] = []
        by_node = {c.node: c for c in self.cuts.values()}
        tiled: dict[str, str] = {}
        opset = ai_onnx_opset(self.proto)

        def const(name: str, values: list[int] | int) -> str:
            inits.append(onnx.numpy_helper.from_array(np.asarray(values, np.int64), name))
            return name

        def tile(x: str) -> str:
            """A time-constant [B, ...] tensor repeated for every step: [steps·B, ...]."""
            if x not in tiled:
                p = f"{x}@tile"
                nodes.extend([
                    helper.make_node("Unsqueeze", [x, const(f"{p}/axes", [0])], [f"{p}/u"]),
                    helper.make_node("Shape", [x], [f"{p}/shape"]),
                    helper.make_node("Concat", [const(f"{p}/steps", [steps]), f"{p}/shape"], [f"{p}/full"], axis=0),
                    helper.make_node("Expand", [f"{p}/u", f"{p}/full"], [f"{p}/e"]),
                    helper.make_node("Slice", [f"{p}/shape", const(f"{p}/one", [1]), const(f"{p}/end", [2 ** 62])],
                                     [f"{p}/sample"]),
                    helper.make_node("Concat", [const(f"{p}/minus1", [-1]), f"{p}/sample"], [f"{p}/flat"], axis=0),
                    helper.make_node("Reshape", [f"{p}/e", f"{p}/flat"], [p]),
                ])
                tiled[x] = p
            return tiled[x]

        split: dict[str, list[str]] = {}

        def per_step(x: str, shape: tuple[int, ...]) -> list[str]:
            """[steps·B, ...] -> one [B, ...] tensor per step (time-major rows: one Split; once
            per tensor, however many stateful nodes read it)."""
            p = f"{x}@steps"
            if x in split:
                return split[x]
            out = split[x] = [f"{p}/{t}" for t in range(steps)]
            if steps == 1:
                nodes.append(helper.make_node("Identity", [x], out))
            elif opset >= 18:
                nodes.append(helper.make_node("Split", [x], out, axis=0, num_outputs=steps))
            elif opset >= 13:  # the split sizes are an input: B each, from the tensor's shape
                nodes.extend([
                    helper.make_node("Shape", [x], [f"{p}/full"]),
                    helper.make_node("Slice", [f"{p}/full", const(f"{p}/s", [0]), const(f"{p}/e", [1])], [f"{p}/rows"]),
                    helper.make_node("Div", [f"{p}/rows", const(f"{p}/steps", [steps])], [f"{p}/batch"]),
                    helper.make_node("Expand", [f"{p}/batch", const(f"{p}/n", [steps])], [f"{p}/sizes"]),
                    helper.make_node("Split", [x, f"{p}/sizes"], out, axis=0),
                ])
            else:  # older Split takes its sizes as an attribute, unknown here: a Gather per step
                nodes.append(helper.make_node("Reshape", [x, const(f"{p}/shape", [steps, -1, *shape])], [p]))
                nodes.extend(helper.make_node("Gather", [p, const(f"{p}/{t}/i", t)], [o], axis=0)
                             for t, o in enumerate(out))
            return out

        def with_state(cut: Cut, x: str, p: str, shape: tuple[int, ...]) -> tuple[str, str]:
            """``x`` ([steps·B, ...]) time-major as [steps, B, ...], and [state, x_1, ..., x_n]."""
            nodes.extend([
                helper.make_node("Reshape", [x, const(f"{p}/shape", [steps, -1, *shape])], [f"{p}/x"]),
                helper.make_node("Unsqueeze", [cut.state_in, const(f"{p}/axes", [0])], [f"{p}/prev"]),
                helper.make_node("Concat", [f"{p}/prev", f"{p}/x"], [f"{p}/all"], axis=0),
            ])
            return f"{p}/x", f"{p}/all"

        def back_to_rows(cut: Cut, seq: str, last_of: str, p: str, shape: tuple[int, ...]) -> None:
            """``seq`` ([steps, B, ...]) as the cut's output rows; the state after the chunk is the
            last step of ``last_of``."""
            nodes.extend([
                helper.make_node("Reshape", [seq, const(f"{p}/flat", [-1, *shape])], [cut.produced]),
                helper.make_node("Gather", [last_of, const(f"{p}/last", steps - 1)], [f"{cut.state_out}@out"], axis=0),
            ])

        def chain_copies(node: onnx.NodeProto, cut: Cut) -> None:
            """``steps`` copies of ``node``, step t reading the states step t-1 wrote, the
            time-varying inputs' rows of step t and the time-constant ones as they are; its
            results are concatenated over the steps under their own names."""
            prev = {s_in: s_in for s_in, _ in cut.chain}  # state input -> its value before this step
            nexts = {s_out for _, s_out in cut.chain}
            results = [o for o in node.output if o not in nexts]
            for t in range(steps):
                tag = "out" if t == steps - 1 else str(t)
                ins = [prev[i] if i in prev else per_step(i, self._sample_shape(i) or ())[t] if i in self.varying else i
                       for i in node.input]
                outs = [f"{o}@{tag}" if o in nexts else f"{o}@{t}" for o in node.output]
                copy = helper.make_node(node.op_type, ins, outs, domain=node.domain, name=f"{node.name}@{t}")
                copy.attribute.extend(node.attribute)
                nodes.append(copy)
                prev = {s_in: f"{s_out}@{tag}" for s_in, s_out in cut.chain}
            nodes.extend(helper.make_node("Concat", [f"{o}@{t}" for t in range(steps)], [o], axis=0) for o in results)

        def rows(x: str) -> str:
            """``x`` as [steps·B, ...]: itself where it varies or is a constant, else tiled."""
            return x if x in self.varying or x in self.static_made or not x else tile(x)

        def over_time(node: onnx.NodeProto, cut: Cut) -> None:
            """The compensated op's chunk at once (see StepPlan._over_time): running sums by CumSum
            over time, f(S/t)·t on all rows (t of every row: the step counter's rows), increments
            as the totals' differences over time."""
            body, p = cut.body, f"{node.name}@time"
            assert body is not None
            states = [s_in for s_in, _ in cut.chain]
            emits_totals = _emits_totals(body)
            k = len(states) - (0 if emits_totals else 1)
            actual = dict(zip(body.input, node.input))
            rename = {o: f"{p}/{o}" for n in body.node for o in n.output}

            for i in range(k):  # the running sums of every step: [sum, x_1, ..., x_n] summed over time
                shape = self.state_shape[states[i]]
                q = f"{p}/sum{i}"
                nodes.extend([
                    helper.make_node("Reshape", [rows(actual[f"x{i}"]), const(f"{q}/shape", [steps, -1, *shape])],
                                     [f"{q}/x"]),
                    helper.make_node("Unsqueeze", [states[i], const(f"{q}/axes", [0])], [f"{q}/prev"]),
                    helper.make_node("Concat", [f"{q}/prev", f"{q}/x"], [f"{q}/all"], axis=0),
                    helper.make_node("CumSum", [f"{q}/all", const(f"{q}/axis", 0)], [f"{q}/sums"]),
                    helper.make_node("Slice", [f"{q}/sums", const(f"{q}/s", [1]), const(f"{q}/e", [steps + 1])],
                                     [f"{q}/run"]),
                    helper.make_node("Reshape", [f"{q}/run", const(f"{q}/flat", [-1, *shape])], [rename[f"sum{i}_next"]]),
                    helper.make_node("Gather", [f"{q}/run", const(f"{q}/last", steps - 1)],
                                     [f"{cut.chain[i][1]}@out"], axis=0),
                ])
            for n in body.node:  # the means, the op and the totals, renamed; t per row
                if n.name == "increment" or n.name.startswith("accumulate"):
                    continue
                copy = onnx.NodeProto()
                copy.CopyFrom(n)
                del copy.input[:]
                for i in n.input:
                    if i in rename:
                        i = rename[i]
                    elif i in actual:
                        i = rows(actual[i])
                    copy.input.append(i)
                del copy.output[:]
                copy.output.extend(rename[o] for o in n.output)
                copy.name = f"{p}/{n.name}" if n.name else ""
                nodes.append(copy)
            if emits_totals:  # the totals are the output: nothing kept between steps
                nodes.append(helper.make_node("Identity", [rename["total_next"]], [node.output[0]]))
                return
            # the increments: the totals' differences over time, [total, total_1, ..., total_n]
            total_in = states[k]
            shape, q = self.state_shape[total_in], f"{p}/inc"
            nodes.extend([
                helper.make_node("Reshape", [rename["total_next"], const(f"{q}/shape", [steps, -1, *shape])],
                                 [f"{q}/totals"]),
                helper.make_node("Unsqueeze", [total_in, const(f"{q}/axes", [0])], [f"{q}/prev"]),
                helper.make_node("Concat", [f"{q}/prev", f"{q}/totals"], [f"{q}/all"], axis=0),
                helper.make_node("Slice", [f"{q}/all", const(f"{q}/s1", [1]), const(f"{q}/e1", [steps + 1])], [f"{q}/hi"]),
                helper.make_node("Slice", [f"{q}/all", const(f"{q}/s0", [0]), const(f"{q}/e0", [steps])], [f"{q}/lo"]),
                helper.make_node("Sub", [f"{q}/hi", f"{q}/lo"], [f"{q}/d"]),
                helper.make_node("Reshape", [f"{q}/d", const(f"{q}/flat", [-1, *shape])], [node.output[0]]),
                helper.make_node("Gather", [f"{q}/totals", const(f"{q}/last", steps - 1)], [f"{cut.chain[k][1]}@out"],
                                 axis=0),
            ])

        for node in self.rest_nodes:
            cut = by_node.get(node.name)
            if cut is None:
                new = onnx.NodeProto()
                new.CopyFrom(node)
                if node not in self.statics:
                    for k, i in enumerate(new.input):
                        if i and i not in self.varying and i not in self.static_made:
                            new.input[k] = tile(i)
                nodes.append(new)
                continue
            shape = self.state_shape[cut.state_in]
            constant = cut.drive not in self.varying
            if cut.kind == "increment":  # what the max pool added this step: the running max's time difference
                p = f"{cut.produced}@inc"
                seq, stack = with_state(cut, cut.drive if not constant else tile(cut.drive), p, shape)
                nodes.extend([
                    helper.make_node("Slice", [stack, const(f"{p}/s1", [1]), const(f"{p}/e1", [steps + 1])], [f"{p}/hi"]),
                    helper.make_node("Slice", [stack, const(f"{p}/s0", [0]), const(f"{p}/e0", [steps])], [f"{p}/lo"]),
                    helper.make_node("Sub", [f"{p}/hi", f"{p}/lo"], [f"{p}/d"]),
                ])
                back_to_rows(cut, f"{p}/d", seq, p, shape)
                continue
            if cut.kind == "accumulate" and not constant and steps > 1:
                # the running sums of every step at once: CumSum over time of [state, x_1, ..., x_n]
                # (sequential float adds in the same order as step by step)
                p = f"{cut.produced}@cumsum"
                _, stack = with_state(cut, cut.drive, p, shape)
                nodes.extend([
                    helper.make_node("CumSum", [stack, const(f"{p}/axis", 0)], [f"{p}/sums"]),
                    helper.make_node("Slice", [f"{p}/sums", const(f"{p}/s", [1]), const(f"{p}/e", [steps + 1])],
                                     [f"{p}/run"]),
                ])
                back_to_rows(cut, f"{p}/run", f"{p}/run", p, shape)
                continue
            if cut.kind == "chain" and cut.body is not None and steps > 1:  # all its steps at once
                over_time(node, cut)
                continue
            if cut.kind == "chain":  # a compensated op: steps copies chained through all its states
                chain_copies(node, cut)
                continue
            if node.domain == KERNEL_DOMAIN:  # one kernel call runs the neuron over the whole chunk
                states = [cut.state_in] + ([cut.count_in] if cut.count_in else [])
                outs = [cut.produced, f"{cut.state_out}@out"] + ([f"{cut.count_out}@out"] if cut.count_out else [])
                params = node.input[1 + len(states):]  # a constant drive is read at every step, not tiled
                nodes.append(helper.make_node(node.op_type, [cut.drive, *states, *params], outs, domain=KERNEL_DOMAIN,
                                              name=f"{node.name}@chunk", steps=steps))
                continue
            xs = [cut.drive] * steps if constant else per_step(cut.drive, shape)
            prev, prev_count, produced = cut.state_in, cut.count_in, []
            for t, x in enumerate(xs):
                last = t == steps - 1
                nxt = f"{cut.state_out}@out" if last else f"{cut.state_out}@{t}"
                if cut.kind == "if":
                    spk = f"{cut.produced}@{t}"
                    nodes.append(helper.make_node(node.op_type, [x, prev, *node.input[2:]], [spk, nxt], domain=DOMAIN,
                                                  name=f"{node.name}@{t}"))
                    produced.append(spk)
                elif cut.kind == "signed":
                    spk = f"{cut.produced}@{t}"
                    nxt_count = f"{cut.count_out}@out" if last else f"{cut.count_out}@{t}"
                    nodes.append(helper.make_node(node.op_type, [x, prev, prev_count, *node.input[3:]],
                                                  [spk, nxt, nxt_count], domain=DOMAIN, name=f"{node.name}@{t}"))
                    produced.append(spk)
                    prev_count = nxt_count
                else:  # accumulate: the running sum is both the state and what the pool sees
                    nodes.append(helper.make_node("Add", [prev, x], [nxt]))
                    produced.append(nxt)
                prev = nxt
            # downstream nodes read the spikes (or running sums) of every step under the original name
            nodes.append(helper.make_node("Concat", produced, [cut.produced], axis=0))
        # the step outputs that are constant in time come from the prefix (see run_layered)
        outputs = self.varying_outputs + [f"{self.state_out_of[s]}@out" for s in self.state_order]
        inputs = self.state_order + [i for i in self.reduced_inputs if i not in self.state_in]
        model = _subgraph_model(self.proto, nodes, inputs, outputs, self.types, f"ann2snn_chunk{steps}",
                                shaped=[c.produced for c in self.cuts.values()
                                        if c.kind in ("if", "signed", "chain") and SHAPE_SPIKES])
        model.graph.initializer.extend(inits)
        for vi in model.graph.input:  # states keep the batch B, not steps·B
            if vi.name in self.state_in or vi.name not in self.varying:
                dims = vi.type.tensor_type.shape.dim
                if len(dims):
                    dims[0].dim_param = "batch"
        return model

    @staticmethod
    def _static_closure(nodes: list[onnx.NodeProto], statics: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        need = {i for n in nodes for i in n.input}
        out = []
        for n in reversed(statics):
            if any(o in need for o in n.output):
                out.append(n)
                need |= set(n.input)
        return list(reversed(out))

    def _rank(self, tensor: str) -> int | None:
        t = self.types.get(tensor)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    def _constant(self, tensor: str) -> np.ndarray | None:
        """The value of an initializer, or None (computed or missing)."""
        init = next((i for i in self.proto.graph.initializer if i.name == tensor), None) if tensor else None
        return onnx.numpy_helper.to_array(init) if init is not None else None

    def _touches_batch(self, node: onnx.NodeProto, axes: Iterable[int]) -> bool:
        """Whether any of ``axes`` of ``node``'s first input is the batch axis (negative axes
        count from its rank; an unknown rank makes a negative axis suspect)."""
        rank = self._rank(node.input[0])
        return any(int(a) == 0 or (int(a) < 0 and (rank is None or int(a) + rank == 0)) for a in axes)

    def _check_per_sample(self, node: onnx.NodeProto) -> None:
        """Refuse (_Refuse) a whitelisted node whose attributes or inputs would mix the samples."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if node.domain == _ACTIVATION_DOMAIN and op != "LayerNormalization":
            return  # elementwise
        if op in _AXIS_OPS:
            default = _AXIS_OPS[op]
            if op in ("Softmax", "LogSoftmax", "Hardmax") and ai_onnx_opset(self.proto) < 13:
                default = 1
            if self._touches_batch(node, [attrs.get("axis", default if default is not None else 0)]):
                raise _Refuse(f"{node.name}: {op} along the batch axis")
        elif op == "Transpose":
            perm = attrs.get("perm")
            if (perm is None and self._rank(node.input[0]) != 1) or (perm is not None and int(next(iter(perm))) != 0):
                raise _Refuse(f"{node.name}: Transpose moves the batch axis")
        elif op.startswith("Reduce"):
            axes = self._constant(node.input[1]) if len(node.input) > 1 and node.input[1] else attrs.get("axes")
            if len(node.input) > 1 and node.input[1] and axes is None:
                raise _Refuse(f"{node.name}: {op} without constant axes")
            axes = [] if axes is None else np.asarray(axes).reshape(-1).tolist()
            if not axes and not int(attrs.get("noop_with_empty_axes", 0)):
                raise _Refuse(f"{node.name}: {op} over every axis, the batch axis included")
            if self._touches_batch(node, axes):
                raise _Refuse(f"{node.name}: {op} on the batch axis")
        elif op == "Reshape":
            shape = self._constant(node.input[1])
            dims = shape.reshape(-1).tolist() if shape is not None else []
            # [-1] alone would merge the batch into one axis
            if len(dims) < 2 or int(dims[0]) not in (0, -1):
                raise _Refuse(f"{node.name}: Reshape whose batch dimension is not 0 or -1")
        elif op == "Gemm" and int(attrs.get("transA", 0)):
            raise _Refuse(f"{node.name}: Gemm with transA")
        elif op == "MatMul":
            self._check_matmul(node)
        elif op == "Pad" and len(node.input) > 1:
            pads = self._constant(node.input[1])
            if pads is None:
                raise _Refuse(f"{node.name}: Pad with computed pads")
            p = pads.reshape(2, -1) if len(node.input) < 4 or not node.input[3] else None
            if p is None or p[0, 0] or p[1, 0]:
                raise _Refuse(f"{node.name}: Pad along the batch axis or with explicit axes")
        elif op in ("Squeeze", "Unsqueeze", "Slice"):
            axes_src = node.input[1] if op != "Slice" else (node.input[3] if len(node.input) > 3 else "")
            if op != "Slice" and len(node.input) < 2:  # opset < 13: an attribute; Squeeze without it squeezes the batch of 1
                axes = attrs.get("axes")
                if axes is None and op == "Squeeze":
                    raise _Refuse(f"{node.name}: Squeeze without axes (it would drop a batch of 1)")
            elif op == "Slice" and len(node.input) < 3:  # opset < 10: attributes
                axes = attrs.get("axes")
                if axes is None:
                    raise _Refuse(f"{node.name}: Slice without axes")
            else:
                axes = self._constant(axes_src)
                if axes is None:
                    raise _Refuse(f"{node.name}: {op} without constant axes")
            axes = [] if axes is None else np.asarray(axes).reshape(-1).tolist()
            rank = self._rank(node.input[0])
            if op == "Unsqueeze":  # its axes count in the output's rank
                if any(int(a) == 0 or (int(a) < 0 and (rank is None or int(a) + rank + len(axes) == 0)) for a in axes):
                    raise _Refuse(f"{node.name}: Unsqueeze on the batch axis")
            elif self._touches_batch(node, axes):
                raise _Refuse(f"{node.name}: {op} on the batch axis")

    def _check_matmul(self, node: onnx.NodeProto) -> None:
        """MatMul with a constant operand, or of two per-sample tensors of one rank >= 3 (Q·Kᵀ,
        attention·V: a batched product whose leading axis is the batch)."""
        a, b = node.input[0], node.input[1]
        batched = [x for x in (a, b) if x not in self.static_made]
        if len(batched) == 1 and b not in batched:
            return  # x · W: the rows of x are the samples'
        if len(batched) == 1:  # W · x: per sample where W has no batch axes of its own to broadcast
            ra, rb = self._rank(a), self._rank(b)
            if ra is None or rb is None or ra > 2 or rb < 3:
                raise _Refuse(f"{node.name}: MatMul of a constant by a varying tensor that is not a batched product")
            return
        ra, rb = self._rank(a), self._rank(b)
        if ra is None or ra != rb or ra < 3:
            raise _Refuse(f"{node.name}: MatMul of two varying tensors that are not batched products of one "
                          "rank >= 3")


class _Refuse(Exception):
    """The layered form does not apply to this graph."""



def run_layered(plan: StepPlan, feeds: dict[str, np.ndarray], states: dict[str, np.ndarray], T: int,
                chunk: int) -> Iterator[list[np.ndarray]]:
    """Yield the step outputs of steps 0..T-1, running ``chunk`` steps per call.

    ``states`` (state input -> array) is updated to the state after each chunk.
    """
    every = _constant_values(plan, feeds)
    const = {k: v for k, v in every.items() if k in plan.reduced_inputs}
    batch = next(iter(feeds.values())).shape[0]
    k = len(plan.varying_outputs)
    done = 0
    while done < T:
        n = min(chunk, T - done)
        results = plan.chunk_session(n).run(None, {**const, **states})
        states.update(zip(plan.state_order, results[k:]))
        outs = [r.reshape((n, batch) + r.shape[1:]) for r in results[:k]]
        for t in range(n):
            yield _assemble(plan, [o[t] for o in outs], every)
        done += n


def _owned(a: np.ndarray) -> np.ndarray:
    """``a`` itself if it is a writable C-contiguous float32 array, else a copy that is."""
    if a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable and a.flags.owndata:
        return a
    return np.array(a, dtype=np.float32, order="C")


def _constant_values(plan: StepPlan, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The prefix's outputs (run once) and the data inputs: every value that is the same at each step."""
    const = dict(feeds)
    if plan.prefix is not None:
        const.update(zip(plan.prefix_outputs, plan.prefix.run(plan.prefix_outputs, feeds)))
    return const


def _assemble(plan: StepPlan, varying: list[np.ndarray], const: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The step outputs in order: the reduced model's results, and the constant ones from ``const``."""
    if not plan.constant_outputs:  # the common case, once per step: no dict to build
        return varying
    got = dict(zip(plan.varying_outputs, varying))
    return [got[o] if o in got else const[o] for o in plan.step_outputs]


def run_constant(plan: StepPlan, feeds: dict[str, np.ndarray], T: int) -> Iterator[list[np.ndarray]]:
    """Yield the step outputs of T steps of a plan in which nothing varies in time (no state,
    no neuron): the prefix runs once and every step gives its outputs."""
    const = _constant_values(plan, feeds)
    outs = _assemble(plan, [], const)
    for _ in range(T):
        yield outs


def run_steps(plan: StepPlan, feeds: dict[str, np.ndarray], states: dict[str, np.ndarray], T: int,
              bind: bool = True) -> Iterator[list[np.ndarray]]:
    """Yield the step outputs of steps 0..T-1 of the reduced step model (prefix run once).

    With ``bind``, the states stay in preallocated buffers bound to the session (IOBinding):
    the states in :attr:`StepPlan.inplace` are read and rewritten in one buffer; the others
    (read after their next value is written, e.g. a running max) alternate between two. No
    state is allocated or copied between steps. ``states`` (state input -> array) refers to
    the buffers holding the latest state after every step. Step outputs that do not vary in
    time come from the prefix, computed once.
    """
    assert plan.prefix is not None and plan.reduced is not None
    const = _constant_values(plan, feeds)
    inputs = {n: v for n, v in const.items() if n in plan.reduced_inputs}
    k = len(plan.varying_outputs)
    if T <= 1 or not bind:
        for _ in range(T):
            results = plan.reduced.run(plan.reduced_outputs, {**inputs, **states})
            states.update(zip(plan.state_order, results[k:]))
            yield _assemble(plan, results[:k], const)
    else:
        for varying in _run_bound(plan, inputs, states, T):
            yield _assemble(plan, varying, const)


def _run_bound(plan: StepPlan, const: dict[str, np.ndarray], states: dict[str, np.ndarray],
               T: int) -> Iterator[list[np.ndarray]]:
    """run_steps with the states in bound buffers; yields the varying step outputs. Every bound
    output is computed by a node of the reduced model (none is an input passed through), so
    onnxruntime writes each one into its buffer."""
    k = len(plan.varying_outputs)
    assert plan.reduced is not None
    # the numpy arrays own the memory; the OrtValues only view it, so keep both alive
    keep = {n: np.ascontiguousarray(v) for n, v in const.items()}
    here = {s: _owned(states[s]) for s in plan.state_order}
    there = {s: here[s] if s in plan.inplace else np.empty_like(here[s]) for s in plan.state_order}
    states.update(here)
    view = ort.OrtValue.ortvalue_from_numpy

    def binding(src: dict[str, np.ndarray], dst: dict[str, np.ndarray], outs: list[np.ndarray] | None) -> ort.IOBinding:
        b = plan.reduced.io_binding()
        for n, v in keep.items():
            b.bind_ortvalue_input(n, view(v))
        for j, n in enumerate(plan.varying_outputs):  # bound first: the first k outputs
            if outs is None:
                b.bind_output(n, "cpu")
            else:
                b.bind_ortvalue_output(n, view(outs[j]))
        for s_in in plan.state_order:
            b.bind_ortvalue_input(s_in, view(src[s_in]))
            b.bind_ortvalue_output(plan.state_out_of[s_in], view(dst[s_in]))
        return b

    first = binding(here, there, None)
    plan.reduced.run_with_iobinding(first)
    results = [o.numpy() for o in first.get_outputs()[:k]]
    del first
    states.update(there)
    yield results
    out_bufs = [np.empty_like(r) for r in results]
    bindings = [binding(there, here, out_bufs), binding(here, there, out_bufs)]
    sides = [here, there]
    for i in range(T - 1):
        plan.reduced.run_with_iobinding(bindings[i % 2])
        states.update(sides[i % 2])
        yield out_bufs
