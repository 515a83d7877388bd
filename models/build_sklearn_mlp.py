"""Train a scikit-learn MLPClassifier on the 8x8 digits and export it with skl2onnx.

The export carries skl2onnx's own post-processing (Softmax, ArgMax-style label output and a
ZipMap of class probabilities in the ``ai.onnx.ml`` domain), which the compiler must leave in
the analog tail. Writes ``sklearn_mlp.onnx`` (input ``X``: float32 [N, 64] in [0, 1]) and
uses the digits data files of build_digits_cnn.py flattened to [N, 64] (``data/sklearn_*.npz``).

Run: ``/tmp/torchenv/bin/python models/build_sklearn_mlp.py`` (needs scikit-learn, skl2onnx,
onnx, onnxruntime, numpy).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.neural_network import MLPClassifier


def main() -> None:
    """Train, export, check, and report the ANN's accuracy."""
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=here)
    args = ap.parse_args()
    data = args.out_dir / "data"
    with np.load(data / "digits_calib.npz") as z:
        calib = z["input"].reshape(len(z["input"]), -1)
    with np.load(data / "digits_test.npz") as z:
        test, labels = z["input"].reshape(len(z["input"]), -1), z["label"]
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    # train on every sample that is not in the committed test split (matched by pixels)
    test_rows = {row.tobytes() for row in test}
    keep = np.array([row.tobytes() not in test_rows for row in x_all])
    clf = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=600, random_state=0)
    clf.fit(x_all[keep], digits.target[keep])
    model = to_onnx(clf, x_all[:1], target_opset={"": 17, "ai.onnx.ml": 3}, options={"zipmap": True})
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.checker.check_model(model, full_check=True)
    path = args.out_dir / "sklearn_mlp.onnx"
    onnx.save(model, path)
    np.savez_compressed(data / "sklearn_calib.npz", X=calib)
    np.savez_compressed(data / "sklearn_test.npz", X=test, label=labels)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"X": test})[0]
    print(f"ops: {sorted({(n.domain or 'ai.onnx') + '::' + n.op_type for n in model.graph.node})}")
    print(f"outputs: {[(o.name, str(o.type).split()[0]) for o in model.graph.output]}")
    print(f"sklearn_mlp.onnx: ANN accuracy {100 * float((pred == labels).mean()):.2f}% on {len(labels)} test digits")


if __name__ == "__main__":
    main()
