"""Train the Fashion-MNIST reference networks (VGG-style and ResNet-style) and export them to ONNX.

Data: Debian package ``dataset-fashion-mnist`` (files under
``/usr/share/datasets/fashion-mnist/``, the original Zalando IDX files, MIT licence).

Outputs (in ``--out-dir``, default: the folder of this script):

* ``fashion_vgg.onnx`` / ``fashion_resnet.onnx``: raw pixels in [0, 1], float32
  ``[N, 1, 28, 28]`` (input ``input``), normalised inside the graph, ``logits`` ``[N, 10]``.
* ``data/fashion_test.npz``: the full 10,000-image test set, ``input`` float32 in [0, 1]
  (k/255) and ``label`` int64.
* ``data/fashion_calib.npz``: ``input`` only, ``--calib-size`` training images drawn with a
  fixed seed (disjoint from the test set).
* ``fashion_<arch>.pt``: the trained torch state dicts (0.3-0.45 MB, committed; written to
  ``--save-torch DIR``, default ``--out-dir``). tests/test_exporters_torch.py exports them
  again with both torch exporters; benchmarks/spikingjelly_compare.py converts them.

Run: ``/tmp/torchenv/bin/python models/build_fashion.py [--arch vgg|resnet|both]``
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from _common import accuracy, onnx_logits
from scenes import FASHION_DIR, read_idx  # numpy-only; the scene generator reads the same files
from torch import nn

FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
OPSET = 17


def load_fashion(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{"train"|"test": (images float32 [N,1,28,28] in [0,1], labels int64)}``."""
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(root / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        y = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        out[split] = (x.reshape(-1, 1, 28, 28), y)
    return out


def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """3x3 Conv (no bias) + BatchNorm."""
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]


class FashionVGG(nn.Module):
    """Conv-BN-ReLU blocks with max pooling: 16,16 | 32,32 | 64, then 576→128→10 (~5.5M MACs)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16), nn.ReLU(), *conv_bn(16, 16), nn.ReLU(), nn.MaxPool2d(2),
            *conv_bn(16, 32), nn.ReLU(), *conv_bn(32, 32), nn.ReLU(), nn.MaxPool2d(2),
            *conv_bn(32, 64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.3), nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised images."""
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 Conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, stride)
        self.conv2, self.bn2 = conv_bn(cout, cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class FashionResNet(nn.Module):
    """Stem 3x3 conv (16) + max pool, blocks 16 (14x14), 32/2 (7x7), 64/2 (4x4), GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16), nn.ReLU(), nn.MaxPool2d(2))
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised images."""
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class Normalised(nn.Module):
    """``(x - mean) / std`` on [0, 1] pixels, then ``net``."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise raw pixels and return the wrapped network's logits."""
        return self.net((x - self.mean) / self.std)


ARCHS = {"vgg": FashionVGG, "resnet": FashionResNet}


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, bs: int = 128,
          optimizer: Callable[[Any], torch.optim.Optimizer] | None = None, max_lr: float = 0.1) -> None:
    """SGD with momentum (or ``optimizer(parameters)``), one-cycle schedule up to ``max_lr``,
    batches of ``bs``, random horizontal flips and 2-pixel shifts."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy((x - FASHION_MEAN) / FASHION_STD), torch.from_numpy(y)
    opt = (optimizer(net.parameters()) if optimizer is not None else
           torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True))
    steps = epochs * (len(xt) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for ep in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(len(xt) // bs):
            idx = perm[i * bs : (i + 1) * bs]
            xb = xt[idx]
            flip = torch.rand(bs, generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            loss = loss_fn(net(xb), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss)
        print(f"  epoch {ep + 1}/{epochs}: loss {total / (len(xt) // bs):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    net.eval()


def export_onnx(model: nn.Module, path: Path) -> None:
    """Legacy exporter, opset 17, dynamic batch (in eval mode it folds BatchNorm into the convolutions itself)."""
    torch.onnx.export(
        model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def export_dynamo(model: nn.Module, path: Path) -> None:
    """Dynamo exporter (opset 18), dynamic batch, weights inside the one file."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    prog = torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), dynamo=True, opset_version=18,
                             input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},))
    prog.save(str(path), external_data=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def export_and_report(model: nn.Module, path: Path, x: np.ndarray, y: np.ndarray, what: str,
                      export: Callable[[nn.Module, Path], None] = export_onnx) -> None:
    """Export ``model`` to ``path`` (``export``: export_onnx or export_dynamo), print its size, the largest
    torch-vs-onnxruntime logit difference on the first 256 images of ``x`` and its accuracy on ``x`` / ``y``
    (``what``)."""
    export(model, path)
    with torch.no_grad():
        ref = model(torch.from_numpy(x[:256])).numpy()
    logits = onnx_logits(path, x)
    print(f"{path.name}: {path.stat().st_size} bytes; max |torch - ort| {np.abs(ref - logits[:256]).max():.2e}")
    print(f"ANN accuracy, {what}: {accuracy(logits, y):.2f}%", flush=True)


def main() -> None:
    """Write the data files, train the requested networks, export, report accuracy."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["vgg", "resnet", "both"], default="both")
    p.add_argument("--out-dir", type=Path, default=here)
    p.add_argument("--data-dir", type=Path, default=FASHION_DIR)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-data", action="store_true", help="do not (re)write the data files")
    p.add_argument("--save-torch", type=Path, default=None,
                   help="folder for the fashion_<arch>.pt state dicts (default: --out-dir)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    data = load_fashion(args.data_dir)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    data_dir = args.out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    calib_idx = np.sort(rng.choice(len(x_train), size=args.calib_size, replace=False))
    if not args.skip_data:
        np.savez_compressed(data_dir / "fashion_test.npz", input=x_test, label=y_test)
        np.savez_compressed(data_dir / "fashion_calib.npz", input=x_train[calib_idx])

    for arch in (["vgg", "resnet"] if args.arch == "both" else [args.arch]):
        torch.manual_seed(args.seed)
        net = ARCHS[arch]()
        print(f"training {arch} ({sum(p.numel() for p in net.parameters())} parameters)", flush=True)
        train(net, x_train, y_train, args.epochs, args.seed)
        torch_dir = args.save_torch or args.out_dir
        torch_dir.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), torch_dir / f"fashion_{arch}.pt")
        model = Normalised(net, FASHION_MEAN, FASHION_STD).eval()
        path = args.out_dir / f"fashion_{arch}.onnx"
        export_and_report(model, path, x_test, y_test, "full Fashion-MNIST test set")


if __name__ == "__main__":
    main()
