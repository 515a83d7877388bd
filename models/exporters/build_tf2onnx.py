"""Export the four reference networks from Keras / TensorFlow with tf2onnx, opset 15:
``tf2onnx_<net>.onnx``. The transformer's GELU is Keras' default, the tanh approximation. Keras works channels-last, so the image networks take NHWC
[N, 8, 8, 1]; the embedding network takes int32 tokens. tf2onnx's ``from_keras`` does not
support Keras 3, so each model is exported through ``from_function`` on a ``tf.function``.

Toolchain: tensorflow 2.21.0, keras 3.15.1, tf2onnx 1.17.0 (see README.md). Run:
``/work/exporters-tf/bin/python models/exporters/build_tf2onnx.py``
"""
from __future__ import annotations

import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

from _export_check import HERE, NETS, check
from _keras_nets import BUILD


def main() -> None:
    print("tensorflow", tf.__version__, "tf2onnx", tf2onnx.__version__)
    for name in NETS:
        model = BUILD[name]()
        shape = model.inputs[0].shape
        dtype = tf.int32 if name == "embedding" else tf.float32
        spec = [tf.TensorSpec((None,) + tuple(shape[1:]), dtype, name="input")]
        fn = tf.function(lambda x, m=model: {"logits": m(x, training=False)}, input_signature=spec)
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=15)
        path = HERE / f"tf2onnx_{name}.onnx"
        onnx.save(proto, str(path))
        # Keras' GELU is the tanh approximation (its default; the exact one is written as Erfc, an op
        # ONNX does not have, and the export fails the checker), torch's the exact one: logits differ
        tol = 0.05 if name == "transformer" else 1e-3
        check(path, name, channels_last=True, int_dtype=np.int32, tol=tol, min_agree=0.99)


if __name__ == "__main__":
    main()
