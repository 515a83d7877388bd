"""Emit the stateful spiking step graph.

Every neuron site becomes ``ann2snn::IFNeuron(z, v, θ) -> (spikes, v_next)`` with its
membrane potential as a graph input / output pair (``--neuron signed``:
``ann2snn::SignedIFNeuron(z, v, count, θ) -> (spikes, v_next, count_next)``, with the net
spike count as a second state). Spikes are 0/1; the value θ a spike
stands for is folded into the weights of the layers that consume it (per input channel),
through Flatten / Reshape / average pooling when needed, and applied by an explicit Mul
where no weight can absorb it (residual adds, the analog tail, graph outputs). The analog
tail is moved into the model-local function ``ann2snn.tail::AnalogTail``, which the
runtime runs once on the readout.

IF neurons are then put in units of their thresholds (runtime/unitform.py, ``unit_form``):
1/θ is folded into the weights that make each neuron's current and the threshold tensors
hold ones, so the membrane is v/θ and v(0) = v0. The spikes are those of the calibrated
neuron up to float rounding of the folded weights; the artifact is exactly what every
execution form of the runtime runs.
"""
from __future__ import annotations

import base64
import json
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ann2snn.config import CompileConfig
from ann2snn.version import __version__
from ann2snn.errors import DataError
from ann2snn.state import PassState, Site
from ann2snn.support import ACTIVATION_DOMAIN
from ann2snn.runtime.reference import value_types
from ann2snn.runtime.compensation import GUARDED
from ann2snn.runtime.ops import (BURST_OP, COUNTING_OPS, DEAD_THRESHOLD, DOMAIN, IF_OP, SYMMETRIC_BURST_OP, SYMMETRIC_OP,
                                 TOTAL_SYMMETRIC_BURST_OP, TOTAL_SYMMETRIC_OP, UNIT_SYMMETRIC_BURST_OP,
                                 UNIT_SYMMETRIC_OP, neuron_function, neuron_op)
from ann2snn.runtime.unitform import unit_form

from ._compensation import emit_compensation
from ._graph import apply_node, const_value, export, owned_constant, restore_output_types, static_shape, unique_name

log = logging.getLogger(__name__)

TAIL_DOMAIN = "ann2snn.tail"
TAIL_FUNCTION = "AnalogTail"
METADATA_KEY = "ann2snn"


#: ops that move data without mixing values: the scale moves with the data
DATA_MOVEMENT = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Pad", "Resize",
                 "Upsample", "Identity")
#: ops that average within a channel: a per-channel scale passes through unchanged
AVERAGING = ("AveragePool", "GlobalAveragePool")


def _constant_rest(node: gs.Node) -> bool:
    return all(const_value(t) is not None or not t.name for t in node.inputs[1:])


def _zero_pad(node: gs.Node) -> bool:
    if node.op != "Pad":
        return node.op not in ("Resize", "Upsample") or node.attrs.get("mode", "nearest") == "nearest"
    if node.attrs.get("mode", "constant") != "constant":
        return False
    value = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    return value is None or float(np.asarray(value).reshape(-1)[0]) == 0.0


def _pads_spatial_only(node: gs.Node) -> bool:
    pads = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None or (len(node.inputs) > 3 and node.inputs[3].name):
        return False  # explicit axes: keep it simple, use the generic path
    pads = np.asarray(pads).reshape(2, -1)
    return bool(np.all(pads[:, :2] == 0))


def _compress(scale: np.ndarray) -> np.ndarray:
    """Drop the axes along which a scale is constant (keeping them as size 1)."""
    for axis in range(scale.ndim):
        if scale.shape[axis] > 1 and np.all(scale == scale.take([0], axis=axis)):
            scale = scale.take([0], axis=axis)
    return scale


def _linear_resize(node: gs.Node) -> bool:
    return node.op in ("Resize", "Upsample") and node.attrs.get("mode", "nearest") != "nearest"


def _varies_only_on(scale: np.ndarray, axis: int) -> bool:
    return all(d == 1 for i, d in enumerate(scale.shape) if i != axis)


