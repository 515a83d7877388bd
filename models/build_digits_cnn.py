"""Train a small CNN on scikit-learn's 8x8 digits and export it three ways.

Data: ``sklearn.datasets.load_digits`` (1797 images, 8x8, pixel values 0..16),
scaled to [0, 1] by ``/ 16``. A fixed permutation splits it into 1197 train and
600 test images; 300 calibration images are a fixed subset of the train split.

Outputs (in ``--out-dir``, default: the folder of this script):

* ``digits_cnn.onnx``: legacy exporter, opset 17, BatchNormalization kept.
* ``digits_cnn_opset11.onnx``: same weights, legacy exporter, opset 11.
* ``digits_cnn_dynamo.onnx`` + ``digits_cnn_dynamo.onnx.data``: same weights,
  dynamo exporter, opset 18, weights as external data.
* ``data/digits_test.npz`` (``input``, ``label``) and
  ``data/digits_calib.npz`` (``input``).

All models take ``input`` float32 ``[N, 1, 8, 8]`` in [0, 1] and return
``logits`` ``[N, 10]``, with a dynamic batch dimension.

Run: ``/tmp/torchenv/bin/python models/build_digits_cnn.py``
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from _common import accuracy, onnx_logits
from sklearn.datasets import load_digits
from torch import nn

N_TRAIN = 1197
N_TEST = 600
N_CALIB = 300


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, max-pool, two fully connected layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, 10]`` for images ``[N, 1, 8, 8]`` in [0, 1]."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = x.view(x.size(0), -1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; force deterministic torch kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def split_digits(seed: int) -> dict[str, np.ndarray]:
    """Load digits and split them deterministically into train/test/calib arrays."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    train_idx, test_idx = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_TEST]
    calib_idx = np.sort(rng.choice(train_idx, size=N_CALIB, replace=False))
    return {
        "x_train": x[train_idx],
        "y_train": y[train_idx],
        "x_test": x[test_idx],
        "y_test": y[test_idx],
        "x_calib": x[calib_idx],
    }


def train(
    model: DigitsCNN, x: np.ndarray, y: np.ndarray, epochs: int, seed: int
) -> None:
    """Train with Adam and a cosine learning-rate schedule, mini-batches of 32."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  loss {total / len(xt):.4f}")
    model.eval()


def export_legacy(model: nn.Module, path: Path, opset: int) -> None:
    """Legacy (TorchScript) export that keeps BatchNormalization unfolded."""
    dummy = torch.zeros(1, 1, 8, 8, dtype=torch.float32)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def export_dynamo(model: nn.Module, path: Path) -> None:
    """Dynamo export, opset 18, dynamic batch, weights in ``<path>.data``.

    Saved with the exporter's own ``save(..., external_data=True)``: weight
    matrices go to the ``.data`` file, tiny tensors (biases, the Reshape shape)
    stay inline. The exporter's default graph optimiser folds BatchNorm into Conv.
    """
    dummy = torch.zeros(2, 1, 8, 8, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model,
        (dummy,),
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
        verbose=False,
    )
    for node in program.model.graph.all_nodes():
        # Stack traces embed absolute paths of this machine; drop them.
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)
    program.save(str(path), external_data=True)
    if not data_path.exists():
        raise FileNotFoundError(f"dynamo exporter did not write {data_path}")
    onnx.checker.check_model(str(path), full_check=True)






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
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (fixed for reproducibility)",
    )
    return p.parse_args()


def main() -> None:
    """Split data, train, export the three ONNX files, report accuracies."""
    args = parse_args()
    out_dir: Path = args.out_dir
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    d = split_digits(args.seed)
    np.savez_compressed(
        data_dir / "digits_test.npz", input=d["x_test"], label=d["y_test"]
    )
    np.savez_compressed(data_dir / "digits_calib.npz", input=d["x_calib"])

    model = DigitsCNN()
    start = time.perf_counter()
    train(model, d["x_train"], d["y_train"], args.epochs, args.seed)
    print(f"training took {time.perf_counter() - start:.1f} s")
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(d["x_test"])).numpy()
    torch_acc = accuracy(torch_logits, d["y_test"])
    print(f"torch accuracy on test split ({N_TEST}): {torch_acc:.2f}%")

    paths = {
        "digits_cnn.onnx": out_dir / "digits_cnn.onnx",
        "digits_cnn_opset11.onnx": out_dir / "digits_cnn_opset11.onnx",
        "digits_cnn_dynamo.onnx": out_dir / "digits_cnn_dynamo.onnx",
    }
    export_legacy(model, paths["digits_cnn.onnx"], opset=17)
    export_legacy(model, paths["digits_cnn_opset11.onnx"], opset=11)
    export_dynamo(model, paths["digits_cnn_dynamo.onnx"])

    preds = {}
    for name, path in paths.items():
        logits = onnx_logits(path, d["x_test"])
        preds[name] = logits.argmax(axis=1)
        ops = sorted(
            {
                n.op_type
                for n in onnx.load(str(path), load_external_data=False).graph.node
            }
        )
        print(
            f"{name}: ANN accuracy {accuracy(logits, d['y_test']):.2f}%  "
            f"max |torch - ort| {np.abs(logits - torch_logits).max():.2e}  ops {ops}"
        )
        if "dynamo" not in name and "BatchNormalization" not in ops:
            raise SystemExit(f"{name}: BatchNormalization was folded by the exporter")
    first = next(iter(preds.values()))
    if not all(np.array_equal(first, p) for p in preds.values()):
        raise SystemExit("ONNX exports disagree on test predictions")
    print("all three ONNX files give identical test predictions")


if __name__ == "__main__":
    main()
