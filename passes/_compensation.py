"""Emission of the expectation-compensated ops (``--nonlinear compensate``), for emit_spiking.

Each node that partition_graph marked compensated becomes a call of a model-local function
``ann2snn::ExpectationCompensated<Op>`` (runtime/compensation.py) with its states as graph
inputs / outputs, like the neurons: the running sum of each time-varying input, the previous
total and the step count, all starting at 0.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from ann2snn.runtime.compensation import EC_PREFIX, STEP_COUNT, compensated_function
from ann2snn.runtime.ops import DOMAIN
from ann2snn.support import ACTIVATION_DOMAIN


def emit_compensation(graph: gs.Graph, compensated: dict[str, list[int]], batch: int | str, opset: int,
                      states: list[dict], state_outs: list[gs.Variable], scales: dict[str, gs.Constant] | None = None,
                      totals: frozenset[str] = frozenset()) -> tuple[list[onnx.FunctionProto], list[dict]]:
    """Rewrite every compensated node in place; return the functions they call and their metadata.
    ``scales``: node -> the constant its totals are multiplied by (1/θ of the neuron after it);
    ``totals``: the scaled nodes that emit their totals, not increments (no total state)."""
    scales = scales or {}
    nodes = {n.name: n for n in graph.nodes}
    step_of_rank = _step_counter(graph, batch, states, state_outs) if compensated else {}
    functions: dict[bytes, onnx.FunctionProto] = {}
    per_op: dict[str, int] = {}
    info: list[dict] = []
    for name, varying in compensated.items():
        node = nodes[name]
        proto = OnnxExporter.export_node(node)
        key = proto.op_type.encode() + proto.domain.encode() + bytes(varying) + \
            b"".join(a.SerializeToString() for a in proto.attribute) + \
            bytes(int(bool(i)) for i in proto.input) + (b"scaled" if name in scales else b"") \
            + (b"totals" if name in totals else b"")
        if key not in functions:
            count = per_op.get(node.op, 0)
            per_op[node.op] = count + 1
            fname = f"{EC_PREFIX}{node.op}" + (f"_{count}" if count else "")
            opsets = {"": opset, **({ACTIVATION_DOMAIN: 1} if node.domain == ACTIVATION_DOMAIN else {})}
            functions[key] = compensated_function(fname, proto, varying, opsets, scaled=name in scales,
                                                  totals=name in totals)
        fname = functions[key].name
        xs = [node.inputs[j] for j in varying]
        consts = [t for j, t in enumerate(node.inputs) if t.name and j not in varying]
        y = node.outputs[0]

        def state(suffix: str, shape: list) -> tuple[gs.Variable, gs.Variable]:
            s_in = gs.Variable(f"{name}/{suffix}", dtype=np.float32, shape=[batch] + shape)
            s_out = gs.Variable(f"{name}/{suffix}_next", dtype=np.float32, shape=[batch] + shape)
            graph.inputs.append(s_in)
            state_outs.append(s_out)
            states.append({"input": s_in.name, "output": s_out.name, "shape": [int(d) for d in shape],
                           "init": "zeros"})
            return s_in, s_out

        sums = [state(f"sum{i}", list(x.shape[1:])) for i, x in enumerate(xs)]
        total = None if name in totals else state("total", list(y.shape[1:]))
        info.append({"node": name, "op": node.op, "function": fname, "varying_inputs": list(varying),
                     "states": [s.name for s, _ in sums] + ([total[0].name] if total else []),
                     "step_count": STEP_COUNT, **({"emits": "totals"} if total is None else {})})
        node.op, node.domain, node.attrs = fname, DOMAIN, {}
        node.inputs = xs + [s for s, _ in sums] + ([total[0]] if total else []) + [step_of_rank(len(y.shape))] \
            + [step_of_rank(len(x.shape)) for x in xs] + consts + ([scales[name]] if name in scales else [])
        node.outputs = [y] + [s for _, s in sums] + ([total[1]] if total else [])
    return list(functions.values()), info


def _step_counter(graph: gs.Graph, batch: int | str, states: list[dict], state_outs: list[gs.Variable]):
    """The graph's one step counter for all compensated ops: a state [N, 1] starting at 0, the
    step number t = count + 1, and t reshaped to [N, 1, ..., 1] once per rank asked for."""
    count = gs.Variable(STEP_COUNT, dtype=np.float32, shape=[batch, 1])
    count_next = gs.Variable(f"{STEP_COUNT}_next", dtype=np.float32, shape=[batch, 1])
    graph.inputs.append(count)
    state_outs.append(count_next)
    states.append({"input": count.name, "output": count_next.name, "shape": [1], "init": "zeros"})
    graph.nodes.append(gs.Node("Add", name=f"{STEP_COUNT}/step", inputs=[count, gs.Constant(
        f"{STEP_COUNT}/one", np.ones(1, np.float32))], outputs=[count_next]))
    by_rank: dict[int, gs.Variable] = {}

    def of_rank(rank: int) -> gs.Variable:
        if rank == 2:
            return count_next
        if rank not in by_rank:
            by_rank[rank] = gs.Variable(f"{STEP_COUNT}/rank{rank}", dtype=np.float32, shape=[batch] + [1] * (rank - 1))
            graph.nodes.append(gs.Node("Reshape", name=f"{STEP_COUNT}/rank{rank}",
                                       inputs=[count_next, gs.Constant(f"{STEP_COUNT}/shape{rank}",
                                                                       np.array([-1] + [1] * (rank - 1), np.int64))],
                                       outputs=[by_rank[rank]]))
        return by_rank[rank]

    return of_rank
