"""Train a small Keras CNN on scikit-learn's 8x8 digits (NHWC) and export it with tf2onnx.

Keras works channels-last, so the ONNX graph carries the NHWC layout and the Transpose chains
tf2onnx adds around every convolution: the layout case of the converter's exporter coverage.
Writes ``keras_cnn.onnx`` (input ``input``: float32 [N, 8, 8, 1] in [0, 1], output ``logits``)
and ``data/keras_calib.npz`` / ``data/keras_test.npz``: the digits split of
build_digits_cnn.py in NHWC.

Run: ``/tmp/tfenv/bin/python models/build_keras_cnn.py`` (needs tensorflow-cpu, tf2onnx,
onnx, onnxruntime, scikit-learn, numpy). tf2onnx's ``from_keras`` fails on Keras 3, so the
model is exported through ``from_function``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from _common import accuracy, onnx_logits  # noqa: E402


def build_model() -> tf.keras.Model:
    """Conv-ReLU, Conv-BN-ReLU, MaxPool, Dense-ReLU, Dense (logits)."""
    layers = tf.keras.layers
    return tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.Conv2D(32, 3, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(10),
    ])


def main() -> None:
    """Train on the digits not in the committed test split, export, check, report."""
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=here)
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    tf.keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    data = args.out_dir / "data"
    with np.load(data / "digits_calib.npz") as z:
        calib = np.transpose(z["input"], (0, 2, 3, 1))
    with np.load(data / "digits_test.npz") as z:
        test, labels = np.transpose(z["input"], (0, 2, 3, 1)), z["label"]
    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    test_rows = {row.tobytes() for row in test}
    keep = np.array([row.tobytes() not in test_rows for row in x_all])
    model = build_model()
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_all[keep], digits.target[keep], epochs=args.epochs, batch_size=32, verbose=0)
    spec = (tf.TensorSpec((None, 8, 8, 1), tf.float32, name="input"),)
    fn = tf.function(lambda x: {"logits": model(x, training=False)}, input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    onnx.checker.check_model(proto, full_check=True)
    path = args.out_dir / "keras_cnn.onnx"
    onnx.save(proto, path)
    np.savez_compressed(data / "keras_calib.npz", input=calib)
    np.savez_compressed(data / "keras_test.npz", input=test, label=labels)
    logits = onnx_logits(path, test)
    keras_logits = model(test, training=False).numpy()
    print(f"ops: {sorted({n.op_type for n in proto.graph.node})}")
    print(f"keras_cnn.onnx: ANN accuracy {accuracy(logits, labels):.2f}% on {len(labels)} test digits, "
          f"max |keras - ort| {np.abs(keras_logits - logits).max():.2e}")


if __name__ == "__main__":
    main()
