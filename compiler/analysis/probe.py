"""Where a converted network departs from its ANN, layer by layer (issue 15, convergence).

An IF neuron with threshold θ stands for ``min(ReLU(z), θ)``: its rate·θ approaches that as T
grows, never the part of the activation above θ. So the SNN's error at large T is bounded
below by the error of the *clipped ANN* (every activation clipped at its θ, the clipping
propagated through the network), and what remains at a given T is temporal (rate
quantisation, transients). :func:`probe_layers` measures both on the same data, per neuron
layer:

- ``clipped_fraction``: share of the ANN's activations above the neuron's ceiling (θ; N·θ for
  signed neurons with bursts of N; a dead channel, θ = 0, counts when its activation is
  positive); ``clipped_mass``: the share of the activation's sum above it;
- ``dead_channels`` (θ = 0) and ``dead_active`` (of those, the channels the data do activate);
- ``clip_error``: mean |clipped ANN - ANN| / mean |ANN| at the layer, every activation clipped
  at its ceiling (the floor the SNN cannot
  go below at that layer, whatever T);
- ``snn_error[T]``: mean |rate·θ - ANN| / mean |ANN| at the layer, rate = spikes / T over [0, T);
- the same two for the network's first output (the SNN read out as ``SpikingSession.run`` does).

If ``snn_error`` levels off at ``clip_error`` the thresholds clip; if it stays above it,
the error is temporal (use signed neurons, bursts or a larger T).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..config import CompileConfig
from ..data.arrays import as_array_dict, check_arrays, input_specs
from ..errors import DataError, NodeProblem, UnsupportedModelError
from ..modelio import load_model
from ..ortsession import make_session, run_checked
from ..state import PassState


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).mean(dtype=np.float64))
    return float(np.abs(x - ref).mean(dtype=np.float64)) / scale if scale > 0 else 0.0


def _ceiling(site: Any, cfg: CompileConfig) -> np.ndarray:
    """The most a neuron's rate·θ can stand for: θ, or N·θ for signed neurons with bursts of N
    (they track a steady current up to N·θ per step; at a kept ReLU6 cap N is limited so that
    N·θ <= c, see emit_spiking.burst_limits)."""
    from ann2snn.passes.emit_spiking import burst_limits, site_thresholds

    theta = site_thresholds(site, cfg)
    return theta * burst_limits(site, cfg) if cfg.neuron == "signed" else theta


def _activation_model(state: PassState, clip: bool) -> onnx.ModelProto:
    """The calibrated ANN with every site's output (and the first model output) as outputs;
    with ``clip`` every activation is ``min(ReLU(z), ceiling)``, what the neuron can stand for."""
    from ann2snn.passes._graph import export, restore_output_types

    graph = state.graph.copy()
    nodes, tensors = {n.name: n for n in graph.nodes}, graph.tensors()
    for i, site in enumerate(state.sites):
        out = tensors[site.post]
        if clip:
            act = nodes[site.node]
            act.inputs.clear()
            act.outputs.clear()
            relu = gs.Variable(f"probe/relu_{i}", dtype=np.float32)
            theta = gs.Constant(f"probe/theta_{i}", _ceiling(site, state.config))
            graph.nodes += [gs.Node("Relu", f"probe/Relu_{i}", inputs=[tensors[site.pre]], outputs=[relu]),
                            gs.Node("Min", f"probe/Min_{i}", inputs=[relu, theta], outputs=[out])]
        out.dtype = np.float32
    first = graph.outputs[0]
    graph.outputs = [first] + [tensors[s.post] for s in state.sites if tensors[s.post] is not first]
    return restore_output_types(export(graph.cleanup().toposort(), state.opset), state.output_types)


def _op_of(state: PassState, name: str) -> str:
    """``domain::op`` of the node ``name`` of the state's graph."""
    node = next(n for n in state.graph.nodes if n.name == name)
    return f"{node.domain or 'ai.onnx'}::{node.op}"


