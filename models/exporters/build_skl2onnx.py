"""Export scikit-learn models with skl2onnx (scikit-learn has no convolution, attention or
embedding layer, so two cells only): ``skl2onnx_mlp.onnx``, an MLPClassifier (ReLU, 64-32
hidden units) on the flattened images [N, 64] float32, and ``skl2onnx_onehot.onnx``, a
Pipeline(OneHotEncoder, MLPClassifier with 32-16 hidden units) on the 64 pixel values as integer tokens 0..16 [N, 64]
int64 (the one-hot front end of the embedding row). Trained on the training split of
train_reference.py (same seed). Default conversion options: label and ZipMap'd probabilities.

Toolchain: scikit-learn 1.9.1, skl2onnx 1.20.0 (see README.md). Run:
``/work/exporters-venv/bin/python models/exporters/build_skl2onnx.py``
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

from _export_check import HERE, images


def main() -> None:
    print("scikit-learn", sklearn.__version__, "skl2onnx", skl2onnx.__version__)
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32).reshape(-1, 64)
    y = d.target
    train = np.random.default_rng(0).permutation(len(x))[556:]  # as train_reference.py: 300 test, 256 calib
    tokens = np.round(x * 16).astype(np.int64)
    mlp = MLPClassifier((64, 32), max_iter=300, random_state=0).fit(x[train], y[train])
    onehot = make_pipeline(OneHotEncoder(categories=[list(range(17))] * 64, handle_unknown="ignore"),
                           MLPClassifier((32, 16), max_iter=300, random_state=0)).fit(tokens[train], y[train])
    test = images().reshape(-1, 64)
    for name, model, kind, xt in (("mlp", mlp, FloatTensorType, test),
                                  ("onehot", onehot, Int64TensorType, np.round(test * 16).astype(np.int64))):
        proto = skl2onnx.to_onnx(model, initial_types=[("input", kind([None, 64]))], target_opset=17)
        path = HERE / f"skl2onnx_{name}.onnx"
        onnx.save(proto, str(path))
        onnx.checker.check_model(proto, full_check=True)
        label = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": xt})[0]
        assert (label == model.predict(xt)).all()
        with np.load(HERE / "data" / "digits.npz") as z:
            acc = (label == z["label"]).mean()
        print(f"{path.name}: {path.stat().st_size:,} bytes, labels equal scikit-learn's, accuracy {acc * 100:.1f}%")


if __name__ == "__main__":
    main()
