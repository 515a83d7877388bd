"""Constant folding, and the Shape -> Gather -> Concat -> Reshape chains exporters emit
for a flatten with a dynamic batch dimension. Likewise a Resize whose ``sizes`` are computed
from Shape ops (``F.interpolate(x, size=y.shape[-2:])`` with a dynamic batch) gets constant
``scales`` when the sizes depend only on the batch size, so that it no longer consumes a
Shape of a spiking tensor and stays in the spiking part."""
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


def _at_batches(state: PassState, names: list[str], shapes_of: list[str] = ()) -> list[list[np.ndarray]] | None:
    """Values of the tensors ``names`` and the shapes of ``shapes_of`` at batch sizes 2 and 3 (zero
    inputs), or None when the graph cannot be run that way."""
    graph = state.graph
    probe = graph.copy()
    tensors = probe.tensors()
    outputs = [tensors[n] for n in names]
    for i, n in enumerate(shapes_of):
        shape = gs.Variable(f"{n}/ann2snn_probe_shape_{i}", dtype=np.int64)
        probe.nodes.append(gs.Node("Shape", inputs=[tensors[n]], outputs=[shape]))
        outputs.append(shape)
    probe.outputs = outputs
    for t in probe.outputs:
        t.dtype = np.int64
    values = []
    try:
        sess = make_session(export(probe.cleanup(), state.opset))
        for b in (2, 3):
            feeds = _dummy_inputs(graph, b)
            if feeds is None:
                return None
            values.append([np.asarray(v).astype(np.int64) for v in sess.run(None, feeds)])
    except Exception as exc:  # leave the graph as it is: it still runs, only less is folded
        log.debug("could not evaluate shapes at batch 2 and 3: %s", exc)
        return None
    return values


def _resolve_reshapes(state: PassState) -> int:
    """Replace dynamic Reshape shapes that only depend on the batch size by constants."""
    graph = state.graph
    targets = [n for n in graph.nodes if n.op == "Reshape" and const_value(n.inputs[1]) is None]
    if not targets or not _batch_is_symbolic(graph):
        return 0
    values = _at_batches(state, [n.inputs[1].name for n in targets], [n.inputs[0].name for n in targets])
    if values is None:
        return 0
    resolved = 0
    k = len(targets)
    for i, node in enumerate(targets):
        s2, s3, d2, d3 = values[0][i], values[1][i], values[0][k + i], values[1][k + i]
        if s2.shape != s3.shape:
            continue
        diff = np.nonzero(s2 != s3)[0]
        shape = s2.copy()
        batch_first = len(d2) > 0 and (d2[0], d3[0]) == (2, 3)
        if len(diff) == 1 and diff[0] == 0 and (s2[0], s3[0]) == (2, 3) and batch_first \
                and not node.attrs.get("allowzero", 0):
            shape[0] = 0  # copy the batch dimension from the input
        # (an input whose first dimension is not the batch, e.g. tf2onnx's Tensordot [N * 8, 32]
        # -> [N, 8, 32], gets -1 below: copying its first dimension would be wrong)
        elif len(diff) == 1 and -1 not in s2:
            shape[diff[0]] = -1  # the one batch-dependent entry is inferred
        elif len(diff) > 0:
            continue
        node.inputs[1] = gs.Constant(f"{node.name}/shape", shape)
        resolved += 1
    return resolved


def _resolve_resizes(state: PassState) -> int:
    """Give Resize nodes with computed ``sizes`` that only depend on the batch size constant ``scales``.

    ``sizes`` [N, C, H, W] on an input [N, C, h, w] become ``scales`` [1, 1, H/h, W/w], taken only
    where float32 ``floor(h * H/h) == H`` (Resize's output size rule); onnxruntime derives the
    same float32 scales from ``sizes``, so the coordinates sampled are unchanged.
    """
    graph = state.graph
    targets = [n for n in graph.nodes if n.op == "Resize" and len(n.inputs) == 4 and n.inputs[3].name
               and const_value(n.inputs[3]) is None and (not n.inputs[2].name or const_value(n.inputs[2]) is not None)
               and (not n.inputs[1].name or const_value(n.inputs[1]) is not None)
               and "axes" not in n.attrs and n.attrs.get("keep_aspect_ratio_policy", "stretch") == "stretch"]
    if not targets or not _batch_is_symbolic(graph):
        return 0
    values = _at_batches(state, [n.inputs[3].name for n in targets], [n.inputs[0].name for n in targets])
    if values is None:
        return 0
    k = len(targets)
    resolved = 0
    for i, node in enumerate(targets):
        s2, s3, d2, d3 = values[0][i], values[1][i], values[0][k + i], values[1][k + i]
        if not (s2.shape == s3.shape == d2.shape == d3.shape and s2.ndim == 1 and len(s2) >= 2):
            continue
        if (s2[0], s3[0], d2[0], d3[0]) != (2, 3, 2, 3) or (s2[1:] != s3[1:]).any() or (d2[1:] != d3[1:]).any():
            continue
        if (d2[1:] <= 0).any():
            continue
        scales = np.concatenate([[1.0], s2[1:] / d2[1:]]).astype(np.float32)
        if (np.floor(d2[1:].astype(np.float32) * scales[1:]).astype(np.int64) != s2[1:]).any():
            continue
        node.inputs = [node.inputs[0], node.inputs[1], gs.Constant(f"{node.name}/scales", scales)]
        resolved += 1
    return resolved


def fold_constants(state: PassState) -> PassState:
    """Fold constant subgraphs (with onnxruntime) and batch-only dynamic reshapes."""
    graph = state.graph
    graph.fold_constants(fold_shapes=True, error_ok=True).cleanup()
    if _resolve_reshapes(state) + _resolve_resizes(state):
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
