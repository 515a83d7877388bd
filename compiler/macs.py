"""Multiply-accumulate counts of weighted layers, per sample (batch axis excluded)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def _dims(tensor: gs.Tensor) -> list[int] | None:
    if tensor.shape is None or any(not isinstance(d, (int, np.integer)) for d in tensor.shape[1:]):
        return None
    return [int(d) for d in tensor.shape[1:]]


def node_macs(node: gs.Node) -> int:
    """MACs one sample costs in this node (Conv, ConvTranspose, Gemm, MatMul); 0 for others
    or when shapes are unknown."""
    if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
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