def probe_layers(model: str | os.PathLike[str] | onnx.ModelProto, calib: Any, data: Any, Ts: Sequence[int],
                 config: CompileConfig | None = None, **options: Any) -> dict[str, Any]:
    """Compile ``model`` on ``calib`` (``config`` / ``options`` as for ann2snn.compile) and
    compare, on ``data`` (a few dozen samples are enough), each neuron layer's rate·θ after
    each T in ``Ts`` with the ANN's activation and with the clipped ANN's. See the module doc."""
    from ann2snn.passes.emit_spiking import emit_spiking
    from ann2snn.runtime import SpikingSession

    from ..pipeline import run_until

    cfg = CompileConfig.from_options(**{**(config.to_dict() if config is not None else {}), **options})
    proto = load_model(model)
    arrays = as_array_dict(data, input_specs(proto), "probe data")
    check_arrays(arrays, input_specs(proto), "probe data")
    feeds = {s.name: np.asarray(arrays[s.name]) for s in input_specs(proto)}
    state = run_until(proto, cfg, calib, "calibrate_thresholds")
    if not state.sites:
        raise DataError("the model has no neuron layers: there is nothing to probe")
    signed = [s for s in state.sites if s.signed]
    if signed:  # the probe compares rate·θ with ReLU(current): not what a signed site stands for
        raise UnsupportedModelError([NodeProblem(
            s.node, _op_of(state, s.node), "is a signed site (a symmetric signed neuron with its op compensated), which "
            "the probe does not measure yet (it compares rate·θ with ReLU of the neuron's current)",
            "probe the model compiled with '--signed-sites off --no-respike'") for s in signed])
    ann = run_checked(make_session(_activation_model(state, clip=False)), None, feeds, "probe data")
    clipped = run_checked(make_session(_activation_model(state, clip=True)), None, feeds, "probe data")
    from ann2snn.passes.emit_spiking import site_thresholds

    thetas = [site_thresholds(s, cfg) for s in state.sites]
    ceilings = [_ceiling(s, cfg) for s in state.sites]
    sites = [(s.node, s.channel_axis, s.shape) for s in state.sites]
    snn = emit_spiking(state)
    session = SpikingSession(snn, probes=[n["spikes"] for n in session_neurons(snn)])
    Ts = sorted(set(int(T) for T in Ts))
    sums = [np.zeros((len(next(iter(feeds.values()))), *shape), np.float64) for _, _, shape in sites]
    rates: dict[int, list[np.ndarray]] = {}

    def on_step(t: int, values: dict[str, np.ndarray]) -> None:
        for j, name in enumerate(session.probes):
            sums[j] += values[name]
        if t + 1 in Ts:
            rates[t + 1] = [s / (t + 1) * th for s, th in zip(sums, thetas)]

    outputs = session.run_many(feeds, Ts, on_step=on_step)
    offset = 1 if len(ann) == len(sites) + 1 else 0  # the first output is a site's own output otherwise
    layers = []
    for j, (node, axis, _shape) in enumerate(sites):
        a, c, th = np.asarray(ann[j + offset]), np.asarray(clipped[j + offset]), ceilings[j]
        live = np.broadcast_to(th > 0, a.shape)
        above = (a > th) & live | (a > 0) & ~live
        dead = (th.reshape(-1) <= 0)
        per_channel = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).max(axis=1) if th.size > 1 else a.max(keepdims=True)
        total = float(a.sum(dtype=np.float64))
        layers.append({
            "layer": node, "units": int(a[0].size), "theta_max": float(thetas[j].max()),
            "clipped_fraction": float(above.mean()),
            "clipped_mass": float(np.maximum(a - np.where(live, th, 0), 0).sum(dtype=np.float64) / total) if total else 0.0,
            "dead_channels": int(dead.sum()), "dead_active": int((dead & (per_channel > 0)).sum()),
            "clip_error": _rel(c, a),
            "snn_error": {T: _rel(rates[T][j], a) for T in Ts},
        })
    name = session.output_names[0]
    return {
        "config": cfg.to_dict(), "samples": int(len(next(iter(feeds.values())))), "Ts": Ts, "layers": layers,
        "output": {"name": name, "clip_error": _rel(np.asarray(clipped[0]), np.asarray(ann[0])),
                   "snn_error": {T: _rel(outputs[T][name], np.asarray(ann[0])) for T in Ts}},
    }


def session_neurons(snn: onnx.ModelProto) -> list[dict[str, Any]]:
    """The neuron layers of a compiled model, in the order of its sites."""
    from ann2snn.runtime.reference import model_metadata

    return list(model_metadata(snn)["neurons"])


def format_probe(result: dict[str, Any]) -> str:
    """A markdown table of :func:`probe_layers`: one row per neuron layer, then the output."""
    Ts = result["Ts"]
    lines = ["| layer | units | θ max | clipped | clipped mass | dead (active) | clip error | "
             + " | ".join(f"SNN error T={T}" for T in Ts) + " |", "|---" * (7 + len(Ts)) + "|"]
    for r in result["layers"]:
        lines.append(f"| {r['layer']} | {r['units']} | {r['theta_max']:.3g} | {r['clipped_fraction']:.2%} | "
                     f"{r['clipped_mass']:.2%} | {r['dead_channels']} ({r['dead_active']}) | {r['clip_error']:.4f} | "
                     + " | ".join(f"{r['snn_error'][T]:.4f}" for T in Ts) + " |")
    out = result["output"]
    lines.append(f"| output `{out['name']}` | | | | | | {out['clip_error']:.4f} | "
                 + " | ".join(f"{out['snn_error'][T]:.4f}" for T in Ts) + " |")
    return "\n".join(lines)
