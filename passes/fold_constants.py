"""Constant folding, and the Shape -> Gather -> Concat -> Reshape chains exporters emit
for a flatten with a dynamic batch dimension."""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ann2snn.ortsession import make_session
from ann2snn.state import PassState

from ._graph import const_value, export, with_shapes

log = logging.getLogger(__name__)

_NP_DUMMY = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)}


def _dummy_inputs(graph: gs.Graph, batch: int) -> dict[str, np.ndarray] | None:
    """Zero inputs with the batch dimension set to ``batch``; None if other dims are unknown."""
    feeds = {}
    for t in graph.inputs:
        if t.shape is None or len(t.shape) == 0:
            return None
        dims = list(t.shape)
        if any(not isinstance(d, (int, np.integer)) for d in dims[1:]):
            return None
        dims[0] = batch
        feeds[t.name] = np.zeros(dims, dtype=np.dtype(t.dtype) if t.dtype is not None else np.float32)
    return feeds


def _batch_is_symbolic(graph: gs.Graph) -> bool:
    return all(t.shape and not isinstance(t.shape[0], (int, np.integer)) for t in graph.inputs)


def _resolve_reshapes(state: PassState) -> int:
    """Replace dynamic Reshape shapes that only depend on the batch size by constants."""
    graph = state.graph
    targets = [n for n in graph.nodes if n.op == "Reshape" and const_value(n.inputs[1]) is None]
    if not targets or not _batch_is_symbolic(graph):
        return 0
    probe = graph.copy()
    names = [n.inputs[1].name for n in targets]
    tensors = probe.tensors()
    probe.outputs = [tensors[n] for n in names]
    for t in probe.outputs:
        t.dtype = np.int64
    values = []
    try:
        sess = make_session(export(probe.cleanup(), state.opset))
        for b in (2, 3):
            feeds = _dummy_inputs(graph, b)
            if feeds is None:
                return 0
            values.append(sess.run(names, feeds))
    except Exception as exc:  # leave the graph as it is: it still runs, only less is folded
        log.debug("could not evaluate reshape shapes: %s", exc)
        return 0
    resolved = 0
    for node, s2, s3 in zip(targets, values[0], values[1]):
        s2, s3 = np.asarray(s2).astype(np.int64), np.asarray(s3).astype(np.int64)
        if s2.shape != s3.shape:
            continue
        diff = np.nonzero(s2 != s3)[0]
        shape = s2.copy()
        if len(diff) == 1 and diff[0] == 0 and (s2[0], s3[0]) == (2, 3) and not node.attrs.get("allowzero", 0):
            shape[0] = 0  # copy the batch dimension from the input
        elif len(diff) == 1 and -1 not in s2:
            shape[diff[0]] = -1  # the one batch-dependent entry is inferred
        elif len(diff) > 0:
            continue
        node.inputs[1] = gs.Constant(f"{node.name}/shape", shape)
        resolved += 1
    return resolved


def fold_constants(state: PassState) -> PassState:
    """Fold constant subgraphs (with onnxruntime) and batch-only dynamic reshapes."""
    graph = state.graph
    graph.fold_constants(fold_shapes=True, error_ok=True).cleanup()
    if _resolve_reshapes(state):
        graph.fold_constants(fold_shapes=True, error_ok=True).cleanup()
    # Constant nodes left over become initializers so that every pass sees gs.Constant
    for node in list(graph.nodes):
        if node.op == "Constant" and "value" in node.attrs:
            out = node.outputs[0]
            if out in graph.outputs:
                continue
            const = gs.Constant(out.name, np.asarray(node.attrs["value"].values))
            for consumer in list(out.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[i] = const
            node.outputs.clear()
    graph.cleanup().toposort()
    state.graph = with_shapes(graph, state.opset)  # shapes behind resolved reshapes are now known
    return state
