"""The four reference networks in Keras 3 (channels-last), with the torch-trained weights loaded
(run as scripts: imported as ``_keras_nets``). Same functions as ``_torch_nets``; the image
networks take NHWC [N, 8, 8, 1], the embedding network int32 tokens [N, 64]."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

from _export_check import weights  # noqa: E402


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _bn(w: dict, p: str) -> list[np.ndarray]:
    return [w[f"{p}.weight"], w[f"{p}.bias"], w[f"{p}.running_mean"], w[f"{p}.running_var"]]


def _dense(w: dict, p: str) -> list[np.ndarray]:
    return [w[f"{p}.weight"].T, w[f"{p}.bias"]]


class PositionAdd(layers.Layer):
    """Adds a learned [tokens, d] position embedding."""

    def build(self, shape: tuple) -> None:
        self.pos = self.add_weight(shape=tuple(shape[1:]), initializer="zeros", name="pos")

    def call(self, x):  # noqa: ANN001, ANN201
        return x + self.pos


def cnn() -> keras.Model:
    w = weights("cnn")
    x = inp = keras.Input((8, 8, 1), name="input")
    c1, b1 = layers.Conv2D(8, 3, padding="same"), layers.BatchNormalization(epsilon=1e-5)
    c2, b2 = layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(epsilon=1e-5)
    f1, f2 = layers.Dense(32, activation="relu"), layers.Dense(10)
    x = layers.ReLU()(b1(c1(x)))
    x = layers.ReLU()(b2(c2(x)))
    x = layers.Flatten()(layers.MaxPooling2D()(x))
    model = keras.Model(inp, f2(f1(x)))
    c1.set_weights([_conv(w["conv1.weight"]), w["conv1.bias"]])
    c2.set_weights([_conv(w["conv2.weight"]), w["conv2.bias"]])
    b1.set_weights(_bn(w, "bn1"))
    b2.set_weights(_bn(w, "bn2"))
    # torch flattens (c, h, w), Keras (h, w, c)
    f1.set_weights([w["fc1.weight"].reshape(32, 16, 4, 4).transpose(2, 3, 1, 0).reshape(256, 32), w["fc1.bias"]])
    f2.set_weights(_dense(w, "fc2"))
    return model


def mbv3() -> keras.Model:
    w = weights("mbv3")
    x = inp = keras.Input((8, 8, 1), name="input")
    stem, b0 = layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(epsilon=1e-5)
    dw, b1 = layers.DepthwiseConv2D(3, padding="same"), layers.BatchNormalization(epsilon=1e-5)
    se1, se2 = layers.Dense(8, activation="relu"), layers.Dense(16, activation="hard_sigmoid")
    proj, b2 = layers.Conv2D(16, 1), layers.BatchNormalization(epsilon=1e-5)
    fc = layers.Dense(10)
    x = layers.ReLU()(b0(stem(x)))
    x = layers.Activation("hard_swish")(b1(dw(x)))
    s = layers.Reshape((1, 1, 16))(se2(se1(layers.GlobalAveragePooling2D()(x))))
    x = b2(proj(layers.Multiply()([x, s])))
    model = keras.Model(inp, fc(layers.GlobalAveragePooling2D()(x)))
    stem.set_weights([_conv(w["stem.weight"]), w["stem.bias"]])
    dw.set_weights([w["dw.weight"].transpose(2, 3, 0, 1), w["dw.bias"]])
    proj.set_weights([_conv(w["proj.weight"]), w["proj.bias"]])
    for bn, p in ((b0, "bn0"), (b1, "bn1"), (b2, "bn2")):
        bn.set_weights(_bn(w, p))
    for d, p in ((se1, "se1"), (se2, "se2"), (fc, "fc")):
        d.set_weights(_dense(w, p))
    return model


def transformer(approximate_gelu: bool = True) -> keras.Model:
    w = weights("transformer")
    d, heads = 32, 2
    x = inp = keras.Input((8, 8), name="input")
    embed, mix, pos = layers.Dense(d, activation="relu"), layers.Dense(d), PositionAdd()
    ln1, ln2 = layers.LayerNormalization(epsilon=1e-5), layers.LayerNormalization(epsilon=1e-5)
    mha = layers.MultiHeadAttention(heads, d // heads)
    mlp1, mlp2, head = layers.Dense(2 * d), layers.Dense(d), layers.Dense(10)
    h = pos(mix(embed(x)))
    a = ln1(h)
    h = layers.Add()([h, mha(a, a)])
    m = layers.Activation(lambda t: keras.activations.gelu(t, approximate=approximate_gelu))(mlp1(ln2(h)))
    h = layers.Add()([h, mlp2(m)])
    model = keras.Model(inp, head(layers.GlobalAveragePooling1D()(h)))
    for lay, p in ((embed, "embed"), (mix, "mix"), (mlp1, "mlp1"), (mlp2, "mlp2"), (head, "head")):
        lay.set_weights(_dense(w, p))
    pos.set_weights([w["pos"]])
    for lay, p in ((ln1, "ln1"), (ln2, "ln2")):
        lay.set_weights([w[f"{p}.weight"], w[f"{p}.bias"]])
    wq, wk, wv = np.split(w["qkv.weight"], 3)
    bq, bk, bv = np.split(w["qkv.bias"], 3)
    dh = d // heads
    mha.set_weights([wq.T.reshape(d, heads, dh), bq.reshape(heads, dh), wk.T.reshape(d, heads, dh),
                     bk.reshape(heads, dh), wv.T.reshape(d, heads, dh), bv.reshape(heads, dh),
                     w["out.weight"].T.reshape(heads, dh, d), w["out.bias"]])
    return model


def embedding() -> keras.Model:
    w = weights("embedding")
    x = inp = keras.Input((64,), dtype="int32", name="input")
    emb = layers.Embedding(17, 4)
    f1, f2, f3 = layers.Dense(64, activation="relu"), layers.Dense(32, activation="relu"), layers.Dense(10)
    model = keras.Model(inp, f3(f2(f1(layers.Flatten()(emb(x))))))
    emb.set_weights([w["embed.weight"]])
    for lay, p in ((f1, "fc1"), (f2, "fc2"), (f3, "fc3")):
        lay.set_weights(_dense(w, p))
    return model


BUILD = {"cnn": cnn, "mbv3": mbv3, "transformer": transformer, "embedding": embedding}
