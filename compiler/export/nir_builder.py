"""The state of one NIR export and the helpers the op handlers share: adding nodes and edges,
recording what NIR cannot represent or can only approximate. See :mod:`.nir` for what the
export does."""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ConfigError, ModelLoadError, NodeProblem, UnsupportedModelError

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


class NirBuilder:
    """The NIR graph being built from a compiled model: nodes, edges, and what could not be
    exported; ``src[tensor]`` lists the NIR nodes whose outputs sum to it. The op handlers
    (:mod:`.nir_ops`) add to it; :mod:`.nir` walks the step graph."""

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
