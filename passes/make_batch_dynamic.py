"""Give models exported with a fixed batch size a symbolic batch dimension.

The spiking model is run at whatever batch the user brings (calibration batches, evaluation
chunks), so a fixed batch of, say, 1 is replaced by the symbolic ``N``. Reshape shapes that
spell the old batch size out become 0 ("copy the input's batch"). The result is checked
numerically: at batch 2 each sample's output must equal its output alone, and for a fixed
batch of 1 the rewritten graph must agree with the original.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ann2snn.errors import ModelLoadError
from ann2snn.ortsession import make_session
from ann2snn.state import PassState

from ._graph import const_value, export, with_shapes

log = logging.getLogger(__name__)

BATCH = "N"


def _fixed_batch(graph: gs.Graph) -> int | None:
    dims = {t.shape[0] for t in graph.inputs if t.shape}
    if len(dims) == 1 and isinstance(next(iter(dims)), (int, np.integer)):
        return int(next(iter(dims)))
    return None


def _run(graph: gs.Graph, opset: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(export(graph.copy().cleanup(), opset), basic=True).run(None, feeds)


def make_batch_dynamic(state: PassState) -> PassState:
    """Replace a fixed batch size by the symbolic dimension N (checked numerically)."""
    graph = state.graph
    b = _fixed_batch(graph)
    if b is None:
        return state
    before = graph.copy()
    for t in list(graph.inputs) + list(graph.outputs):
        if t.shape and t.shape[0] == b:
            t.shape = [BATCH] + list(t.shape[1:])
    for node in graph.nodes:
        if node.op == "Reshape" and not node.attrs.get("allowzero", 0):
            shape = const_value(node.inputs[1])
            if shape is not None and shape.ndim == 1 and len(shape) > 0 and shape[0] == b:
                new = np.array(shape, np.int64)
                new[0] = 0
                node.inputs[1] = gs.Constant(f"{node.name}/dynamic_shape", new)
    for t in graph.tensors().values():  # intermediate shapes are re-inferred
        if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
            t.shape = None
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.uniform(0, 1, (2,) + tuple(t.shape[1:])).astype(np.dtype(t.dtype)) for t in graph.inputs}
    try:  # each sample's output must not depend on the others in its batch
        got = _run(graph, state.opset, feeds)
        singles = [_run(graph, state.opset, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(2)]
        ok = all(np.allclose(g, np.concatenate([s[j] for s in singles]), rtol=1e-4, atol=1e-5)
                 for j, g in enumerate(got))
        if ok and b == 1:  # and the rewritten graph computes what the original did
            ok = all(np.allclose(a, o, rtol=1e-4, atol=1e-5)
                     for a, o in zip(singles[0], _run(before, state.opset, {k: v[:1] for k, v in feeds.items()})))
    except Exception as exc:  # the rewritten graph does not run at another batch size
        log.debug("batch rewrite failed: %s", exc)
        ok = False
    if not ok:
        raise ModelLoadError(
            f"the model's batch dimension is fixed at {b} and ann2snn could not make it dynamic (the graph depends "
            "on the batch size beyond its inputs and Reshape shapes); re-export it with a dynamic batch axis, "
            "e.g. torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}})")
    log.info("the fixed batch size %d became the symbolic dimension %s", b, BATCH)
    state.graph = with_shapes(graph, state.opset)
    return state
