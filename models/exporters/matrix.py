"""The exporter matrix: which committed export is which cell, and each cell's data.

Needs numpy and onnx only (no toolchain), so tests and benchmarks/exporter_matrix.py load it
by path. Cells are (network, exporter); ``cell_path`` gives the committed file or None where the
toolchain has no such network (scikit-learn: no convolution, attention or embedding layers; its
"cnn" cell is an MLP on the flattened image, its "embedding" cell a one-hot encoder + MLP).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
NETS = ("cnn", "mbv3", "transformer", "embedding")
EXPORTERS = ("torch_legacy", "torch_dynamo", "tf2onnx", "keras3", "jax", "paddle", "skl2onnx", "zoo_ir3")
_SKLEARN = {"cnn": "skl2onnx_mlp.onnx", "embedding": "skl2onnx_onehot.onnx"}


def cell_path(net: str, exporter: str) -> Path | None:
    """The committed export of ``net`` by ``exporter``, or None when there is none."""
    name = _SKLEARN.get(net) if exporter == "skl2onnx" else f"{exporter}_{net}.onnx"
    if name is None or not (HERE / name).exists():
        return None
    return HERE / name


def cells() -> list[tuple[str, str]]:
    """Every (net, exporter) pair with a committed export."""
    return [(n, e) for n in NETS for e in EXPORTERS if cell_path(n, e) is not None]


def images(split: str) -> np.ndarray:
    """Digits images float32 [N, 1, 8, 8] in [0, 1]; ``split`` is ``calib`` or ``test``."""
    with np.load(HERE / "data" / "digits.npz") as z:
        return z[split]


def labels() -> np.ndarray:
    """The test images' labels."""
    with np.load(HERE / "data" / "digits.npz") as z:
        return z["label"]


def batch_size(path: str | Path, wanted: int) -> int:
    """``wanted``, or 1 when the model's batch is fixed at 1 (the old zoo-style exports)."""
    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in init)
    first = inp.type.tensor_type.shape.dim[0]
    return 1 if first.HasField("dim_value") and first.dim_value == 1 else wanted


def cell_inputs(path: str | Path, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """The model's single input for the digits images of ``split``, in its layout and type:
    tokens 0..16 for integer inputs, NHWC for channels-last image inputs, rows as tokens
    for [N, 8, 8], the flattened image for [N, 64] float."""
    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in init)
    t = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    x = images(split)[:limit]
    n = len(x)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
    if np.issubdtype(dtype, np.integer):
        arr = np.round(x * 16).astype(dtype).reshape(n, 64)
    elif len(dims) == 4 and dims[3] == 1:
        arr = x.transpose(0, 2, 3, 1).copy()
    elif len(dims) == 3:
        arr = x.reshape(n, 8, 8)
    elif len(dims) == 2:
        arr = x.reshape(n, 64)
    else:
        arr = x
    return {inp.name: arr}
