"""Shared by the build scripts (run as scripts, so imported as ``_export_check``): the data and
weights, each network's input for the digits images in a given layout, and a check that an
export computes what the reference torch network computed (stored in ``data/reference.npz``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
NETS = ("cnn", "mbv3", "transformer", "embedding")


def images(split: str = "test") -> np.ndarray:
    """Digits images float32 [N, 1, 8, 8] in [0, 1]."""
    with np.load(HERE / "data" / "digits.npz") as z:
        return z[split]


def weights(net: str) -> dict[str, np.ndarray]:
    """The trained torch state dict of ``net`` (keys without the ``net/`` prefix)."""
    with np.load(HERE / "data" / "weights.npz") as z:
        return {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(net + "/")}


def net_input(net: str, x: np.ndarray, channels_last: bool = False, int_dtype: type = np.int64) -> np.ndarray:
    """The input of ``net`` for images ``x`` [N, 1, 8, 8]."""
    if net == "embedding":
        return np.round(x * 16).astype(int_dtype).reshape(len(x), 64)
    if net == "transformer":
        return x.reshape(len(x), 8, 8)
    return x.transpose(0, 2, 3, 1).copy() if channels_last else x


def check(path: Path, net: str, channels_last: bool = False, int_dtype: type = np.int64, tol: float = 1e-3,
          min_agree: float = 1.0) -> None:
    """Load ``path`` in onnxruntime, run it on the test images, compare with the reference logits
    (``tol``: largest logit difference; ``min_agree``: smallest top-1 agreement)."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    x = net_input(net, images(), channels_last, int_dtype)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fixed = isinstance(sess.get_inputs()[0].shape[0], int) and sess.get_inputs()[0].shape[0] == 1
    out = (np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))]) if fixed
           else sess.run(None, {name: x})[0])
    with np.load(HERE / "data" / "reference.npz") as z:
        ref = z[net]
    err = float(np.abs(out - ref).max())
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    size = path.stat().st_size
    print(f"{path.name}: ir {model.ir_version}, opset {model.opset_import[0].version}, {size:,} bytes, "
          f"max |logits - torch| {err:.2e}, top-1 agreement {agree * 100:.1f}%")
    assert err < tol and agree >= min_agree, (path, err, agree)
