"""Multiply-accumulate counts of weighted layers, per sample (batch axis excluded)."""
from __future__ import annotations

from collections.abc import Container, Iterable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

#: the ops that multiply their data input (input 0) by weights
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _dims(tensor: gs.Tensor) -> list[int] | None:
    if tensor.shape is None or any(not isinstance(d, (int, np.integer)) for d in tensor.shape[1:]):
        return None
    return [int(d) for d in tensor.shape[1:]]


def node_macs(node: gs.Node) -> int:
    """MACs one sample costs in this node (Conv, ConvTranspose, Gemm, MatMul); 0 for others
    or when shapes are unknown."""
    if node.op not in WEIGHTED or len(node.inputs) < 2:
        return 0
    w = node.inputs[1]
    if node.op == "Conv":
        out = _dims(node.outputs[0])
        return int(np.prod(out) * np.prod(w.shape[1:])) if out is not None and w.shape is not None else 0
    if node.op == "ConvTranspose":
        inp = _dims(node.inputs[0])
        return int(np.prod(inp) * np.prod(w.shape[1:])) if inp is not None and w.shape is not None else 0
    out = _dims(node.outputs[0])
    a = node.inputs[0]
    if out is None or a.shape is None:
        return 0
    k = a.shape[0] if node.op == "Gemm" and node.attrs.get("transA", 0) else a.shape[-1]
    return int(np.prod(out) * k) if isinstance(k, (int, np.integer)) else 0


def step_signals(nodes: Iterable[tuple[str, Sequence[str], Sequence[str], str]], steady: Container[str]
                 ) -> tuple[set[str], set[str]]:
    """The tensors of a step graph that carry real values computed at every step rather than
    spikes: ``(increments, currents)``. A weighted op whose data input (input 0) is one of them
    receives no spikes: it multiplies real values at every step (T x its MACs).

    ``nodes``: (op type, input names, output names, kind) in topological order, kind ``neuron``
    (its output is spikes), ``compensated`` (an expectation-compensated op: its first output is a
    real-valued increment) or ``""``; ``steady``: the tensors that are constant in time.
    Increments are a compensated op's output and what is computed from it before a neuron;
    currents the output of a weighted op whose data input is not steady (a Conv's current) and
    what is computed from it before a neuron or a compensated op. The compiler's MAC share
    (passes/partition_graph.py) and the cost report (analysis/cost.py) both classify with this.
    """
    increments: set[str] = set()
    currents: set[str] = set()
    for op, inputs, outputs, kind in nodes:
        if kind == "neuron":
            continue
        if kind == "compensated":
            increments.update(o for o in outputs[:1] if o)
            continue
        if any(x in increments for x in inputs):
            increments.update(o for o in outputs if o)
        if (op in WEIGHTED and inputs[0] not in steady) or any(x in currents for x in inputs):
            currents.update(o for o in outputs if o)
    return increments, currents
