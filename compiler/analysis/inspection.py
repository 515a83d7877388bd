"""``ann2snn inspect``: what the compiler would do with each node, without calibrating."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from ..config import CompileConfig
from ..errors import ConfigError, UnsupportedModelError
from ..macs import node_macs
from ..modelio import load_model
from ..support import REJECTED, analog_reason, reject_reason, role

ROLES = ("neuron", "spiking", "compensated", "pooling", "prefix", "tail", "folded", "unsupported")


class _Sizes:
    """Stands in for calibration data where only the input sizes are known (fix_input_sizes)."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, Any]) -> None:
        self.shapes, self.dtypes = shapes, dtypes

    def first(self, n: int) -> dict[str, np.ndarray]:
        return {k: np.zeros([n] + [int(d) for d in v[1:]], self.dtypes.get(k, np.float32))
                for k, v in self.shapes.items()}


def compiled_input_shapes(compiled: str | os.PathLike[str] | onnx.ModelProto) -> dict[str, list[int]]:
    """The per-sample input sizes a compiled model was built for (its data inputs, batch first)."""
    proto = load_model(compiled)
    init = {i.name for i in proto.graph.initializer}
    shapes = {}
    for i in proto.graph.input:
        if i.name in init or i.name.endswith(("/v", "/count")):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in i.type.tensor_type.shape.dim]
        shapes[i.name] = dims
    return shapes


def inspect_model(model: str | os.PathLike[str] | onnx.ModelProto, config: CompileConfig | None = None,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  compiled: str | os.PathLike[str] | onnx.ModelProto | None = None) -> dict[str, Any]:
    """Per node of the original model: its role in the SNN, MACs, and why (see ROLES).

    Runs the compiler's passes up to the partition (no calibration data needed). Inputs with
    symbolic sizes (e.g. H x W) take ``input_shapes`` (input name -> shape, batch first), or
    the sizes of ``compiled``, the model compiled from it, so that MACs can be counted.
    """
    from ann2snn.passes._graph import unique_name
    from ann2snn.passes.import_model import import_model
    from ann2snn.passes.partition_graph import partition_graph

    from ..pipeline import PIPELINE

    cfg = config or CompileConfig()
    proto = load_model(model)
    taken: set[str] = set()
    for n in proto.graph.node:  # the names import_model would give; they survive an opset upgrade,
        n.name = unique_name(taken, n.name or f"{n.op_type}_{len(taken)}")  # which may add nodes
    original = [(n.name, n.domain or "ai.onnx", n.op_type) for n in proto.graph.node]
    state = import_model(proto, cfg)
    names = {t.name for t in state.graph.inputs}
    unknown = sorted(set(input_shapes or {}) - names)
    if unknown:  # a mistyped name would otherwise be dropped and the sizes stay unknown
        raise ConfigError(f"--input-shape names {', '.join(repr(u) for u in unknown)}, which is not an input of "
                          f"the model; its inputs are {', '.join(repr(n) for n in sorted(names))}")
    if compiled is not None and input_shapes is None:
        input_shapes = compiled_input_shapes(compiled)
    if input_shapes:
        dtypes = {t.name: t.dtype for t in state.graph.inputs if t.dtype is not None}
        state.calib = _Sizes({k: v for k, v in input_shapes.items() if k in dtypes or k in names}, dtypes)
    problems: list[str] = []
    # the compiler's own passes from after check_support (unsupported ops are listed here
    # instead of raised) up to the partition
    order = [p.name for p in PIPELINE]
    for p in PIPELINE[order.index("check_support") + 1:order.index("partition_graph")]:
        p.run(state)
    try:
        partition_graph(state)
    except UnsupportedModelError as exc:
        problems.extend(str(p) for p in exc.problems)
    problems.extend(str(p) for p in state.problems)
    nodes = {n.name: n for n in state.graph.nodes}
    sites = {s.node: s for s in state.sites}
    spiking, tail, pools = set(state.spiking), set(state.tail), set(state.varying_pools)
    absorbed: dict[str, str] = state.metadata.get("absorbed", {})
    reasons = _tail_reasons(state.graph, tail, spiking | set(sites))
    rows = []
    for name, domain, op in original:
        node = nodes.get(name)
        part_of = absorbed.get(name)
        if node is None and part_of in nodes:  # one of the ops of a written-out activation
            name_for_role, node = part_of, None
            canon = nodes[part_of]
        else:
            name_for_role, canon = name, node
        macs = node_macs(node) if node is not None else 0
        recognised = ""
        if canon is not None and (canon.op != op or part_of):
            label = f"{canon.domain}::{canon.op}" if canon.domain else canon.op
            recognised = (f"part of {label} written out, recognised as one op '{canon.name}'; " if part_of
                          else f"{op} recognised as {label}; ")
        kind, why = _classify_row(name_for_role, op, domain, canon, state, cfg, sites, pools, spiking, tail, reasons)
        rows.append({"node": name, "op": f"{domain}::{op}", "role": kind, "macs": macs, "detail": recognised + why})
    macs = {k: sum(r["macs"] for r in rows if r["role"] == k) for k in ROLES}

    def on(key: str) -> int:  # MACs of the spiking-part ops that partition_graph lists under ``key``
        return sum(r["macs"] for r in rows if r["role"] == "spiking" and r["node"] in state.metadata.get(key, ()))

    # weighted ops on a compensated op's increments take real values, not spikes: count them with
    # it; those on another weighted op's current (no neuron between them) have their own share
    behind, currents = on("on_increments"), on("on_currents")
    macs["spiking"], macs["compensated"] = macs["spiking"] - behind - currents, macs["compensated"] + behind
    total = sum(macs.values()) + currents
    return {
        "nodes": rows,
        "neuron_layers": len(state.sites),
        "neurons": sum(int(_prod(s.shape)) for s in state.sites),
        "macs": {"total": total, "spiking": macs["spiking"], "prefix": macs["prefix"], "tail": macs["tail"],
                 **({"compensated": macs["compensated"]}
                    if state.compensated or any(s.signed for s in state.sites) else {}),
                 **({"analog_current": currents} if currents else {})},
        "boundary": list(state.boundary),
        "problems": problems,
        "notes": _model_notes(state.metadata),
    }


