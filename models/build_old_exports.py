"""Build small model-zoo-style "old exports" of five network families (issue 15).

The ONNX model zoo's older Caffe/Caffe2 conversions are IR 3, opset 7-9, list every
initializer in ``graph.input`` and bake a batch of 1 into Reshape shapes. These stand-ins
are written by hand in torch (torchvision is not used), with small channel counts and a
3 x 32 x 32 input, and exported the same way:
``torch.onnx.export(..., dynamo=False, opset_version=9, keep_initializers_as_inputs=True)``
at batch 1, then stamped IR version 3 (onnxruntime still loads them; checked here).

Families: SqueezeNet-1.1 fire modules, ShuffleNet channel shuffle (Reshape / Transpose /
Reshape with batch 1 spelled out), Inception concat branches, DenseNet dense concat,
AlexNet with LRN (and an opset-9 Dropout node with a ratio, as Caffe2 conversions keep),
GoogLeNet (Inception-v1: LRN in the stem, then concat branches).

Weights: He-initialised at random (seeded), then made "alive" from data: BatchNorm running
statistics are the data's (train-mode passes with cumulative averages, so each layer sees
normalised inputs), and layers without BatchNorm (SqueezeNet, AlexNet, GoogLeNet) get their weights
rescaled layer by layer (LSUV-style) so each pre-activation has mean 0 and std 1 per channel.
No layer is dead or exploding (printed per model).

Data: the repository's Fashion-MNIST calibration images (``models/data/fashion_calib.npz``),
padded to 32 x 32 and coloured (a random foreground and background colour per image):
``models/old_exports/calib.npz`` (64 images, ``input``) and ``models/old_exports/test.npz``
(16 other images).

Run: ``/work/torch-venv/bin/python models/build_old_exports.py`` (torch version recorded in
``models/old_exports/VERSIONS.txt``).
"""
from __future__ import annotations

import io
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
OUT = HERE / "old_exports"
SEED = 15
N_CALIB, N_TEST = 64, 16


#: True while exporting: the batch is spelled as the literal 1 (what the zoo files hold);
#: otherwise it is read from the data, so statistics can be gathered on whole batches
BAKED = [False]


def nb(x: torch.Tensor) -> int:
    """The batch size as the export spells it."""
    return 1 if BAKED[0] else int(x.shape[0])


