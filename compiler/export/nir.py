"""Export a compiled spiking model to NIR, the Neuromorphic Intermediate Representation.

``ann2snn export model.snn.onnx --to nir -o model.nir`` maps the step graph onto NIR nodes
(Input, Conv2d, Affine / Linear, AvgPool2d, Flatten, Scale, IF, Output) and edges. NIR sums
all edges that enter a node, so residual Adds become several edges into the consumer.

NIR cannot say everything an ann2snn model says. What it cannot express is written into the
node and graph metadata (keys ``ann2snn.*``) and is of two kinds:

- the neuron model, present in every export: ann2snn neurons reset by subtraction, start at
  ``v(0) = v0·θ`` and fire at ``v >= θ``; NIR's IF resets to ``v_reset``, starts at 0 and
  fires at ``v > v_threshold``. Exported as IF (r = 1, v_reset = 0) with the true rule,
  the initial membrane ``ann2snn.v_init`` and the readout window in metadata;
- graph parts NIR has no node for (max pooling, the analog tail): refused, unless the user
  accepts the approximation (``--allow-approximation``): max pooling then becomes an
  AvgPool2d placeholder of the same geometry and the tail is left out; metadata says so.

``nir`` is an optional dependency (``pip install nir``); nothing here imports it at module
load.
"""
from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ann2snn.runtime.ops import COUNTING_OPS, DOMAIN, IF_OP

from ..errors import ConfigError, ModelLoadError, NodeProblem, PassError, UnsupportedModelError
from ..version import __version__

log = logging.getLogger(__name__)

ALLOW_FLAG = "--allow-approximation"
META = "ann2snn."
NEURON_MODEL = ("ann2snn IF neuron, one step per time unit (dt = 1): v += I; spike = v >= v_threshold; "
                "v -= v_threshold * spike (reset by subtraction); v(0) = v_init")


class NirExportError(UnsupportedModelError):
    """Parts of the model NIR cannot represent faithfully; all of them are listed."""


def _require_nir():
    try:
        import nir
    except ImportError:
        raise ConfigError("NIR export needs the optional package 'nir': pip install nir "
                          "(or pip install 'ann2snn[nir]')") from None
    return nir


