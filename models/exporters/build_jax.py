"""Export the four reference networks from JAX through jax2tf and tf2onnx, opset 15:
``jax_<net>.onnx``. The networks are written as plain ``jax.numpy`` functions, channels-last
as JAX/Flax code is, with the torch-trained weights: BatchNorm written out, max pooling as
``lax.reduce_window`` from -inf, ``jax.nn.hard_swish`` / ``hard_sigmoid``, LayerNorm written
out, ``jax.nn.softmax``, ``jax.nn.gelu`` (its default: the tanh approximation), and the token
embedding as a one-hot matrix product (``jax.nn.one_hot(tokens, 17) @ table``) on int32 tokens.

Toolchain: jax 0.4.30, tensorflow 2.17, tf2onnx 1.17.0 (see README.md; jax 0.10.2 always serialises
to StableHLO (an XlaCallModule op), which tf2onnx cannot convert). Run:
``/work/exporters-jax/bin/python models/exporters/build_jax.py``
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import jax2tf  # noqa: E402

from _export_check import HERE, NETS, check, weights  # noqa: E402


def conv(x, w, b, groups=1):  # noqa: ANN001, ANN201
    k = jnp.asarray(w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=groups)
    return y + b


def bn(x, w, p):  # noqa: ANN001, ANN201
    return (x - w[f"{p}.running_mean"]) / jnp.sqrt(w[f"{p}.running_var"] + 1e-5) * w[f"{p}.weight"] + w[f"{p}.bias"]


def dense(x, w, p):  # noqa: ANN001, ANN201
    return x @ w[f"{p}.weight"].T + w[f"{p}.bias"]


def layer_norm(x, w, p):  # noqa: ANN001, ANN201
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * w[f"{p}.weight"] + w[f"{p}.bias"]


def cnn(x):  # noqa: ANN001, ANN201
    w = weights("cnn")
    x = jax.nn.relu(bn(conv(x, w["conv1.weight"], w["conv1.bias"]), w, "bn1"))
    x = jax.nn.relu(bn(conv(x, w["conv2.weight"], w["conv2.bias"]), w, "bn2"))
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch's (c, h, w) flatten order
    return dense(jax.nn.relu(dense(x, w, "fc1")), w, "fc2")


def mbv3(x):  # noqa: ANN001, ANN201
    w = weights("mbv3")
    x = jax.nn.relu(bn(conv(x, w["stem.weight"], w["stem.bias"]), w, "bn0"))
    x = jax.nn.hard_swish(bn(conv(x, w["dw.weight"], w["dw.bias"], groups=16), w, "bn1"))
    s = jax.nn.hard_sigmoid(dense(jax.nn.relu(dense(x.mean((1, 2)), w, "se1")), w, "se2"))
    x = bn(conv(x * s[:, None, None, :], w["proj.weight"], w["proj.bias"]), w, "bn2")
    return dense(x.mean((1, 2)), w, "fc")


def transformer(x):  # noqa: ANN001, ANN201
    w = weights("transformer")
    n, d, heads = x.shape[0], 32, 2
    dh = d // heads
    h = dense(jax.nn.relu(dense(x, w, "embed")), w, "mix") + w["pos"]
    q, k, v = jnp.split(dense(layer_norm(h, w, "ln1"), w, "qkv"), 3, axis=-1)
    q, k, v = (t.reshape(n, 8, heads, dh).transpose(0, 2, 1, 3) for t in (q, k, v))
    a = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh), axis=-1)
    h = h + dense((a @ v).transpose(0, 2, 1, 3).reshape(n, 8, d), w, "out")
    h = h + dense(jax.nn.gelu(dense(layer_norm(h, w, "ln2"), w, "mlp1")), w, "mlp2")
    return dense(h.mean(1), w, "head")


def embedding(tokens):  # noqa: ANN001, ANN201
    w = weights("embedding")
    x = (jax.nn.one_hot(tokens, 17) @ w["embed.weight"]).reshape(tokens.shape[0], -1)
    return dense(jax.nn.relu(dense(jax.nn.relu(dense(x, w, "fc1")), w, "fc2")), w, "fc3")


SPECS = {"cnn": ((8, 8, 1), tf.float32), "mbv3": ((8, 8, 1), tf.float32), "transformer": ((8, 8), tf.float32),
         "embedding": ((64,), tf.int32)}


def main() -> None:
    print("jax", jax.__version__, "tensorflow", tf.__version__, "tf2onnx", tf2onnx.__version__)
    for name in NETS:
        shape, dtype = SPECS[name]
        fn = jax2tf.convert(globals()[name], polymorphic_shapes=["(b, ...)"], native_serialization=False,
                            enable_xla=False)  # plain TF ops (MaxPool, Conv2D) that tf2onnx knows
        spec = [tf.TensorSpec((None,) + shape, dtype, name="input")]
        tf_fn = tf.function(lambda x, f=fn: {"logits": f(x)}, input_signature=spec, autograph=False)
        proto, _ = tf2onnx.convert.from_function(tf_fn, input_signature=spec, opset=15)
        path = HERE / f"jax_{name}.onnx"
        onnx.save(proto, str(path))
        tol = 0.05 if name == "transformer" else 1e-3
        check(path, name, channels_last=True, int_dtype=np.int32, tol=tol, min_agree=0.99)


if __name__ == "__main__":
    main()
