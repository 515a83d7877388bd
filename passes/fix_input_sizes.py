"""Give inputs with symbolic per-sample sizes the calibration data's sizes.

Exporters leave an input's height and width symbolic (paddle2onnx writes ``[-1, 3, ?, ?]``,
Ultralytics ``[1, 3, height, width]``), but neurons need a per-sample shape to be laid out,
and MACs a size to be counted. The calibration data fix it: the compiled model is built
for their per-sample size (every other size is refused by the runtime with a clear
message). A non-positive declared size (paddle's -1) counts as symbolic. The batch axis
stays as it is (``make_batch_dynamic`` handles it). The sizes come from a CalibrationSource or from
arrays given to the passes directly (the recipe search's held-in part). Iterable calibration data, whose first
batch cannot be read twice, leave the shape as it is.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from ann2snn.state import PassState

from ._graph import with_shapes

log = logging.getLogger(__name__)


def _known(d: object) -> bool:
    return isinstance(d, (int, np.integer)) and int(d) > 0


def _symbolic(d: object) -> object:
    """``d``, or "N" when it is a non-positive integer (paddle's -1 is not a size)."""
    return "N" if isinstance(d, (int, np.integer)) and int(d) <= 0 else d


def _first_sample(calib: object, names: list[str]) -> dict[str, np.ndarray]:
    """The first sample of the calibration data by input name: from a CalibrationSource, or from
    arrays as the passes may be given them directly (a mapping, or one array for a single-input
    model: the recipe search calibrates its candidates on such a held-in part); {} for an
    iterable of batches."""
    if hasattr(calib, "first"):
        return calib.first(1) or {}
    if isinstance(calib, Mapping):
        return {k: np.asarray(v[:1]) for k, v in calib.items() if hasattr(v, "shape")}
    if isinstance(calib, np.ndarray) and len(names) == 1:
        return {names[0]: calib[:1]}
    return {}


def fix_input_sizes(state: PassState) -> PassState:
    """Set symbolic or non-positive per-sample input sizes to those of the calibration data."""
    graph = state.graph
    changed = []
    first = None
    for t in graph.inputs:
        if not t.shape:
            continue
        batch = _symbolic(t.shape[0])
        if batch == t.shape[0] and all(_known(d) for d in t.shape[1:]):
            continue
        if first is None:
            first = _first_sample(getattr(state, "calib", None), [i.name for i in graph.inputs])
        sample = first.get(t.name)
        if sample is None or np.ndim(sample) != len(t.shape):
            t.shape = [batch] + list(t.shape[1:])  # at least the batch: -1 is not a size
            continue
        new = [batch] + [int(d) if _known(d) else int(s) for d, s in zip(t.shape[1:], np.shape(sample)[1:])]
        changed.append(f"'{t.name}' {list(t.shape)} -> {new}")
        t.shape = new
    for t in graph.outputs:  # declared output sizes are re-inferred
        if t.shape:
            t.shape = ["?" if isinstance(d, (int, np.integer)) and int(d) <= 0 else d for d in t.shape]
    if changed:
        log.warning("input size(s) were symbolic; the model is compiled for the calibration data's size: %s "
                    "(the compiled model runs at that size only)", ", ".join(changed))
        state.graph = with_shapes(graph, state.opset)
    return state
