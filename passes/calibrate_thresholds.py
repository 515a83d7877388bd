"""Threshold calibration on a copy of the graph (the emitted model never sees the probes).

- ``ltb``: local threshold balancing. Every activation becomes ``min(ReLU(z), θ')`` with
  ``θ' = θ + 2η·mean(ReLU(z − θ))`` computed inside the same forward pass, so each layer
  sees the clipped outputs of the layers before it. One onnxruntime session: θ is fed in
  as an input and θ' read back, K times.
- ``max`` / ``percentile``: the largest / p-th percentile pre-activation seen on the
  calibration data, on the unclipped ANN (the classic data-based normalisations).

Granularity ``channel`` keeps one θ per channel (conv) or neuron (fully connected),
``layer`` one per layer. With ``keep_clip_cap``, θ <= c for Clip(0, c) / ReLU6 sites.
With ``ray`` set, the same calibration runs on Ray workers (ann2snn.distributed_calibration).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ann2snn.data.arrays import CalibrationSource, input_specs
from ann2snn.errors import NodeProblem, PassError, UnsupportedModelError
from ann2snn.ortsession import make_session, run_checked
from ann2snn.progress import progress
from ann2snn.resources import GIB, check_calibration_memory
from ann2snn.state import PassState, Site

from ._graph import export, restore_output_types
from ._thresholds import channel_rows, finish_ltb, finish_stats, stats_iters

log = logging.getLogger(__name__)


def _reduce_axes(site: Site, per_channel: bool) -> list[int]:
    rank = len(site.shape) + 1
    return [a for a in range(rank) if not (per_channel and a == site.channel_axis)]


class _Builder:
    """Appends nodes to a graph with fresh, readable names."""

    def __init__(self, graph: gs.Graph, opset: int, prefix: str) -> None:
        self.graph, self.opset, self.prefix, self.count = graph, opset, prefix, 0

    def op(self, op: str, inputs: list[gs.Tensor], attrs: dict | None = None, out: gs.Variable | None = None) -> gs.Variable:
        self.count += 1
        out = out or gs.Variable(f"{self.prefix}/{op}_{self.count}", dtype=np.float32)
        self.graph.nodes.append(gs.Node(op, name=f"{self.prefix}/{op}_{self.count}", inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    def reduce_mean(self, x: gs.Tensor, axes: list[int]) -> gs.Variable:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, gs.Constant(f"{self.prefix}/axes_{self.count}", np.array(axes, np.int64))],
                           {"keepdims": 1})
        return self.op("ReduceMean", [x], {"axes": axes, "keepdims": 1})

    def const(self, value: float) -> gs.Constant:
        self.count += 1
        return gs.Constant(f"{self.prefix}/c_{self.count}", np.array(value, np.float32))


def _signed_ltb_site(b: _Builder, act: gs.Node, site: Site, theta: gs.Variable, per_channel: bool,
                     eta: float) -> tuple[gs.Variable, gs.Variable]:
    """LTB at a signed site, on both signs with one θ: θ' = θ + 2η·mean(ReLU(|p| − θ)), and the
    probed tensor p (the node's output, or its input for kinds ``input`` and ``current``) is clipped
    to [−θ', θ'] (for the node alone: what else reads its input reads it unclipped).
    Returns (θ', the mean |p| per neuron)."""
    if site.kind == "output":
        out = act.outputs[0]
        raw = gs.Variable(f"{b.prefix}/raw_{b.count}", dtype=np.float32)
        act.outputs[0] = raw
        p = raw
    else:
        p = act.inputs[0]
    size = b.op("Abs", [p])
    excess = b.op("Sub", [size, b.op("Min", [size, theta])])  # ReLU(|p| - θ), θ >= 0
    step = b.op("Mul", [b.reduce_mean(excess, _reduce_axes(site, per_channel)), b.const(2.0 * eta)])
    new_theta = b.op("Add", [theta, step])
    clipped = b.op("Max", [b.op("Min", [p, new_theta]), b.op("Neg", [new_theta])],
                   out=out if site.kind == "output" else None)
    if site.kind in ("input", "current"):  # only this node reads the clipped input
        act.inputs[0] = clipped
    return new_theta, b.reduce_mean(size, [0])


def _check_compensated_finite(state: PassState, model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> None:
    """Run the ANN ``model`` on ``sample``; every compensated op's output must be finite there.
    Where the ANN itself gives inf / NaN, the op's running mean has nothing finite to converge to
    and its guard (runtime/compensation.py) would hold it at its last finite total: refuse it."""
    # the wrapped ops, and the ops of signed sites (an activation or a re-spiked op, compensated too)
    wrapped = set(state.compensated) | {s.node for s in state.sites if s.signed}
    nodes = {n.name: n for n in state.graph.nodes if n.name in wrapped}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # probes go on a copy, never on the model that is emitted
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n.outputs[0].name, onnx.TensorProto.FLOAT, None)
                              for n in nodes.values() if n.outputs[0].name not in have)
    values = dict(zip([o.name for o in probe.graph.output],
                      run_checked(make_session(probe, device=state.config.device), None, sample, "calibration data")))
    count = next(iter(sample.values())).shape[0]
    problems = []
    for name in sorted(nodes):
        node = nodes[name]
        v = np.asarray(values[node.outputs[0].name])
        bad = int(v.size - np.count_nonzero(np.isfinite(v)))
        if bad:
            before = next((t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant)), "<its input>")
            problems.append(NodeProblem(
                name, f"{node.domain or 'ai.onnx'}::{node.op}",
                f"gives {bad} of {v.size} values inf / NaN in the ANN itself on the first {count} calibration "
                "sample(s), so its compensated running mean has nothing finite to converge to",
                f"fix the model (e.g. an epsilon before the division, Sqrt or Log), or end the spiking part before "
                f"it with --spiking-until {before} (or keep nonlinear ops analog: --nonlinear analog)"))
    if problems:
        raise UnsupportedModelError(problems, f"{len(problems)} compensated op(s) cannot be made numerically safe")


