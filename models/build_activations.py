"""Small Fashion-MNIST CNNs with modern activations (issue 16): LeakyReLU, SiLU, HardSwish, GELU.

* ``fashion_lrelu.onnx``: VGG-style Conv-BN-LeakyReLU(0.1) blocks with max pooling, FC head.
* ``fashion_silu.onnx``: EfficientNet-style: SiLU stem, two MBConv blocks (expand 1x1, depthwise
  3x3, squeeze-excitation with a SiLU bottleneck and a Sigmoid gate, linear 1x1 projection),
  SiLU head, global pooling, FC.
* ``fashion_hswish.onnx``: MobileNetV3-style: HardSwish stem, inverted residual blocks with
  HardSwish and a HardSigmoid-gated squeeze-excitation, HardSwish head.
* ``fashion_gelu.onnx``: Conv-BN-GELU blocks (erf GELU, as torch writes it), residual, FC head.

Data: the training images of Fashion-MNIST are not on this machine, only the committed
``data/fashion_calib.npz`` (1,000 training images) and ``data/fashion_test.npz`` (the 10,000
test images, written by build_fashion.py). The networks are therefore trained on the 1,000
calibration images plus test images 5,000-9,999, and **evaluated on test images 0-4,999
only** (never trained on). Training is brief (20 s to 3 minutes each on one core: 6 or 20 epochs, ``EPOCHS``).

All take ``input`` float32 ``[N, 1, 28, 28]`` in [0, 1] (normalised inside the graph) and
return ``logits`` ``[N, 10]``, symbolic batch. Each network is exported twice from the same
weights: ``fashion_<arch>.onnx`` with the legacy torch exporter (opset 17) and
``fashion_<arch>_dynamo.onnx`` with the dynamo exporter (opset 18, one file, no external data).

Run: ``/work/torch-venv/bin/python models/build_activations.py [--arch lrelu,silu,hswish,gelu]``
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import onnx_logits
from build_fashion import FASHION_MEAN, FASHION_STD, export_and_report, export_dynamo
from build_fashion import train as fashion_train
from torch import nn

#: test images from here on are training data for these networks; evaluate below it
TRAIN_FROM = 5000
#: epochs per network for the committed files (the MobileNet-style ones learn more slowly)
EPOCHS = {"lrelu": 6, "silu": 20, "hswish": 20, "gelu": 6}


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias) + BatchNorm."""
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class LReluNet(nn.Module):
    """16,16 | 32,32 | 64 conv blocks with LeakyReLU(0.1) and max pooling, 576 -> 128 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.features = nn.Sequential(
            *conv_bn(1, 16), act(), *conv_bn(16, 16), act(), nn.MaxPool2d(2),
            *conv_bn(16, 32), act(), *conv_bn(32, 32), act(), nn.MaxPool2d(2),
            *conv_bn(32, 64), act(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(576, 128), act(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised images."""
        return self.classifier(self.features(x).flatten(1))


class SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv -> act -> 1x1 conv -> gate, times the input."""

    def __init__(self, c: int, r: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce, self.act = nn.Conv2d(c, r, 1), act()
        self.expand, self.gate = nn.Conv2d(r, c, 1), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x times its channel gate."""
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, optional SE, linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, act: type[nn.Module], gate: type[nn.Module],
                 se: bool = True) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = [*conv_bn(cin, mid, 1), act(), *conv_bn(mid, mid, 3, stride, groups=mid), act()]
        if se:
            layers.append(SqueezeExcite(mid, max(4, cin // 4), act, gate))
        layers += conv_bn(mid, cout, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block, plus the input when the shapes match."""
        y = self.body(x)
        return x + y if self.residual else y


class MobileStyle(nn.Module):
    """Stem 3x3/2 (16), MBConv 16->24/2, 24->24, 24->40/2 (7x7 -> 4x4), head 1x1 (96), GAP, FC."""

    def __init__(self, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16, 3, 2), act())
        self.blocks = nn.Sequential(MBConv(16, 24, 3, 2, act, gate), MBConv(24, 24, 3, 1, act, gate),
                                    MBConv(24, 40, 3, 2, act, gate))
        self.head = nn.Sequential(*conv_bn(40, 96, 1), act(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised images."""
        return self.fc(self.head(self.blocks(self.stem(x))).flatten(1))


class GeluBlock(nn.Module):
    """Two Conv-BN, GELU between and after the residual sum."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Sequential(*conv_bn(c, c), nn.GELU()), nn.Sequential(*conv_bn(c, c))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(x + bn(conv(gelu(bn(conv x)))))."""
        return self.act(x + self.b(self.a(x)))


class GeluNet(nn.Module):
    """Stem 3x3 (24) GELU, pool, residual GELU block, 3x3/2 conv (48) GELU, block, GAP, FC."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(1, 24), nn.GELU(), nn.MaxPool2d(2), GeluBlock(24),
                                  *conv_bn(24, 48, 3, 2), nn.GELU(), GeluBlock(48), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised images."""
        return self.fc(self.body(x).flatten(1))


ARCHS = {
    "lrelu": LReluNet,
    "silu": lambda: MobileStyle(nn.SiLU, nn.Sigmoid),
    "hswish": lambda: MobileStyle(nn.Hardswish, nn.Hardsigmoid),
    "gelu": GeluNet,
}


class Normalised(nn.Module):
    """``(x - mean) / std`` on [0, 1] pixels, then ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise raw pixels and return the wrapped network's logits."""
        return self.net((x - FASHION_MEAN) / FASHION_STD)


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    """build_fashion's loop (flips and 2-pixel shifts, one-cycle) with AdamW at 3e-3, batches of 64."""
    fashion_train(net, x, y, epochs, seed, bs=64, max_lr=3e-3,
                  optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4))


def training_data(here: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_eval, y_eval): the 1,000 calibration images plus test images
    TRAIN_FROM.., and test images 0..TRAIN_FROM-1, from the data files in ``here``/data."""
    test = np.load(here / "data" / "fashion_test.npz")
    x_test, y_test = test["input"], test["label"]
    # the calibration images' labels are not stored: label them with the committed Fashion ResNet
    # (91.4% accurate); a few wrong labels only add noise to this brief training
    x_cal = np.load(here / "data" / "fashion_calib.npz")["input"]
    y_cal = onnx_logits(here / "fashion_resnet.onnx", x_cal).argmax(axis=1).astype(np.int64)
    x_train = np.concatenate([x_cal, x_test[TRAIN_FROM:]])
    y_train = np.concatenate([y_cal, y_test[TRAIN_FROM:]])
    return x_train, y_train, x_test[:TRAIN_FROM], y_test[:TRAIN_FROM]


def main(archs: dict[str, Callable[[], nn.Module]] | None = None, epochs: dict[str, int] | None = None,
         doc: str | None = None) -> None:
    """Train the requested networks (``archs``, default ARCHS, for ``epochs`` each, default EPOCHS),
    export each with both exporters, report their accuracy on test images 0-4,999."""
    archs, epochs = archs or ARCHS, epochs or EPOCHS
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=(doc or __doc__).split("\n\n")[0])
    p.add_argument("--arch", default=",".join(archs))
    p.add_argument("--out-dir", type=Path, default=here)
    p.add_argument("--epochs", type=int, default=0, help="epochs for every network (0: EPOCHS, as committed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_eval, y_eval = training_data(here)
    for arch in args.arch.split(","):
        torch.manual_seed(args.seed)
        net = archs[arch]()
        print(f"training {arch} ({sum(q.numel() for q in net.parameters())} parameters) on {len(x_train)} images",
              flush=True)
        train(net, x_train, y_train, args.epochs or epochs[arch], args.seed)
        model = Normalised(net).eval()
        export_both(model, args.out_dir / f"fashion_{arch}", x_eval, y_eval)


def export_both(model: nn.Module, stem: Path, x_eval: np.ndarray, y_eval: np.ndarray) -> None:
    """``<stem>.onnx`` (legacy exporter) and ``<stem>_dynamo.onnx`` (dynamo exporter), each with its report."""
    what = f"test images 0-{len(x_eval) - 1}"
    export_and_report(model, stem.with_name(stem.name + ".onnx"), x_eval, y_eval, what)
    export_and_report(model, stem.with_name(stem.name + "_dynamo.onnx"), x_eval, y_eval, what, export=export_dynamo)


if __name__ == "__main__":
    main()
