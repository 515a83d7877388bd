"""Helpers shared by the model build scripts (run as scripts, so imported as ``_common``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def onnx_logits(path: Path, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """The ONNX model's ``logits`` for ``x`` (input ``input``), with onnxruntime on CPU."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["logits"], {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(axis=1) == labels).mean() * 100.0)
