"""Give models exported with a fixed batch size a symbolic batch dimension.

The spiking model is run at whatever batch the user brings (calibration batches, evaluation
chunks), so a fixed batch of, say, 1 is replaced by the symbolic ``N``. Reshape shapes that
spell the old batch size out become 0 ("copy the input's batch"). The result is checked
numerically: at batch 2 each sample's output must equal its output alone, and for a fixed
batch of 1 the rewritten graph must agree with the original.

A fixed batch of 1 that the check refutes (e.g. a Slice or Gather of the first sample) is
kept when every tensor still has a leading axis of 1, which then stands for the batch: the
model is compiled for batch 1, with a warning, and calibration runs on batches of one sample
(``batch`` is set to 1). A compiled model of batch 1 declares it on its inputs; onnxruntime
refuses other batch sizes. A Reshape that folds the batch into another axis is an error.
"""
from __future__ import annotations

import dataclasses
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


def _leading_one(graph: gs.Graph) -> bool:
    """Whether every computed tensor of known shape has a leading axis of 1: then that axis can
    stand for the batch of 1 (neuron states are laid out as [batch, *per-sample shape])."""
    return all(t.shape[0] == 1 for t in graph.tensors().values()
               if isinstance(t, gs.Variable) and t.shape and isinstance(t.shape[0], (int, np.integer)))


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
    if not ok and b == 1 and _leading_one(before):
        log.warning("the model's batch is fixed at 1 and the graph depends on it beyond its inputs and Reshape "
                    "shapes that spell it out (e.g. a Slice of the first sample): it is compiled "
                    "for batch 1, calibration runs on single samples (--batch 1), and the compiled model takes one "
                    "sample at a time; re-export it with a dynamic batch axis to run batches")
        state.graph = before
        state.config = dataclasses.replace(state.config, batch=1)
        state.metadata["batch"] = "fixed at 1 (the graph depends on it; compiled for batch 1)"
        return state
    if not ok:
        either = (", and some tensor's leading axis is not the batch, so it cannot be compiled for batch 1 either"
                  if b == 1 else "")
        raise ModelLoadError(
            f"the model's batch dimension is fixed at {b} and ann2snn could not make it dynamic (the graph depends "
            f"on the batch size beyond its inputs and Reshape shapes{either}); re-export it with a dynamic batch axis, "
            "e.g. torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}})")
    log.info("the fixed batch size %d became the symbolic dimension %s", b, BATCH)
    state.metadata["batch"] = f"fixed at {b} in the export, made dynamic (checked numerically)"
    state.graph = with_shapes(graph, state.opset)
    return state