def images(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(calib, test) float32 ``[n, 3, 32, 32]`` in [0, 1] from real Fashion-MNIST garments."""
    x = np.load(HERE / "data" / "fashion_calib.npz")["input"][: N_CALIB + N_TEST]
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    rng = np.random.default_rng(seed)
    fg = rng.uniform(0.3, 1.0, (len(x), 3, 1, 1)).astype(np.float32)
    bg = rng.uniform(0.0, 0.4, (len(x), 3, 1, 1)).astype(np.float32)
    rgb = (x * fg + (1 - x) * bg).astype(np.float32)
    rgb = np.round(rgb * 255) / 255  # 8-bit levels, like photos
    return rgb[:N_CALIB].astype(np.float32), rgb[N_CALIB:].astype(np.float32)


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True,
            bn: bool = True) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm [-> ReLU]; with ``bn=False`` Conv (with bias) [-> ReLU]."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Fire(nn.Module):
    """SqueezeNet fire module: squeeze 1x1, then expand 1x1 and 3x3, concatenated."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, expand, 1)
        self.e3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 layout: conv s2, pool, 2 fires, pool, 2 fires, conv 1x1 classifier,
    ReLU, global average pool, Flatten. No BatchNorm (as in the original)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8), Fire(16, 4, 8), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 6, 12), Fire(24, 6, 12))
        self.classifier = nn.Sequential(nn.Conv2d(24, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1; residual
    add (stride 1) or concat with an average-pooled shortcut (stride 2)."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int, size: int) -> None:
        super().__init__()
        mid = cout // 4 // groups * groups
        self.groups, self.mid, self.stride, self.size = groups, mid, stride, size
        out = cout - cin if stride == 2 else cout
        self.g1 = conv_bn(cin, mid, 1, groups=groups)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid, relu=False)
        self.g2 = conv_bn(mid, out, 1, groups=groups, relu=False)
        self.pool = nn.AvgPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.g1(x)
        h = self.size
        # the Caffe2 spelling: batch 1 baked into both Reshape shapes
        b = nb(y)
        y = y.reshape(b, self.groups, self.mid // self.groups, h, h).transpose(1, 2).reshape(b, self.mid, h, h)
        y = self.g2(self.dw(y))
        if self.stride == 2:
            return torch.relu(torch.cat([self.pool(x), y], 1))
        return torch.relu(x + y)


class ShuffleNet(nn.Module):
    """Stem conv + pool, one stride-2 and two stride-1 shuffle units (3 groups), GAP, Reshape
    to [1, -1], Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 12, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.units = nn.Sequential(ShuffleUnit(12, 24, 3, 2, 8), ShuffleUnit(24, 24, 3, 1, 4),
                                   ShuffleUnit(24, 24, 3, 1, 4))
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.units(self.stem(x))
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(x.reshape(nb(x), -1))


class InceptionBlock(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; max pool 3x3 -> 1x1."""

    def __init__(self, cin: int, c: int, bn: bool = True) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c, 1, bn=bn)
        self.b2 = nn.Sequential(conv_bn(cin, c, 1, bn=bn), conv_bn(c, c, 3, bn=bn))
        self.b3 = nn.Sequential(conv_bn(cin, c // 2, 1, bn=bn), conv_bn(c // 2, c, 3, bn=bn), conv_bn(c, c, 3, bn=bn))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, c, 1, bn=bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    """Stem, two inception blocks with a pool between, GAP, Reshape [1, -1], Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), conv_bn(16, 16, 3))
        self.a = InceptionBlock(16, 8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.b = InceptionBlock(32, 8)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.pool(self.a(self.stem(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).reshape(nb(x), 32))


class DenseLayer(nn.Module):
    """BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv, concatenated to its input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.relu(self.bn1(x)))
        y = self.conv2(torch.relu(self.bn2(y)))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    """Stem conv + pool, dense block (3 layers, growth 8), transition (BN, ReLU, 1x1, avg pool),
    dense block (2 layers), BN, ReLU, GAP, Flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        g = 8
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.block1 = nn.Sequential(DenseLayer(16, g), DenseLayer(16 + g, g), DenseLayer(16 + 2 * g, g))
        c = 16 + 3 * g
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                   nn.AvgPool2d(2, 2))
        c //= 2
        self.block2 = nn.Sequential(DenseLayer(c, g), DenseLayer(c + g, g))
        c += 2 * g
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.block2(self.trans(self.block1(self.stem(x)))))
        return self.fc(torch.flatten(x, 1))


class _LRN(torch.autograd.Function):
    """torch's local_response_norm, exported as one ONNX LRN node (torch would decompose it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:  # noqa: ANN001
        return nn.functional.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size: int, alpha: float, beta: float, k: float):  # noqa: ANN001, ANN205
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.Module):
    """Local response normalisation across channels (AlexNet's constants)."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.args = (size, alpha, beta, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LRN.apply(x, *self.args)


class AlexNet(nn.Module):
    """AlexNet layout: conv-ReLU-LRN-pool twice, three convs, pool, Reshape [1, -1], three
    Linear layers (ReLU between). No BatchNorm (as in the original)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, 2, 2), nn.ReLU(), LRN(), nn.MaxPool2d(3, 2),
            nn.Conv2d(16, 24, 5, 1, 2), nn.ReLU(), LRN(), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(24, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(32, 24, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(3, 2))
        self.classifier = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                                        nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).reshape(nb(x), 24))


class GoogLeNet(nn.Module):
    """Inception-v1 layout: conv s2, pool, LRN, 1x1 and 3x3 convs, LRN (the stem with both
    LRNs), two inception blocks without BatchNorm (a pool between), GAP, Reshape [1, -1],
    Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 5, 2, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1), LRN(), nn.Conv2d(16, 16, 1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(), LRN())
        self.a = InceptionBlock(16, 12, bn=False)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.b = InceptionBlock(48, 12, bn=False)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.pool(self.a(self.stem(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).reshape(nb(x), 48))


FAMILIES: dict[str, type[nn.Module]] = {
    "squeezenet": SqueezeNet, "shufflenet": ShuffleNet, "inception": Inception,
    "densenet": DenseNet, "alexnet": AlexNet, "googlenet": GoogLeNet,
}


def he_init(model: nn.Module) -> None:
    """He (Kaiming normal, fan-in) weights, zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def set_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm running statistics from the data; without BatchNorm, LSUV-style rescaling
    of each Conv / Linear so its output has mean 0 and std 1 per channel on the data."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes
        model.train()
        for chunk in x.split(16):
            model(chunk)
        model.eval()
        return
    model.eval()
    for layer in [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]:
        seen: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
        model(x)
        handle.remove()
        out = seen[0].transpose(0, 1).reshape(seen[0].shape[1], -1)
        mean, std = out.mean(1), out.std(1).clamp_min(1e-6)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight /= std.reshape(shape)
        layer.bias.copy_((layer.bias - mean) / std)


@torch.no_grad()
def activation_report(model: nn.Module, x: torch.Tensor) -> list[tuple[str, float, float]]:
    """(module, share of positive pre-activations, mean |pre-activation|) per Conv / Linear."""
    rows: list[tuple[str, float, float]] = []
    hooks = [m.register_forward_hook(lambda m, _i, out, name=name: rows.append(
        (name, float((out > 0).float().mean()), float(out.abs().mean()))))
        for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    model(x)
    for h in hooks:
        h.remove()
    return rows


def export(model: nn.Module) -> onnx.ModelProto:
    """Legacy export, opset 9, initializers listed as inputs, batch 1; then IR version 3."""
    buf = io.BytesIO()
    BAKED[0] = True
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), buf, dynamo=False, opset_version=9,
                      keep_initializers_as_inputs=True, input_names=["input"], output_names=["logits"],
                      do_constant_folding=True)
    BAKED[0] = False
    proto = onnx.load_from_string(buf.getvalue())
    constants_to_initializers(proto)
    proto.ir_version = 3
    proto.producer_name, proto.producer_version = "build_old_exports", torch.__version__
    return proto


def constants_to_initializers(proto: onnx.ModelProto) -> None:
    """Constant nodes (torch's Reshape shapes) become initializers listed in ``graph.input``,
    as in the Caffe2 conversions, where every constant is an input with a default."""
    graph = proto.graph
    keep = []
    for node in graph.node:
        if node.op_type == "Constant":
            value = onnx.helper.get_attribute_value(node.attribute[0])
            value.name = node.output[0]
            graph.initializer.append(value)
            graph.input.append(onnx.helper.make_tensor_value_info(value.name, value.data_type, list(value.dims)))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def add_dropout(proto: onnx.ModelProto, after: str) -> None:
    """Insert an opset-9 Dropout (ratio 0.5) behind the node ``after``, as Caffe2 conversions
    keep them (eval-mode torch exports drop it)."""
    nodes = list(proto.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.name == after)
    src = nodes[i].output[0]
    new = src + "_dropout"
    for n in nodes[i + 1:]:
        n.input[:] = [new if t == src else t for t in n.input]
    nodes.insert(i + 1, onnx.helper.make_node("Dropout", [src], [new], name=after + "_dropout", ratio=0.5))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def build(name: str, calib: np.ndarray, test: np.ndarray) -> None:
    """Build, normalise from data, export and check one family."""
    torch.manual_seed(SEED)
    model = FAMILIES[name]()
    he_init(model)
    set_statistics(model, torch.from_numpy(calib))
    model.eval()
    for layer, pos, mag in activation_report(model, torch.from_numpy(calib)):
        assert 0.05 < pos < 0.95 and 1e-2 < mag < 1e2, (name, layer, pos, mag)
    proto = export(model)
    if name == "alexnet":
        add_dropout(proto, next(n.name for n in proto.graph.node if n.op_type == "Relu" and "classifier" in n.name))
    onnx.checker.check_model(proto)
    path = OUT / f"{name}.onnx"
    path.write_bytes(proto.SerializeToString(deterministic=True))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in test[:4]:
            want = model(torch.from_numpy(x[None])).numpy()
            got = sess.run(None, {"input": x[None]})[0]
            assert np.allclose(want, got, rtol=1e-4, atol=1e-4), name
    inputs = len(proto.graph.input)
    print(f"{name}: {path.stat().st_size:,} bytes, IR {proto.ir_version}, opset {proto.opset_import[0].version}, "
          f"{inputs} graph inputs ({len(proto.graph.initializer)} initializers), "
          f"ops {sorted({n.op_type for n in proto.graph.node})}")


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    calib, test = images()
    np.savez_compressed(OUT / "calib.npz", input=calib)
    np.savez_compressed(OUT / "test.npz", input=test)
    for name in FAMILIES:
        build(name, calib, test)
    (OUT / "VERSIONS.txt").write_text(
        f"torch {torch.__version__}\nonnx {onnx.__version__}\nonnxruntime {ort.__version__}\n"
        f"numpy {np.__version__}\npython {platform.python_version()}\n")


if __name__ == "__main__":
    main()