class _ScaleFolder:
    """Pushes a per-element scale of a spike tensor into the weights that consume it."""

    def __init__(self, graph: gs.Graph, tail: set[str], boundary: list[str], opset: int) -> None:
        self.graph, self.tail, self.boundary, self.opset = graph, tail, boundary, opset
        self.taken = set(graph.tensors())

    def fold(self, t: gs.Tensor, scale: np.ndarray) -> None:
        rank = scale.ndim
        explicit = []
        for c in list(t.outputs):
            if c.name in self.tail or c.inputs[0] is not t:
                explicit.append(c)
            elif c.op == "Conv" and const_value(c.inputs[1]) is not None and _varies_only_on(scale, 1):
                w_t = owned_constant(self.graph, c, 1)
                w = np.asarray(w_t.values, np.float64)
                groups = int(c.attrs.get("group", 1))
                cout, cin_g = w.shape[0], w.shape[1]
                s = np.broadcast_to(scale.reshape(-1), (cin_g * groups,)).reshape(groups, cin_g)
                per_out = s[np.arange(cout) // (cout // groups)]
                w_t.values = (w * per_out.reshape(per_out.shape + (1,) * (w.ndim - 2))).astype(w_t.values.dtype)
            elif (c.op == "Gemm" and rank == 2 and not c.attrs.get("transA", 0)
                  and const_value(c.inputs[1]) is not None):
                w_t = owned_constant(self.graph, c, 1)
                s = np.broadcast_to(scale.reshape(-1), (scale.shape[1],)).astype(np.float64)
                w = np.asarray(w_t.values, np.float64)
                w_t.values = (w * (s[None, :] if c.attrs.get("transB", 0) else s[:, None])).astype(w_t.values.dtype)
            elif (c.op == "MatMul" and const_value(c.inputs[1]) is not None
                  and np.asarray(const_value(c.inputs[1])).ndim == 2 and _varies_only_on(scale, rank - 1)):
                w_t = owned_constant(self.graph, c, 1)
                s = scale.reshape(-1).astype(np.float64)
                w_t.values = (np.asarray(w_t.values, np.float64) * s[:, None]).astype(w_t.values.dtype)
            elif c.op == "ConvTranspose" and const_value(c.inputs[1]) is not None and _varies_only_on(scale, 1):
                w_t = owned_constant(self.graph, c, 1)  # weight [C_in, C_out / group, k...]
                w = np.asarray(w_t.values, np.float64)
                s = np.broadcast_to(scale.reshape(-1), (w.shape[0],))
                w_t.values = (w * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w_t.values.dtype)
            elif (c.op in AVERAGING or _linear_resize(c)) and _varies_only_on(scale, 1) and _constant_rest(c):
                for out in c.outputs:
                    self.fold(out, scale)
            elif c.op == "Pad" and _constant_rest(c) and _zero_pad(c) and _pads_spatial_only(c) \
                    and _varies_only_on(scale, 1):
                self.fold(c.outputs[0], scale)  # padded entries are 0 whatever their scale
            elif c.op in DATA_MOVEMENT and _constant_rest(c) and _zero_pad(c) and (moved := self._moved(t, c, scale, self.opset)):
                for out, s_out in zip(c.outputs, moved):
                    self.fold(out, _compress(s_out))
            else:
                explicit.append(c)
        is_output = any(o is t for o in self.graph.outputs) or t.name in self.boundary
        if explicit or is_output:
            if is_output:
                # a boundary or graph output keeps its name (the metadata, the tail function and
                # the caller all know it by that name): the spike tensor is renamed instead
                name, t.name = t.name, unique_name(self.taken, f"{t.name}/spikes")
                scaled = gs.Variable(name, dtype=np.float32, shape=t.shape)
            else:
                scaled = gs.Variable(unique_name(self.taken, f"{t.name}/scaled"), dtype=np.float32, shape=t.shape)
            self.graph.nodes.append(gs.Node("Mul", name=unique_name(self.taken, f"{t.name}/scale"),
                                            inputs=[t, gs.Constant(unique_name(self.taken, f"{t.name}/spike_value"),
                                                                   scale.astype(np.float32))],
                                            outputs=[scaled]))
            for c in explicit:
                for i, x in enumerate(c.inputs):
                    if x is t:
                        c.inputs[i] = scaled
            for i, o in enumerate(self.graph.outputs):
                if o is t:
                    self.graph.outputs[i] = scaled
            self.boundary[:] = [scaled.name if b == t.name else b for b in self.boundary]

    @staticmethod
    def _moved(t: gs.Tensor, node: gs.Node, scale: np.ndarray, opset: int) -> list[np.ndarray] | None:
        """The scale carried through a data-movement node: the node applied to the scale itself."""
        src = static_shape(t)
        if src is None:
            return None
        full = np.ascontiguousarray(np.broadcast_to(scale, (1,) + src), dtype=np.float32)
        try:
            return apply_node(node, full, opset)
        except Exception:  # an exotic attribute combination: fall back to an explicit Mul
            return None


def _cumulative_maxpool(graph: gs.Graph, pool: gs.Node, batch, states: list[dict]) -> list[gs.Variable]:
    """MaxPool of the running sum of the current; the neuron gets the increment of the max.

    Over T steps the neuron then receives maxpool(Σ I) = T·maxpool(mean I) exactly, where
    pooling each step's current would overestimate it whenever the current fluctuates.
    """
    x, y = pool.inputs[0], pool.outputs[0]
    xs, ys = [batch] + list(x.shape[1:]), [batch] + list(y.shape[1:])
    acc_in = gs.Variable(f"{pool.name}/acc", dtype=np.float32, shape=xs)
    acc_out = gs.Variable(f"{pool.name}/acc_next", dtype=np.float32, shape=xs)
    max_in = gs.Variable(f"{pool.name}/max", dtype=np.float32, shape=ys)
    max_out = gs.Variable(f"{pool.name}/max_next", dtype=np.float32, shape=ys)
    graph.nodes.append(gs.Node("Add", name=f"{pool.name}/accumulate", inputs=[acc_in, x], outputs=[acc_out]))
    pool.inputs = [acc_out]
    pool.outputs = [max_out]
    graph.nodes.append(gs.Node("Sub", name=f"{pool.name}/increment", inputs=[max_out, max_in], outputs=[y]))
    graph.inputs += [acc_in, max_in]
    for i, o, shape in ((acc_in, acc_out, xs), (max_in, max_out, ys)):
        states.append({"input": i.name, "output": o.name, "shape": [int(d) for d in shape[1:]], "init": "zeros"})
    return [acc_out, max_out]


def _batch_dim(graph: gs.Graph):
    for t in graph.inputs:
        if t.shape:
            return t.shape[0]
    return "N"


def _thresholds64(site: Site, cfg: CompileConfig) -> np.ndarray:
    """The calibrated θ in float64, shaped to broadcast over ``[N, *shape]``, divided by
    ``cfg.resolution`` where the neuron can burst: a signed activation site's symmetric neuron,
    or a ReLU site's with ``--neuron signed`` (an IF neuron keeps θ)."""
    theta = np.asarray(site.theta, np.float64).reshape(site.theta_shape(cfg.granularity))
    return theta / cfg.resolution if site.signed or cfg.neuron == "signed" else theta


def site_thresholds(site: Site, cfg: CompileConfig) -> np.ndarray:
    """The firing thresholds of a site's neurons as emitted (float32), shaped to broadcast over
    ``[N, *shape]``: the calibrated θ, divided by ``cfg.resolution`` where the neuron bursts."""
    return _thresholds64(site, cfg).astype(np.float32)


def _neuron_values(site: Site, cfg: CompileConfig) -> tuple[np.ndarray, np.ndarray]:
    """(firing thresholds, spike values), both shaped to broadcast over ``[N, *shape]``."""
    theta = site_thresholds(site, cfg)
    dead = theta <= 0
    return np.where(dead, np.float32(DEAD_THRESHOLD), theta).astype(np.float32), np.where(dead, 0, theta).astype(np.float32)


def activation_functions(graph: gs.Graph) -> list[onnx.FunctionProto]:
    """The FunctionProtos of the ``ann2snn.activations`` functions the graph holds."""
    if not any(f.domain == ACTIVATION_DOMAIN for f in graph.functions):
        return []
    holder = gs.Graph(nodes=[], inputs=[], outputs=[], opset=graph.opset,
                      functions=[f for f in graph.functions if f.domain == ACTIVATION_DOMAIN])
    return list(gs.export_onnx(holder, do_type_check=False).functions)


def _tail_function(model: onnx.ModelProto, tail: set[str], inputs: list[str], outputs: list[str], opset: int,
                   other_opsets: dict[str, int]) -> onnx.FunctionProto:
    """The analog tail as a FunctionProto; its initializers become Constant nodes."""
    nodes = [n for n in model.graph.node if n.name in tail]
    used = {i for n in nodes for i in n.input}
    consts = [helper.make_node("Constant", [], [init.name], value=init, name=f"{init.name}/const")
              for init in model.graph.initializer if init.name in used]
    return helper.make_function(TAIL_DOMAIN, TAIL_FUNCTION, inputs, outputs, consts + nodes,
                                [helper.make_opsetid("", opset)]
                                + [helper.make_opsetid(d, v) for d, v in sorted(other_opsets.items())],
                                doc_string="The analog tail: runs once on the readout of the spiking part.")


def _type_of(model: onnx.ModelProto, name: str) -> dict:
    """The ONNX type of a tensor (base64 TypeProto, any kind), and its elem_type for tensors."""
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.name == name:
            elem = int(vi.type.tensor_type.elem_type) if vi.type.HasField("tensor_type") else None
            return {"elem_type": elem, "onnx_type": base64.b64encode(vi.type.SerializeToString()).decode()}
    return {"elem_type": int(onnx.TensorProto.FLOAT), "onnx_type": None}


def burst_limits(site: Site, cfg: CompileConfig) -> np.ndarray:
    """The most spikes per step of each threshold's neurons (shape of the threshold tensor).

    ``cfg.burst``, except at a Clip(0, c) / ReLU6 site whose cap is kept: there a neuron with
    threshold θ may move its count by at most max(1, ⌊c/θ⌋) per step, so that it never stands
    for more than the cap (bursts of N would let it reach N·θ > c). Measured on MobileNetV2
    (benchmarks/results/convergence_probe_mobilenet.md): without this limit the caps were the
    SNN's error floor at large T. With ``cfg.resolution`` N the thresholds are θ/N and the limit
    N·burst (at a kept cap: ⌊c·N/θ⌋, at most N·burst), so the most per step stays burst·θ."""
    theta = _thresholds64(site, cfg)
    most = float(spikes_per_step(cfg))
    limit = np.full(theta.shape, most)
    if site.cap is not None and cfg.keep_clip_cap:
        with np.errstate(divide="ignore", invalid="ignore"):
            fit = np.floor(site.cap / np.where(theta > 0, theta, np.inf))
        limit = np.clip(np.where(theta > 0, fit, most), 1.0, most)
    return limit.astype(np.float32)


def spikes_per_step(cfg: CompileConfig) -> int:
    """The most spikes a neuron may emit in one step: burst × resolution (a signed ReLU-site
    neuron, or the symmetric neuron of a signed site; an IF neuron emits one)."""
    return cfg.burst * cfg.resolution


def _inverse_thresholds(site: Site, cfg: CompileConfig) -> np.ndarray:
    """1/θ of a site's neurons as emitted (0 for a dead channel: its current is dropped, it
    never fires), shaped to broadcast over ``[N, *shape]``."""
    theta = _thresholds64(site, cfg)
    return np.where(theta > 0, 1.0 / np.where(theta > 0, theta, 1.0), 0.0).astype(np.float32)


def symmetric_ops(cfg: CompileConfig) -> dict[str, str]:
    """The neuron op of a signed site by the units it runs in: ``calibrated`` (θ as an input:
    ``input`` and ``current`` sites, and ``output`` sites on a guarded op with ``increments``
    in units of θ), ``increments`` (units of θ, the op emitting scaled increments) or ``totals``
    (units of θ, integrating the op's scaled totals); each with bursts when burst × resolution > 1."""
    if spikes_per_step(cfg) > 1:
        return {"calibrated": SYMMETRIC_BURST_OP, "increments": UNIT_SYMMETRIC_BURST_OP,
                "totals": TOTAL_SYMMETRIC_BURST_OP}
    return {"calibrated": SYMMETRIC_OP, "increments": UNIT_SYMMETRIC_OP, "totals": TOTAL_SYMMETRIC_OP}


def _burst_input(site: Site, cfg: CompileConfig, shared: gs.Constant) -> gs.Constant:
    limit = burst_limits(site, cfg)
    if np.all(limit == spikes_per_step(cfg)):
        return shared  # the one scalar: models without capped sites are what they were
    return gs.Constant(f"{site.node}/max_spikes_per_step", limit)


def _place_signed_neurons(graph: gs.Graph, sites: list[Site], nodes: dict[str, gs.Node], batch: int | str
                          ) -> tuple[dict[str, gs.Node], dict[str, list[int]]]:
    """Put a (not yet configured) neuron node at each signed site: on the op's output (kind
    ``output``: the op then writes its increments into the neuron) or on its input current
    (``input``: the op then reads the neuron's spikes; ``current``: the weighted op reads them,
    nothing is compensated). Returns the neuron nodes by site and the ops to compensate, with
    the positions of their time-varying inputs."""
    neurons: dict[str, gs.Node] = {}
    ops: dict[str, list[int]] = {}
    taken = set(graph.tensors())
    for site in sites:
        if not site.signed:
            continue
        f = nodes[site.node]
        shape = [batch] + list(site.shape)
        if site.kind == "output":
            y = f.outputs[0]
            inc = gs.Variable(unique_name(taken, f"{y.name}/increment"), dtype=np.float32, shape=shape)
            f.outputs[0] = inc
            neuron = gs.Node(SYMMETRIC_OP, name=f"{site.node}/IF", domain=DOMAIN, inputs=[inc], outputs=[y])
        else:
            z = f.inputs[0]
            spikes = gs.Variable(unique_name(taken, f"{site.node}/spikes"), dtype=np.float32, shape=shape)
            f.inputs[0] = spikes
            if site.kind == "input" and f.outputs[0].shape is None:  # the compensated op's states need it
                f.outputs[0].shape = shape
            neuron = gs.Node(SYMMETRIC_OP, name=f"{site.node}/IF", domain=DOMAIN, inputs=[z], outputs=[spikes])
        graph.nodes.append(neuron)
        neurons[site.node] = neuron
        if site.kind != "current":
            ops[site.node] = list(site.varying)
    return neurons, ops


def emit_spiking(state: PassState) -> onnx.ModelProto:
    """Turn the calibrated graph into the spiking step model (see module doc)."""
    cfg = state.config
    graph = state.graph
    tail = set(state.tail)
    boundary = list(state.boundary)
    final_outputs = [t.name for t in graph.outputs]
    # the tail, with its inputs' types, is cut from the graph before neurons are placed
    full = onnx.shape_inference.infer_shapes(export(graph.copy().cleanup().toposort(), state.opset))
    tail_inputs = [b for b in boundary if any(b in n.input for n in full.graph.node if n.name in tail)]
    tail_outputs = [o for o in final_outputs if o not in boundary]
    restore_output_types(full, state.output_types)
    types = {name: _type_of(full, name) for name in boundary + tail_outputs}

    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    # constants that hold inf / NaN in the source (e.g. a Max against -inf): legitimate, left alone
    nonfinite_before = {name for name, t in tensors.items() if isinstance(t, gs.Constant)
                        and t.values.dtype.kind == "f" and not np.all(np.isfinite(t.values))}
    batch = _batch_dim(graph)
    folder = _ScaleFolder(graph, tail, boundary, state.opset)
    neurons = []
    states: list[dict] = []
    v_outs = []
    if cfg.maxpool == "cumulative":
        for name in state.varying_pools:
            v_outs += _cumulative_maxpool(graph, nodes[name], batch, states)
    # signed sites: a symmetric neuron placed on the op's output or input, the op compensated
    signed_neurons, site_ops = _place_signed_neurons(graph, state.sites, nodes, batch)
    # an output site's neuron runs in units of its threshold: the compensated op before it
    # emits its increments divided by θ (scaled totals), the neuron needs no Div and no Mul
    unit_sites = {site.node for site in state.sites if site.signed and site.kind == "output" and site_ops.get(site.node)}
    scales = {site.node: gs.Constant(f"{site.node}/inverse_threshold", _inverse_thresholds(site, cfg))
              for site in state.sites if site.node in unit_sites}
    # ... and integrates the op's totals, not its increments, where the op keeps no guard (the
    # guard holds the previous total, so it needs it as a state)
    total_sites = frozenset(n for n in unit_sites if not (nodes[n].domain in ("", "ai.onnx", None)
                                                           and nodes[n].op in GUARDED))
    for name in total_sites:
        carried = signed_neurons[name].inputs[0]
        carried.name = carried.name.removesuffix("/increment") + "/total"
    # nonlinear ops kept spiking by expectation compensation (--nonlinear compensate)
    ec_functions, compensated = emit_compensation(graph, {**state.compensated, **site_ops}, batch, state.opset,
                                                  states, v_outs, scales, total_sites)
    op = neuron_op(cfg.neuron, spikes_per_step(cfg))
    signed_ops = symmetric_ops(cfg)
    burst_const = gs.Constant("ann2snn/max_spikes_per_step", np.array(spikes_per_step(cfg), np.float32))
    for site in state.sites:
        if site.signed:
            act = signed_neurons[site.node]
            z, spikes = act.inputs[0], act.outputs[0]
        else:
            act = nodes[site.node]
            z, spikes = tensors[site.pre], tensors[site.post]
        thresholds, values = _neuron_values(site, cfg)
        state_shape = [batch] + list(site.shape)
        v_in = gs.Variable(f"{site.node}/v", dtype=np.float32, shape=state_shape)
        v_out = gs.Variable(f"{site.node}/v_next", dtype=np.float32, shape=state_shape)
        theta = gs.Constant(f"{site.node}/threshold", thresholds)
        unit = site.node in unit_sites
        units = "totals" if site.node in total_sites else "increments" if unit else "calibrated"
        act.op, act.domain, act.attrs = signed_ops[units] if site.signed else op, DOMAIN, {}
        act.name = f"{site.node}/IF"
        act.inputs = [z, v_in] + ([] if unit else [theta]) \
            + ([burst_const] if site.signed and spikes_per_step(cfg) > 1 else [])
        act.outputs = [spikes, v_out]
        graph.inputs.append(v_in)
        v_outs.append(v_out)
        states.append({"input": v_in.name, "output": v_out.name, "shape": list(site.shape),
                       "init": {"value": cfg.v0} if unit else {"threshold": theta.name, "fraction": cfg.v0}})
        extra = {}
        if act.op in COUNTING_OPS:  # the net spike count, a second state starting at 0
            c_in = gs.Variable(f"{site.node}/count", dtype=np.float32, shape=state_shape)
            c_out = gs.Variable(f"{site.node}/count_next", dtype=np.float32, shape=state_shape)
            act.inputs = [z, v_in, c_in, theta] + ([_burst_input(site, cfg, burst_const)] if act.op == BURST_OP else [])
            act.outputs = [spikes, v_out, c_out]
            graph.inputs.append(c_in)
            v_outs.append(c_out)
            states.append({"input": c_in.name, "output": c_out.name, "shape": list(site.shape), "init": "zeros"})
            extra = {"count_in": c_in.name, "count_out": c_out.name}
        with np.errstate(over="ignore", invalid="ignore"):  # checked for finiteness below
            folder.fold(spikes, values)
        emitted = _thresholds64(site, cfg)
        live = emitted[emitted > 0]
        neurons.append({
            "node": act.name, "op": act.op, "state_in": v_in.name, "state_out": v_out.name,
            "threshold": None if unit else theta.name, **extra,
            "spikes": spikes.name, "shape": list(site.shape), "channel_axis": site.channel_axis,
            "v0": cfg.v0, "units": int(np.prod(site.shape)), "dead_channels": int((site.theta <= 0).sum()),
            "theta_min": float(live.min()) if live.size else 0.0, "theta_max": float(live.max()) if live.size else 0.0,
            **({"site": site.kind, "source": site.node} if site.signed else {}),
        })
    for name, t in graph.tensors().items():  # θ folded into weights must stay finite in float32
        if isinstance(t, gs.Constant) and t.values.dtype.kind == "f" and name not in nonfinite_before \
                and not np.all(np.isfinite(t.values)):
            raise DataError(f"folding the thresholds into '{name}' overflows float32; the calibration data drive "
                            "activations out of float32 range: check the data's scale")
    outs = graph.tensors()
    graph.outputs = [outs[b] for b in boundary] + v_outs
    for t in graph.outputs:
        if t.dtype is None:
            t.dtype = np.float32
    graph.cleanup().toposort()
    model = export(graph, state.opset, state.ir_version)
    model.functions.append(neuron_function(op, state.opset))
    emitted_ops = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    model.functions.extend(neuron_function(o, state.opset) for o in signed_ops.values() if o in emitted_ops)
    model.functions.extend(ec_functions)
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    # model-local activation functions (canonicalize_activations), also called from the tail
    model.functions.extend(f for f in activation_functions(graph) if f.name not in {g.name for g in model.functions})
    if tail:
        model.functions.append(_tail_function(full, tail, tail_inputs, tail_outputs, state.opset, state.other_opsets))
        model.opset_import.append(helper.make_opsetid(TAIL_DOMAIN, 1))
        present = {i.domain for i in model.opset_import}
        model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(state.other_opsets.items())
                                  if d not in present and d != DOMAIN)
    if op == IF_OP and state.sites:
        # IF neurons in units of their thresholds: 1/θ folded into the weights that make each
        # neuron's current, thresholds of ones. The artifact itself is then what every fast
        # form of the runtime runs, so no form changes the arithmetic (runtime/reference.py)
        model, _ = unit_form(model, {st["input"]: st["output"] for st in states}, value_types(model))
    model.producer_name, model.producer_version = "ann2snn", __version__
    model.graph.name = "ann2snn_step"
    thetas = np.concatenate([s.theta for s in state.sites]) if state.sites else np.zeros(0)
    meta = {
        "format": 1,
        "version": __version__,
        "config": cfg.to_dict(),
        "source_producer": state.producer,
        "readout": {"t0": int(state.metadata.get("t0", 0)), "min_window": 4},
        # MACs per sample of the source network by where they run: on spikes, in the
        # time-constant prefix, in the analog tail, on compensated increments, on another weighted
        # op's current (partition_graph; the last two only where there are such ops)
        "macs": dict(state.metadata.get("macs", {})),
        "neuron_units": "threshold" if op == IF_OP and state.sites else "calibrated",
        "neurons": neurons,
        "compensated": compensated,
        "states": states,
        "step_outputs": boundary,
        "outputs": final_outputs,
        "types": types,
        "tail": {"domain": TAIL_DOMAIN, "function": TAIL_FUNCTION, "inputs": tail_inputs,
                 "outputs": tail_outputs, "nodes": sorted(tail)} if tail else None,
        "thresholds": {"layers": len(state.sites), "min": float(thetas[thetas > 0].min()) if (thetas > 0).any() else 0.0,
                       "max": float(thetas.max()) if thetas.size else 0.0, "dead": int((thetas <= 0).sum())},
    }
    helper.set_model_props(model, {
        METADATA_KEY: json.dumps(meta, sort_keys=True),
        "ann2snn.version": __version__,
        "ann2snn.method": cfg.method,
        "ann2snn.readout_t0": str(meta["readout"]["t0"]),
        "ann2snn.seed": str(cfg.seed),
    })
    return model
