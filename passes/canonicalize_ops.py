"""Rewrite exporter-specific spellings of common ops into the forms the later passes know.

- ``CastLike(x, like)`` becomes ``Cast(x, to=dtype(like))``. CastLike reads only the element
  type of ``like``, but as a graph edge it makes ``x``'s value look computed from ``like``.
  The dynamo exporter with ``optimize=False`` writes every Conv bias as
  ``Expand(CastLike(0, like=<the Conv's input>), ...)``: left alone, each bias would look
  data-dependent and no activation could become a neuron.
- ``ReduceMean`` over all spatial axes of an ``[N, C, *spatial]`` tensor becomes
  ``GlobalAveragePool`` (followed by ``Squeeze`` when ``keepdims=0``), the form the dynamo
  exporter uses for ``x.mean((2, 3))`` / adaptive average pooling to 1. Global average
  pooling is linear and per-channel, so it stays in the spiking part with the channel-wise
  thresholds folded through it.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ann2snn.state import PassState

from ._graph import const_value

log = logging.getLogger(__name__)


def _cast_like(node: gs.Node) -> bool:
    """Turn a CastLike whose target type is known into a Cast."""
    like = node.inputs[1]
    if like.dtype is None:
        return False
    node.op = "Cast"
    node.attrs = {"to": int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(like.dtype)))}
    node.inputs = [node.inputs[0]]
    return True


def _reduce_mean(graph: gs.Graph, node: gs.Node) -> bool:
    """Turn a ReduceMean over every spatial axis into GlobalAveragePool (+ Squeeze)."""
    x = node.inputs[0]
    if x.shape is None or len(x.shape) < 3:
        return False
    rank = len(x.shape)
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = const_value(node.inputs[1])
        if axes is None:
            return False
    else:
        axes = node.attrs.get("axes")
        if axes is None:
            return False  # all axes (or none with noop_with_empty_axes): not a spatial pool
    norm = sorted(int(a) % rank for a in np.asarray(axes).reshape(-1))
    if norm != list(range(2, rank)):
        return False
    out = node.outputs[0]
    if int(node.attrs.get("keepdims", 1)):
        node.op, node.attrs, node.inputs = "GlobalAveragePool", {}, [x]
        return True
    pooled = gs.Variable(f"{node.name}/pooled", dtype=out.dtype)
    squeeze_axes = gs.Constant(f"{node.name}/spatial_axes", np.arange(2, rank, dtype=np.int64))
    node.op, node.attrs, node.inputs, node.outputs = "GlobalAveragePool", {}, [x], [pooled]
    graph.nodes.append(gs.Node("Squeeze", name=f"{node.name}/squeeze", inputs=[pooled, squeeze_axes],
                               outputs=[out]))
    return True


def canonicalize_ops(state: PassState) -> PassState:
    """Rewrite CastLike into Cast and spatial ReduceMean into GlobalAveragePool."""
    graph = state.graph
    rewritten = 0
    for node in list(graph.nodes):
        if (node.domain or "") not in ("", "ai.onnx"):
            continue
        if node.op == "CastLike" and len(node.inputs) == 2:
            rewritten += _cast_like(node)
        elif node.op == "ReduceMean" and node.inputs:
            rewritten += _reduce_mean(graph, node)
    if rewritten:
        log.debug("canonicalize_ops: rewrote %d node(s)", rewritten)
        graph.cleanup().toposort()
    return state