def _calibrate_ltb(state: PassState, source: CalibrationSource) -> None:
    cfg = state.config
    graph = state.graph.copy()
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    b = _Builder(graph, state.opset, "ltb")
    theta_inputs, theta_outputs, stat_outputs = [], [], []
    for i, site in enumerate(state.sites):
        act = nodes[site.node]
        shape = site.theta_shape(cfg.granularity)
        theta = gs.Variable(f"ltb/theta_{i}", dtype=np.float32, shape=list(shape))
        if site.signed:
            new_theta, stat = _signed_ltb_site(b, act, site, theta, cfg.granularity == "channel", cfg.eta)
            theta_inputs.append(theta)
            theta_outputs.append(new_theta)
            stat_outputs.append(stat)
            continue
        z, out = tensors[site.pre], act.outputs[0]
        act.inputs.clear()
        act.outputs.clear()
        capped = site.cap is not None and cfg.keep_clip_cap
        relu = b.op("Relu", [z])  # z's only consumer: onnxruntime fuses it into the Conv / Gemm
        if not capped or site.cap >= 0:
            # θ >= 0 here (it starts at 0 and only grows, or is capped at c >= 0), so
            # ReLU(z) - min(ReLU(z), θ) is ReLU(z - θ), bit for bit, and reuses ReLU(z)
            excess = b.op("Sub", [relu, b.op("Min", [relu, theta])])
        else:
            excess = b.op("Relu", [b.op("Sub", [z, theta])])
        step = b.op("Mul", [b.reduce_mean(excess, _reduce_axes(site, cfg.granularity == "channel")), b.const(2.0 * cfg.eta)])
        new_theta = b.op("Add", [theta, step])
        if capped:
            new_theta = b.op("Min", [new_theta, b.const(site.cap)])
        stat = b.reduce_mean(relu, [0])  # per neuron: mean over the batch
        b.op("Min", [relu, new_theta], out=out)
        theta_inputs.append(theta)
        theta_outputs.append(new_theta)
        stat_outputs.append(stat)
    graph.inputs = list(graph.inputs) + theta_inputs
    graph.outputs = theta_outputs + stat_outputs
    sess = make_session(export(graph.cleanup().toposort(), state.opset), cfg.threads, device=cfg.device)
    out_names = [t.name for t in graph.outputs]
    thetas = [np.zeros(s.theta_shape(cfg.granularity), np.float32) for s in state.sites]
    stats = [np.zeros(s.shape, np.float64) for s in state.sites]
    n_batches = 0
    batches = source.batches(cfg.iters, cfg.batch, cfg.seed)
    samples = 0
    start = time.perf_counter()
    for feeds in progress(batches, cfg.iters, "calibrating (LTB)", cfg.progress):
        feeds = dict(feeds)
        samples += len(next(iter(feeds.values())))
        feeds.update({t.name: th for t, th in zip(theta_inputs, thetas)})
        results = run_checked(sess, out_names, feeds, "calibration data")
        thetas = [np.asarray(r, np.float32) for r in results[: len(thetas)]]
        for j, r in enumerate(results[len(thetas):]):
            stats[j] += np.asarray(r, np.float64).reshape(stats[j].shape)
        n_batches += 1
    elapsed = time.perf_counter() - start
    # for benchmarks/speed.py (the compiled model carries no timing: its output stays deterministic)
    log.debug("LTB calibration: %d iterations in %.3f s", n_batches, elapsed,
              extra={"ltb_iterations": n_batches, "ltb_seconds": elapsed})
    finish_ltb(state, thetas, stats, n_batches, samples)


