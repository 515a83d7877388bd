"""``ann2snn inspect``: what the compiler would do with each node, without calibrating."""
from __future__ import annotations

import os
from typing import Any

import onnx

from ..config import CompileConfig
from ..errors import UnsupportedModelError
from ..macs import node_macs
from ..modelio import load_model
from ..support import REJECTED, reject_reason, role

ROLES = ("neuron", "spiking", "pooling", "prefix", "tail", "folded", "unsupported")


def inspect_model(model: str | os.PathLike[str] | onnx.ModelProto, config: CompileConfig | None = None) -> dict[str, Any]:
    """Per node of the original model: its role in the SNN, MACs, and why (see ROLES).

    Runs the compiler's passes up to the partition (no calibration data needed).
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
    notes = state.metadata.get("prefix_notes", {})
    rows = []
    for name, domain, op in original:
        node = nodes.get(name)
        macs = node_macs(node) if node is not None else 0
        if role(op, "" if domain == "ai.onnx" else domain) == REJECTED:
            kind, why = "unsupported", "; ".join(reject_reason(op, "" if domain == "ai.onnx" else domain))
        elif node is None:
            kind, why = "folded", state.removed.get(name, "folded into a constant")
        elif name in sites:
            s = sites[name]
            units = 1
            for d in s.shape:
                units *= d
            kind, why = "neuron", f"IF neurons, {units} units, integrates '{s.pre}'"
            if s.cap is not None:
                why += (f"; clip cap {s.cap:g} kept (thresholds <= {s.cap:g})" if cfg.keep_clip_cap
                        else f"; clip cap {s.cap:g} dropped (--drop-clip-cap)")
        elif name in pools:
            kind, why = "pooling", "max pool of the running sum of its input (cumulative)"
        elif name in spiking:
            kind, why = "spiking", "affine op on spikes"
        elif name in tail:
            kind, why = "tail", "analog, runs once on the readout"
        elif name in notes:
            kind, why = "prefix", notes[name]
        else:
            kind, why = "prefix", "analog, input is constant in time (direct coding)"
        rows.append({"node": name, "op": f"{domain}::{op}", "role": kind, "macs": macs, "detail": why})
    macs = {k: sum(r["macs"] for r in rows if r["role"] == k) for k in ROLES}
    total = sum(macs.values())
    return {
        "nodes": rows,
        "neuron_layers": len(state.sites),
        "neurons": sum(int(_prod(s.shape)) for s in state.sites),
        "macs": {"total": total, "spiking": macs["spiking"], "prefix": macs["prefix"], "tail": macs["tail"]},
        "boundary": list(state.boundary),
        "problems": problems,
        "notes": _model_notes(state.metadata),
    }


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
              f"analog prefix {m['prefix']:,} = {share('prefix')}, tail {m['tail']:,} = {share('tail')})",
              f"boundary (read out): {', '.join(info['boundary'])}"]
    lines += [f"note: {n}" for n in info.get("notes", [])]
    if info["problems"]:
        lines += ["", "problems:"] + [f"  - {p}" for p in info["problems"]]
    return "\n".join(lines)
