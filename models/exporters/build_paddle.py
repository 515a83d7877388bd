"""Export the four reference networks from PaddlePaddle with paddle2onnx, opset 11 (as the
PP-OCR models on PyPI are): ``paddle_<net>.onnx``. Same layout as torch (NCHW, int64 tokens);
Paddle's ``Linear`` stores its weight as [in, out].

Toolchain: paddlepaddle 3.3.1, paddle2onnx 2.1.0 (see README.md). Run:
``/work/exporters-paddle/bin/python models/exporters/build_paddle.py``
"""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle2onnx
from paddle import nn
from paddle.nn import functional as F

from _export_check import HERE, NETS, check, weights


class CNN(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2D(1, 8, 3, padding=1), nn.BatchNorm2D(8)
        self.conv2, self.bn2 = nn.Conv2D(8, 16, 3, padding=1), nn.BatchNorm2D(16)
        self.fc1, self.fc2 = nn.Linear(256, 32), nn.Linear(32, 10)

    def forward(self, x):  # noqa: ANN001, ANN201
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(paddle.flatten(x, 1))))


class MBV3(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2D(1, 16, 3, padding=1), nn.BatchNorm2D(16)
        self.dw, self.bn1 = nn.Conv2D(16, 16, 3, padding=1, groups=16), nn.BatchNorm2D(16)
        self.se1, self.se2 = nn.Linear(16, 8), nn.Linear(8, 16)
        self.proj, self.bn2 = nn.Conv2D(16, 16, 1), nn.BatchNorm2D(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):  # noqa: ANN001, ANN201
        x = F.relu(self.bn0(self.stem(x)))
        x = F.hardswish(self.bn1(self.dw(x)))
        s = F.hardsigmoid(self.se2(F.relu(self.se1(x.mean((2, 3))))), slope=1 / 6, offset=0.5)
        x = self.bn2(self.proj(x * s.unsqueeze((2, 3))))
        return self.fc(x.mean((2, 3)))


class Transformer(nn.Layer):
    def __init__(self, d: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.d, self.heads = d, heads
        self.embed, self.mix = nn.Linear(8, d), nn.Linear(d, d)
        self.pos = self.create_parameter([8, d])
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp1, self.mlp2, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 10)

    def forward(self, x):  # noqa: ANN001, ANN201
        d, heads = self.d, self.heads
        dh = d // heads
        h = self.mix(F.relu(self.embed(x))) + self.pos
        q, k, v = paddle.split(self.qkv(self.ln1(h)), 3, axis=-1)
        q, k, v = (t.reshape([-1, 8, heads, dh]).transpose([0, 2, 1, 3]) for t in (q, k, v))
        a = F.softmax(paddle.matmul(q, k, transpose_y=True) / math.sqrt(dh), axis=-1)
        h = h + self.out(paddle.matmul(a, v).transpose([0, 2, 1, 3]).reshape([-1, 8, d]))
        h = h + self.mlp2(F.gelu(self.mlp1(self.ln2(h))))
        return self.head(h.mean(1))


class Embedding(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(17, 4)
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, tokens):  # noqa: ANN001, ANN201
        x = paddle.flatten(self.embed(tokens), 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


LAYERS = {"cnn": CNN, "mbv3": MBV3, "transformer": Transformer, "embedding": Embedding}
SPECS = {"cnn": [None, 1, 8, 8], "mbv3": [None, 1, 8, 8], "transformer": [None, 8, 8], "embedding": [None, 64]}


def load(name: str) -> nn.Layer:
    """The Paddle layer with the torch-trained weights (Linear weights transposed to [in, out])."""
    layer = LAYERS[name]()
    w = weights(name)
    linear = {n for n, m in layer.named_sublayers() if isinstance(m, nn.Linear)}
    state = {}
    for key, value in layer.state_dict().items():
        mod, _, param = key.rpartition(".")
        src = {"_mean": "running_mean", "_variance": "running_var"}.get(param, param)
        v = w[f"{mod}.{src}" if mod else key]
        state[key] = v.T if mod in linear and param == "weight" else v
        assert tuple(state[key].shape) == tuple(value.shape), (key, state[key].shape, value.shape)
    layer.set_state_dict({k: paddle.to_tensor(np.ascontiguousarray(v)) for k, v in state.items()})
    layer.eval()
    return layer


def main() -> None:
    print("paddlepaddle", paddle.__version__, "paddle2onnx", paddle2onnx.__version__)
    for name in NETS:
        dtype = "int64" if name == "embedding" else "float32"
        spec = [paddle.static.InputSpec(SPECS[name], dtype, "input")]
        prefix = HERE / f"paddle_{name}"
        paddle.onnx.export(load(name), str(prefix), input_spec=spec, opset_version=11)
        check(HERE / f"paddle_{name}.onnx", name)


if __name__ == "__main__":
    main()
