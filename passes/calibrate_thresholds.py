"""Threshold calibration on a copy of the graph (the emitted model never sees the probes).

- ``ltb``: local threshold balancing. Every activation becomes ``min(ReLU(z), θ')`` with
  ``θ' = θ + 2η·mean(ReLU(z − θ))`` computed inside the same forward pass, so each layer
  sees the clipped outputs of the layers before it. One onnxruntime session: θ is fed in
  as an input and θ' read back, K times.
- ``max`` / ``percentile``: the largest / p-th percentile pre-activation seen on the
  calibration data, on the unclipped ANN (the classic data-based normalisations).

Granularity ``channel`` keeps one θ per channel (conv) or neuron (fully connected),
``layer`` one per layer. With ``keep_clip_cap``, θ <= c for Clip(0, c) / ReLU6 sites.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import onnx_graphsurgeon as gs

from ann2snn.data.arrays import CalibrationSource, input_specs
from ann2snn.errors import DataError, PassError
from ann2snn.ortsession import make_session, run_checked
from ann2snn.progress import progress
from ann2snn.resources import GIB, check_calibration_memory
from ann2snn.state import PassState, Site

from ._graph import export, restore_output_types

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


def _check_finite(values: np.ndarray, site: Site, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise DataError(
            f"calibration overflowed at activation '{site.node}': its {what} is not finite (NaN/Inf in float32); "
            "check the calibration data's scale and the model's weights"
        )


def _calibrate_ltb(state: PassState, source: CalibrationSource) -> None:
    cfg = state.config
    graph = state.graph.copy()
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    b = _Builder(graph, state.opset, "ltb")
    theta_inputs, theta_outputs, stat_outputs = [], [], []
    for i, site in enumerate(state.sites):
        act = nodes[site.node]
        z, out = tensors[site.pre], act.outputs[0]
        act.inputs.clear()
        act.outputs.clear()
        shape = site.theta_shape(cfg.granularity)
        theta = gs.Variable(f"ltb/theta_{i}", dtype=np.float32, shape=list(shape))
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
    sess = make_session(export(graph.cleanup().toposort(), state.opset), cfg.threads)
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
    if n_batches == 0:
        raise DataError("calibration saw no batch; provide calibration data with at least one sample")
    state.metadata["calibration"] = {"method": "ltb", "batches": n_batches, "samples": samples}
    for site, th, st in zip(state.sites, thetas, stats):
        _check_finite(th, site, "threshold")
        site.theta = th.reshape(-1).astype(np.float32)
        site.mean_act = (st / n_batches).astype(np.float32)


def _calibrate_stats(state: PassState, source: CalibrationSource) -> None:
    """max-norm and percentile norm, on the unclipped ANN."""
    cfg = state.config
    graph = state.graph.copy()
    tensors = graph.tensors()
    graph.outputs = [tensors[s.pre] for s in state.sites]
    for t in graph.outputs:
        t.dtype = np.float32
    sess = make_session(export(graph.cleanup().toposort(), state.opset), cfg.threads)
    names = [t.name for t in graph.outputs]
    per_channel = cfg.granularity == "channel"
    maxima: list[np.ndarray | None] = [None] * len(state.sites)
    values: list[list[np.ndarray]] = [[] for _ in state.sites]
    sums = [np.zeros(s.shape, np.float64) for s in state.sites]
    n = source.size
    iters = cfg.iters if n is None else min(cfg.iters, max(1, math.ceil(n / cfg.batch)))
    seen = 0
    for feeds in progress(source.batches(iters, cfg.batch, cfg.seed), iters, f"calibrating ({cfg.method})", cfg.progress):
        for j, (site, z) in enumerate(zip(state.sites, run_checked(sess, names, feeds, "calibration data"))):
            sums[j] += np.maximum(z, 0).mean(axis=0)
            zc = np.moveaxis(np.asarray(z), site.channel_axis, 0).reshape(site.shape[site.channel_axis - 1], -1)
            flat = zc if per_channel else zc.reshape(1, -1)
            if cfg.method == "max":
                m = flat.max(axis=1)
                maxima[j] = m if maxima[j] is None else np.maximum(maxima[j], m)
            else:
                values[j].append(flat.astype(np.float32, copy=False))  # z is a fresh array: no copy needed
        seen += 1
    if seen == 0:
        raise DataError("calibration saw no batch; provide calibration data with at least one sample")
    state.metadata["calibration"] = {"method": cfg.method, "batches": seen}
    for j, site in enumerate(state.sites):
        if cfg.method == "max":
            th = maxima[j]
        else:
            th = np.percentile(np.concatenate(values[j], axis=1), cfg.percentile, axis=1)
        th = np.maximum(np.asarray(th, np.float64), 0.0)
        if site.cap is not None and cfg.keep_clip_cap:
            th = np.minimum(th, site.cap)
        _check_finite(th, site, "threshold")
        site.theta = th.astype(np.float32).reshape(-1)
        site.mean_act = (sums[j] / seen).astype(np.float32)


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
        run_checked(make_session(model), None, sample, "calibration data")
    if state.config.method == "ltb":
        _calibrate_ltb(state, source)
    else:
        _calibrate_stats(state, source)
    # a signed neuron's spike count tracks its rounded cumulative input from the first step,
    # so there is no transient to skip: read out from t = 0
    state.metadata["t0"] = 0 if cfg.neuron == "signed" else estimate_t0(state)
    return state