def _node_key(name: str, taken: set[str]) -> str:
    """A NIR node name: HDF5 turns '/' into nested groups, so names are made path-safe."""
    key = re.sub(r"[^A-Za-z0-9_.\-]", "_", name.strip("/").replace("/", ".")) or "node"
    if key.startswith("."):
        key = "_" + key
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def _dense(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv weight as the equivalent dense (block-diagonal) one.

    nir 1.0.8 types a Conv2d's input as ``weight.shape[1]`` channels, so a graph with a grouped
    Conv2d fails its own type check when read back; the dense weight computes the same.
    """
    if groups == 1:
        return weight
    cout, cin_g = weight.shape[:2]
    dense = np.zeros((cout, cin_g * groups) + weight.shape[2:], weight.dtype)
    per = cout // groups
    for g in range(groups):
        dense[g * per:(g + 1) * per, g * cin_g:(g + 1) * cin_g] = weight[g * per:(g + 1) * per]
    return dense


def _ints(values, n: int = 2) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    return values if len(values) == n else values * n if len(values) == 1 else values


class _Exporter:
    """Walks the step graph in order; ``src[tensor]`` lists the NIR nodes whose outputs sum to it."""

    def __init__(self, model: onnx.ModelProto, allow_approximation: bool) -> None:
        self.nir = _require_nir()
        props = {p.key: p.value for p in model.metadata_props}
        if "ann2snn" not in props:
            raise ModelLoadError("the model has no 'ann2snn' metadata: it is not a compiled spiking model; "
                                 "compile it first with 'ann2snn compile'")
        self.model, self.meta, self.allow = model, json.loads(props["ann2snn"]), allow_approximation
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.shapes = self._shapes(model)
        self.state_in = {s["input"] for s in self.meta["states"]}
        self.state_out = {s["output"] for s in self.meta["states"]}
        self.neurons = {n["node"]: n for n in self.meta["neurons"]}
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []
        self.src: dict[str, list[str]] = {}
        self.static: set[str] = set()       # tensors constant in time (the analog prefix)
        self.cumulative: dict[str, str] = {}  # running-sum tensors of cumulative max pooling -> pool
        self.taken: set[str] = set()
        self.unsupported: list[NodeProblem] = []
        self.approximate: list[NodeProblem] = []
        self.approximations: list[str] = []
        self.uses = Counter(i for n in model.graph.node for i in n.input)
        self.uses.update(o.name for o in model.graph.output)

    @staticmethod
    def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
            infos = list(inferred.value_info) + list(inferred.input) + list(inferred.output)
        except Exception:  # shape inference is a convenience: the stored value_info usually suffices
            infos = []
        infos += list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
        shapes: dict[str, tuple[int, ...] | None] = {}
        for vi in infos:
            dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else None
            if dims is None or len(dims) == 0 or not all(d.HasField("dim_value") for d in dims[1:]):
                shapes.setdefault(vi.name, None)
            elif shapes.get(vi.name) is None:
                shapes[vi.name] = tuple(int(d.dim_value) for d in dims[1:])  # per sample: NIR has no batch
        return shapes

    # -- helpers -------------------------------------------------------------------------------
    def add(self, onnx_name: str, node, inputs: list[str], **meta: Any) -> str:
        key = _node_key(onnx_name, self.taken)
        node.metadata = {f"{META}onnx_node": onnx_name, **{META + k: v for k, v in meta.items()}}
        self.nodes[key] = node
        for s, k in sorted(Counter(inputs).items()):
            if k > 1:  # NIR edges are unique: a source counted k times goes through Scale(k)
                s = self.add(f"{onnx_name}/x{k}", self.nir.Scale(np.full(self._out_shape(s), k, np.float32)), [s])
            self.edges.append((s, key))
        return key

    def _out_shape(self, key: str) -> tuple[int, ...]:
        node = self.nodes[key]
        return tuple(int(d) for d in next(iter(node.output_type.values())))

    def shape(self, tensor: str, node: onnx.NodeProto) -> tuple[int, ...] | None:
        s = self.shapes.get(tensor)
        if s is None:
            self.problem(node, f"has no static shape for '{tensor}'", "re-compile the model with ann2snn (per-sample "
                         "shapes must be static)")
        return s

    def problem(self, node: onnx.NodeProto, problem: str, remedy: str = "keep this model in ONNX, or end the spiking "
                "part before the node with 'compile --spiking-until' (the tail is then left out of the export)") -> None:
        self.unsupported.append(NodeProblem(node.name, f"{node.domain or 'ai.onnx'}::{node.op_type}", problem, remedy))

    def approx(self, node_name: str, op: str, problem: str, accepted_as: str) -> None:
        """Record an approximation: the export goes on, and ``convert`` refuses it unless it is allowed."""
        self.approximate.append(NodeProblem(node_name, op, problem, f"pass {ALLOW_FLAG} to export it as {accepted_as}"))
        self.approximations.append(f"{node_name}: {problem}; exported as {accepted_as}")

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def attrs(self, node: onnx.NodeProto) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def per_sample(self, c: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A constant broadcast against ``[N, *shape]``, as one sample's full array."""
        c = np.asarray(c, np.float32)
        return np.ascontiguousarray(np.broadcast_to(c, (1,) + shape)[0] if c.ndim <= len(shape) + 1 else c)

    def passthrough(self, node: onnx.NodeProto, x: str) -> None:
        for o in node.output:
            self.src[o] = self.src[x]
            if x in self.static:
                self.static.add(o)

    def elementwise(self, node: onnx.NodeProto, x: str, scale, bias, role: str) -> None:
        """``y = x * scale + bias`` with constants: Scale, or a diagonal Affine / diagonal 1x1 Conv2d."""
        shape = self.shape(x, node)
        if shape is None:
            return
        s = self.per_sample(scale, shape)
        b = self.per_sample(bias, shape)
        nir = self.nir
        if not b.any():
            new = nir.Scale(s)
        elif len(shape) == 1:
            new = nir.Affine(np.diag(s).astype(np.float32), b)
        elif len(shape) == 3 and all(np.all(a == a[:, :1, :1]) for a in (s, b)):
            new = nir.Conv2d(input_shape=shape[1:], weight=np.diag(s[:, 0, 0]).astype(np.float32)[:, :, None, None],
                             stride=1, padding=0, dilation=1, groups=1, bias=b[:, 0, 0].copy())
            role += "; a per-channel y = s*x + b, written as a diagonal 1x1 Conv2d"
        else:
            return self.problem(node, "adds a constant that varies within a channel, which NIR has no node for")
        self.emit(node, new, [x], role=role)

    def emit(self, node: onnx.NodeProto, new, inputs: list[str], **meta: Any) -> str:
        sources = [s for x in inputs for s in self.src[x]]
        static = all(x in self.static for x in inputs)
        meta.setdefault("region", "analog prefix (input constant in time)" if static else "spiking")
        key = self.add(node.name, new, sources, onnx_op=node.op_type, **meta)
        self.src[node.output[0]] = [key]
        if static:
            self.static.add(node.output[0])
        return key

    # -- op handlers ---------------------------------------------------------------------------
    def convert(self):
        nir = self.nir
        g = self.model.graph
        for inp in g.input:
            if inp.name in self.state_in or inp.name in self.consts:
                continue
            shape = self.shapes.get(inp.name)
            if shape is None:
                raise UnsupportedModelError([NodeProblem(inp.name, "graph input", "has no static per-sample shape",
                                                  "re-compile a model with static input shapes")])
            key = self.add(inp.name, nir.Input(input_type={"input": np.array(shape)}), [],
                           onnx_input=inp.name, coding="direct: the analog input is fed unchanged at every step")
            self.src[inp.name] = [key]
            self.static.add(inp.name)
        broken: set[str] = set()
        for node in g.node:
            handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if node.domain == DOMAIN and node.op_type == IF_OP:
                handler = _if_neuron
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = onnx.helper.get_attribute_value(node.attribute[0])
                self.consts[node.output[0]] = (numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto)
                                               else np.asarray(value))
                continue
            if any(x in broken for x in node.input):  # downstream of a reported node: not reported again
                broken.update(node.output)
                continue
            if node.domain == DOMAIN and node.op_type in COUNTING_OPS:
                self.problem(node, "is a signed-spike neuron, which NIR cannot express (its IF neuron fires 0/1 "
                             "spikes only)", "re-compile the model with '--neuron if' to export it to NIR")
                broken.update(node.output)
                continue
            if handler is None:
                self.problem(node, "has no NIR equivalent")
            elif not any(x in self.src for x in node.input):
                self.problem(node, "has no input computed from the model's inputs")
            else:
                handler(self, node)
            broken.update(o for o in node.output if o and o not in self.src and o not in self.state_out)
        self._tail()
        for name in self.meta["step_outputs"]:
            if name not in self.src:
                continue  # the node producing it was reported above
            shape = self.shapes.get(name)
            self.add(name, nir.Output(output_type={"output": np.array(shape)}), self.src[name], onnx_output=name,
                     readout=f"mean over steps [t0, T) with t0 = {self.meta['readout']['t0']} (the last "
                             f"{self.meta['readout'].get('min_window', 4)} steps when T < t0 + "
                             f"{self.meta['readout'].get('min_window', 4)})")
        if self.unsupported:
            raise UnsupportedModelError(self.unsupported, header=f"the model has {len(self.unsupported)} node(s) "
                                        "that NIR cannot represent")
        if self.approximate and not self.allow:
            raise NirExportError(self.approximate, header=f"{len(self.approximate)} part(s) of the model cannot be "
                                 f"exported to NIR faithfully; pass {ALLOW_FLAG} to accept the approximations below")
        try:
            return nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata=self._graph_metadata())
        except (ValueError, AssertionError) as exc:  # nir's own type check: a bug of this exporter
            raise PassError(f"the nir package rejected the exported graph ({exc}); please report this with the "
                            "model") from None

    def _tail(self) -> None:
        tail = self.meta.get("tail")
        if tail:
            self.approx(f"{tail['domain']}::{tail['function']}", "analog tail",
                        f"is the analog tail ({len(tail['nodes'])} node(s), run once on the readout), which NIR "
                        "cannot hold", f"the spiking part only, ending at {', '.join(tail['inputs'])}; "
                        "run the tail on the readout yourself")

    def _graph_metadata(self) -> dict[str, Any]:
        tail = self.meta.get("tail")
        return {
            f"{META}version": __version__,
            f"{META}format": 1,
            f"{META}neuron_model": NEURON_MODEL,
            f"{META}dt": 1.0,
            f"{META}time": "discrete: one NIR time unit is one ann2snn step; simulate with dt = 1 (forward Euler "
                           "v += dt * r * I then reproduces v += I)",
            f"{META}coding": "direct: the analog input is fed unchanged at every step",
            f"{META}readout_t0": int(self.meta["readout"]["t0"]),
            f"{META}readout": "the answer is the mean of each Output over steps [t0, T) (the last "
                              f"{self.meta['readout'].get('min_window', 4)} steps when T < t0 + "
                              f"{self.meta['readout'].get('min_window', 4)}), not its value at one step",
            f"{META}step_outputs": json.dumps(self.meta["step_outputs"]),
            f"{META}outputs": json.dumps(self.meta["outputs"]),
            f"{META}tail": json.dumps(tail, sort_keys=True) if tail else "",
            f"{META}lost": json.dumps(LOST),
            f"{META}approximations": json.dumps(self.approximations),
            f"{META}config": json.dumps(self.meta.get("config", {}), sort_keys=True),
        }