def _tail_reasons(graph: Any, tail: set[str], spiking: set[str]) -> dict[str, str]:
    """Why each tail node is analog: the nodes that end the spiking part give their op's reason,
    the nodes after them name where the spiking part ended."""
    reasons: dict[str, str] = {}
    producers = {t.name: n for n in graph.nodes for t in n.outputs}
    ends: dict[str, str] = {}  # tensor -> the tail node it descends from
    for n in graph.nodes:
        if n.name not in tail:
            continue
        ins = [t for t in n.inputs if t.name]
        from_spikes = [bool(t.name in producers and producers[t.name].name in spiking) for t in ins]
        upstream = [ends[t.name] for t in ins if t.name in ends]
        if any(from_spikes) and not upstream:
            varying = [bool(t.name in producers and (producers[t.name].name in spiking or producers[t.name].name
                                                     in tail)) for t in n.inputs]
            reasons[n.name] = "ends the spiking part: " + analog_reason(n.op, n.domain or "", varying)
            origin = n.name
        elif upstream:
            origin = upstream[0]
            reasons[n.name] = f"analog, runs once on the readout (in the tail after '{origin}')"
        else:
            origin = n.name
            reasons[n.name] = "analog, runs once on the readout"
        for t in n.outputs:
            ends[t.name] = origin
    return reasons


