"""Export the four reference networks with Keras 3's own ONNX export
(``model.export(path, format="onnx")``, TensorFlow backend): ``keras3_<net>.onnx``. Image
networks take NHWC [N, 8, 8, 1]; the embedding network int32 tokens. The transformer's GELU
is Keras' default, the tanh approximation.

Toolchain: keras 3.15.1, tensorflow 2.21.0, tf2onnx 1.17.0 (which Keras calls; see README.md).
Run: ``/work/exporters-tf/bin/python models/exporters/build_keras3.py``
"""
from __future__ import annotations

import keras
import numpy as np

from _export_check import HERE, NETS, check, images, net_input
from _keras_nets import BUILD


def main() -> None:
    print("keras", keras.__version__, "backend", keras.backend.backend())
    for name in NETS:
        path = HERE / f"keras3_{name}.onnx"
        model = BUILD[name]()
        model(net_input(name, images()[:2], channels_last=True, int_dtype=np.int32))  # export wants a called model
        model.export(str(path), format="onnx", verbose=False)
        tol = 0.05 if name == "transformer" else 1e-3
        check(path, name, channels_last=True, int_dtype=np.int32, tol=tol, min_agree=0.99)


if __name__ == "__main__":
    main()