def _conv(ex: _Exporter, node: onnx.NodeProto) -> None:
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


def _gemm(ex: _Exporter, node: onnx.NodeProto) -> None:
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


def _matmul(ex: _Exporter, node: onnx.NodeProto) -> None:
    w = ex.const(node.input[1])
    shape = ex.shape(node.input[0], node)
    if shape is None:
        return
    if w is None or w.ndim != 2 or len(shape) != 1 or node.input[0] not in ex.src:
        return ex.problem(node, "is not x @ W with a 2-D x and a constant 2-D W")
    ex.emit(node, ex.nir.Linear(np.ascontiguousarray(np.asarray(w, np.float32).T)), [node.input[0]],
            weights=node.input[1], spike_value="folded into the weights (per input)")


def _add_sub(ex: _Exporter, node: onnx.NodeProto) -> None:
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


def _mul_div(ex: _Exporter, node: onnx.NodeProto) -> None:
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


def _flatten(ex: _Exporter, node: onnx.NodeProto) -> None:
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


def _pool_geometry(ex: _Exporter, node: onnx.NodeProto, shape):
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


def _avgpool(ex: _Exporter, node: onnx.NodeProto) -> None:
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


def _maxpool(ex: _Exporter, node: onnx.NodeProto) -> None:
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


def _if_neuron(ex: _Exporter, node: onnx.NodeProto) -> None:
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