def _classify_row(name: str, op: str, domain: str, node: Any, state: Any, cfg: CompileConfig, sites: dict,
                  pools: set[str], spiking: set[str], tail: set[str], reasons: dict[str, str]) -> tuple[str, str]:
    """(role, detail) of one row."""
    plain = "" if domain == "ai.onnx" else domain
    if role(op, plain) == REJECTED:
        return "unsupported", "; ".join(reject_reason(op, plain))
    if node is None:
        return "folded", state.removed.get(name, "folded into a constant")
    if name in sites and sites[name].signed:
        s = sites[name]
        most = cfg.burst * cfg.resolution
        spikes = "spikes of ±1" if most == 1 else f"up to {most} spikes of ±θ/{cfg.resolution} per step"
        units = f"symmetric signed neurons ({spikes}), {_prod(s.shape)} units"
        if s.kind == "current":
            return "spiking", (f"weighted op on spikes: {units} re-spike the current '{s.pre}' of the weighted op "
                               "before it (--respike-currents)")
        if name not in state.metadata.get("signed_activations", ()):
            return "compensated", ("expectation-compensated: keeps the running sum of its time-varying input(s) and "
                                   "emits the increment of t·f(mean input) (--nonlinear compensate); "
                                   f"{units} re-spike its output for the weighted op after it (--respike)")
        if s.kind == "output":
            return "neuron", (f"signed activation site (--signed-sites output): {op} expectation-compensated on its "
                              f"input current '{s.pre}', {units} on its output")
        return "neuron", (f"signed activation site (--signed-sites input): {units} integrate '{s.pre}', {op} "
                          "expectation-compensated on their spikes (what reads it reads increments)")
    if name in sites:
        s = sites[name]
        why = f"IF neurons, {_prod(s.shape)} units, integrates '{s.pre}'"
        if s.cap is not None:
            why += (f"; clip cap {s.cap:g} kept (thresholds <= {s.cap:g})" if cfg.keep_clip_cap
                    else f"; clip cap {s.cap:g} dropped (--drop-clip-cap)")
        return "neuron", why
    if name in pools:
        return "pooling", "max pool of the running sum of its input (cumulative)"
    if name in state.compensated:
        return "compensated", ("expectation-compensated: keeps the running sum of its time-varying input(s) and "
                               "emits the increment of t·f(mean input) (--nonlinear compensate)")
    if name in state.metadata.get("on_increments", ()):
        return "spiking", "affine op on the real-valued increments of a compensated op (not spikes)"
    if name in state.metadata.get("on_currents", ()):
        return "spiking", ("weighted op on the real-valued current of the weighted op before it (no neuron between "
                           "them): multiplies real values at every step, not spikes")
    if name in spiking:
        return "spiking", "affine op on spikes"
    if name in tail:
        why_not = state.metadata.get("not_compensated", {}).get(name)
        return "tail", reasons.get(name, "analog, runs once on the readout") + (
            f" (not compensated: {why_not})" if why_not and reasons.get(name, "").startswith("ends") else "")
    notes = state.metadata.get("prefix_notes", {})
    if name in notes:
        return "prefix", notes[name]
    return "prefix", "analog, input is constant in time (direct coding)"


def _model_notes(meta: dict[str, Any]) -> list[str]:
    """What the compiler does to the model as a whole: old-export quirks, the batch."""
    notes = []
    src = meta.get("source", {})
    if src.get("initializers_as_inputs"):
        notes.append(f"{src['initializers_as_inputs']} initializer(s) are also listed as graph inputs (old export: "
                     f"IR {src['ir_version']}, opset {src['opset']}); compiled as constants, not inputs")
    if "batch" in meta:
        notes.append(f"batch: {meta['batch']}")
    return notes


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def format_inspection(info: dict[str, Any]) -> str:
    """A text table of ``inspect_model``'s result."""
    width = max([len(r["node"]) for r in info["nodes"]] + [4])
    op_width = max([len(r["op"]) for r in info["nodes"]] + [2])
    lines = [f"{'node':<{width}}  {'op':<{op_width}}  {'role':<11} {'MACs':>12}  detail"]
    for r in info["nodes"]:
        lines.append(f"{r['node']:<{width}}  {r['op']:<{op_width}}  {r['role']:<11} {r['macs']:>12,}  {r['detail']}")
    m = info["macs"]
    share = (lambda k: f"{100.0 * m[k] / m['total']:.1f}%") if m["total"] else (lambda k: "-")
    lines += ["", f"neuron layers: {info['neuron_layers']}, neurons: {info['neurons']:,}",
              f"MACs per sample: {m['total']:,} (spiking part {m['spiking']:,} = {share('spiking')}, "
              f"analog prefix {m['prefix']:,} = {share('prefix')}, tail {m['tail']:,} = {share('tail')}"
              + (f", compensated ops and the ops on their increments {m['compensated']:,} = {share('compensated')}"
                 if "compensated" in m else "")
              + (f", on another weighted op's current {m['analog_current']:,} = {share('analog_current')}"
                 if "analog_current" in m else "") + ")",
              f"boundary (read out): {', '.join(info['boundary'])}"]
    lines += [f"note: {n}" for n in info.get("notes", [])]
    if info["problems"]:
        lines += ["", "problems:"] + [f"  - {p}" for p in info["problems"]]
    return "\n".join(lines)