def _calibrate_stats(state: PassState, source: CalibrationSource) -> None:
    """max-norm and percentile norm, on the unclipped ANN."""
    cfg = state.config
    graph = state.graph.copy()
    tensors = graph.tensors()
    graph.outputs = [tensors[s.probe] for s in state.sites]
    for t in graph.outputs:
        t.dtype = np.float32
    sess = make_session(export(graph.cleanup().toposort(), state.opset), cfg.threads, device=cfg.device)
    names = [t.name for t in graph.outputs]
    per_channel = cfg.granularity == "channel"
    maxima: list[np.ndarray | None] = [None] * len(state.sites)
    values: list[list[np.ndarray]] = [[] for _ in state.sites]
    sums = [np.zeros(s.shape, np.float64) for s in state.sites]
    iters = stats_iters(cfg, source.size)
    seen = 0
    for feeds in progress(source.batches(iters, cfg.batch, cfg.seed), iters, f"calibrating ({cfg.method})", cfg.progress):
        for j, (site, z) in enumerate(zip(state.sites, run_checked(sess, names, feeds, "calibration data"))):
            if site.signed:  # one θ for both signs: the statistics of |value|
                z = np.abs(z)
            sums[j] += np.maximum(z, 0).mean(axis=0)
            flat = channel_rows(z, site, per_channel)
            if cfg.method == "max":
                m = flat.max(axis=1)
                maxima[j] = m if maxima[j] is None else np.maximum(maxima[j], m)
            else:
                values[j].append(flat.astype(np.float32, copy=False))  # z is a fresh array: no copy needed
        seen += 1
    finish_stats(state, maxima, values, sums, seen)


def estimate_t0(state: PassState) -> int:
    """Readout delay: Σ over layers of min over neurons of (θ − v(0)) / E[ReLU(z)].

    Each term is the time the layer's fastest neuron needs to charge from v(0) to θ at its
    mean input, i.e. when the layer starts to pass the signal on.
    """
    total = 0.0
    for site in state.sites:
        theta = np.broadcast_to(np.asarray(site.theta).reshape(site.theta_shape(state.config.granularity))[0],
                                site.shape)
        live = (theta > 0) & (site.mean_act > 0)
        if not live.any():
            continue
        total += float(np.min(theta[live] * (1.0 - state.config.v0) / site.mean_act[live]))
    return round(total)


def calibrate_thresholds(state: PassState) -> PassState:
    """Set ``theta`` and ``mean_act`` on every site from the calibration data."""
    if state.calib is None:
        raise PassError("calibration data is required; pass --calib data.npz (or calib= in the API)")
    if not state.sites:
        state.metadata["t0"] = 0
        return state
    model = restore_output_types(export(state.graph.copy().cleanup(), state.opset), state.output_types)
    cfg = state.config
    check_calibration_memory(model, cfg.batch, int(cfg.max_memory * GIB) if cfg.max_memory else None)
    source = state.calib if isinstance(state.calib, CalibrationSource) else CalibrationSource(
        state.calib, input_specs(model), cfg.preprocess())
    sample = source.first(min(8, cfg.batch))  # a model compiled for batch 1 takes one sample
    if sample is not None:  # the whole ANN, tail included, must run on the data before we calibrate
        _check_compensated_finite(state, model, sample)
    if cfg.ray:
        from ann2snn.distributed_calibration import calibrate_ray

        calibrate_ray(state, source)
    elif cfg.method == "ltb":
        _calibrate_ltb(state, source)
    else:
        _calibrate_stats(state, source)
    # a signed neuron's spike count tracks its rounded cumulative input from the first step,
    # so there is no transient to skip: read out from t = 0
    state.metadata["t0"] = 0 if cfg.neuron == "signed" else estimate_t0(state)
    return state
