"""onnxruntime sessions for the compiler, with its failures turned into clean errors."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .device import open_session, providers_for
from .errors import ModelLoadError

# onnxruntime logs its own errors to stderr before raising them; ann2snn turns every one it
# expects into a single clean message, so only fatal onnxruntime logs remain visible. Every
# module of ann2snn that creates sessions imports this one (the runtime package does in its
# __init__), so this runs before the first session.
ort.set_default_logger_severity(4)


def make_session(model: onnx.ModelProto, threads: int = 0, basic: bool = False, device: str = "cpu",
                 providers: Sequence[Any] | None = None) -> ort.InferenceSession:
    """A session on ``device`` (``cpu``, or ``cuda``: ann2snn.device; ``providers`` overrides
    it); ``basic`` limits graph optimisations (stable last bits)."""
    so = ort.SessionOptions()
    so.log_severity_level = 4  # failures are raised to us and reported once, cleanly: log only fatal ones
    if threads:
        so.intra_op_num_threads = threads
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return open_session(model.SerializeToString(), so, providers_for(device, providers))


def run_checked(sess: ort.InferenceSession, names: Sequence[str] | None, feeds: dict[str, np.ndarray],
                what: str) -> list[np.ndarray]:
    """``sess.run``; an onnxruntime failure becomes a ModelLoadError that says on what data."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    try:
        return sess.run(names, feeds, options)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"the model fails in onnxruntime on the {what}: {first}; check that the ANN runs "
                             f"on this data in onnxruntime") from None