HANDLERS: dict[str, Callable[[_Exporter, onnx.NodeProto], None]] = {
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

#: what every NIR export loses or changes (also written to the graph metadata, key ann2snn.lost)
LOST = [
    ("reset: ann2snn neurons reset by subtraction (v -= v_threshold); NIR's IF resets to v_reset (written as 0). "
     "The true rule is in each IF node's metadata (ann2snn.reset)."),
    ("initial membrane: ann2snn starts at v(0) = v0 * v_threshold (v0 = 0.5 by default); NIR's IF has no initial "
     "state. The values are in each IF node's metadata (ann2snn.v_init, ann2snn.v_init_fraction)."),
    "firing condition: ann2snn fires at v >= v_threshold, NIR's IF at v > v_threshold.",
    ("time: NIR is continuous-time (dv/dt = r * I); the export sets r = 1 and means one time unit per ann2snn step "
     "(dt = 1, graph metadata ann2snn.dt)."),
    ("readout: the answer is the mean of the outputs over steps [t0, T); NIR has no readout: t0 is in the graph "
     "metadata (ann2snn.readout_t0)."),
    ("max pooling: NIR has no max pooling; with --allow-approximation each MaxPool becomes an AvgPool2d "
     "placeholder of the same geometry, marked in its metadata (ann2snn.placeholder_for, ann2snn.maxpool_mode)."),
    ("grouped and depthwise convolutions are written as their dense block-diagonal Conv2d (groups = 1), the "
     "original group count in metadata (ann2snn.groups): nir 1.0.8 cannot read a grouped Conv2d back."),
    ("constant Sub / Add / Mul / Div (input normalisation, spike values before residual adds) become Scale, or a "
     "diagonal 1x1 Conv2d / diagonal Affine where a bias is needed; x / c becomes x * (1 / c)."),
    ("analog tail: NIR cannot hold it; with --allow-approximation only the spiking part is exported and the tail is "
     "described in the graph metadata (ann2snn.tail)."),
]


def to_nir(model, allow_approximation: bool = False):
    """The ``nir.NIRGraph`` of a compiled spiking model (a path, bytes or ModelProto).

    Raises ``UnsupportedModelError`` for nodes NIR cannot represent at all and
    ``NirExportError`` for parts it can only approximate, unless ``allow_approximation``.
    """
    from ..modelio import load_model

    ex = _Exporter(load_model(model), allow_approximation)
    graph = ex.convert()
    for note in ex.approximations:
        log.warning("NIR export approximates %s", note)
    return graph


def export_nir(model, output: str | Path, allow_approximation: bool = False):
    """Write ``model`` (a compiled spiking model) as a NIR file, atomically; returns the graph."""
    from ..modelio import write_atomic

    nir = _require_nir()
    graph = to_nir(model, allow_approximation)
    buf = io.BytesIO()
    nir.write(buf, graph)
    write_atomic(output, buf.getvalue())
    return graph


__all__ = ["ALLOW_FLAG", "LOST", "NirExportError", "export_nir", "to_nir"]
