"""Train the two scene segmentation networks (FCN-style and DeepLab-style) and export them to ONNX.

Data: scenes from ``scenes.py`` (Fashion-MNIST garments, MIT licence), generated here: the
``train`` split (training garments only), ``--train-scenes`` scenes with a fixed seed, plus
random horizontal flips. The test figures use the committed ``data/scenes_test.npz``
(``build_scenes.py``; unseen garments).

Outputs (in ``--out-dir``, default: the folder of this script):

* ``seg_fcn.onnx``: FCN-style network on a small ResNet-style backbone (output stride 8),
  a 1x1 classifier, the stride-8 score upsampled x2 and added to a 1x1 score of the stride-4
  stage (FCN-16s-like skip), then bilinear upsampling to the input size.
* ``seg_deeplab.onnx``: DeepLab-style network: backbone with output stride 4 whose last stage
  uses dilated 3x3 convolutions, an ASPP block (1x1 conv, 3x3 convs with dilations 2, 4, 6,
  global average pooling -> 1x1 conv + BN + ReLU -> bilinear upsampling to the feature size),
  concatenation, 1x1 projection, classifier, bilinear upsampling to the input size.

Both: ``input`` float32 ``[N, 1, 64, 64]`` in [0, 1], ``logits`` float32 ``[N, 11, 64, 64]``
(class 0 = background, k + 1 = Fashion class k), symbolic batch, legacy exporter, opset 17,
BatchNorm left for the compiler to fold. The script prints the ANN mIoU of the exported
ONNX files on ``data/scenes_test.npz`` (onnxruntime).

Run: ``/tmp/torchenv/bin/python models/build_segmentation.py [--arch fcn|deeplab|both]``;
``--snn-check 100`` instead compiles the existing files (default options) and prints their SNN
mIoU by T on the first 100 test scenes.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from scenes import NUM_CLASSES, make_scenes
from torch import nn

OPSET = 17
SIZE = 64


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd k) + BatchNorm."""
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """ResNet basic block (optionally dilated); a strided 1x1 Conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride, dilation)
        self.b = conv_bn(cout, cout, 3, 1, dilation)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(b(relu(a(x))) + shortcut(x))."""
        return F.relu(self.b(F.relu(self.a(x))) + self.shortcut(x))


def stem(cout: int) -> nn.Sequential:
    """3x3 stride-2 Conv-BN-ReLU."""
    return nn.Sequential(conv_bn(1, cout, 3, 2), nn.ReLU())


class SegFCN(nn.Module):
    """Stem 16/2 (32x32) | 24/2 (16) | 48/2 (8) | 64 (8) -> 1x1 scores, x2 + skip scores from 16x16, upsample."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem(16)
        self.layer1 = BasicBlock(16, 24, 2)
        self.layer2 = BasicBlock(24, 48, 2)
        self.layer3 = BasicBlock(48, 64)
        self.score8 = nn.Conv2d(64, NUM_CLASSES, 1)
        self.score4 = nn.Conv2d(24, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits at the input's resolution."""
        f4 = self.layer1(self.stem(x))
        f8 = self.layer3(self.layer2(f4))
        s = F.interpolate(self.score8(f8), size=f4.shape[-2:], mode="bilinear", align_corners=False)
        s = s + self.score4(f4)
        return F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """1x1 conv, dilated 3x3 convs, and image pooling, each Conv-BN-ReLU; concat; 1x1 projection."""

    def __init__(self, cin: int, c: int, dilations: tuple[int, ...] = (2, 4, 6)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Sequential(conv_bn(cin, c, 1), nn.ReLU())]
            + [nn.Sequential(conv_bn(cin, c, 3, 1, d), nn.ReLU()) for d in dilations]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn(cin, c, 1), nn.ReLU())
        self.project = nn.Sequential(conv_bn(c * (len(dilations) + 2), c * 2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ASPP features at the input's resolution."""
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class SegDeepLab(nn.Module):
    """Stem 16/2 (32x32) | 24/2 (16) | 48/2 (8) | 64 dilated 2 (8) -> ASPP (8x8) -> classifier, upsample."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem(16)
        self.layer1 = BasicBlock(16, 24, 2)
        self.layer2 = BasicBlock(24, 48, 2)
        self.layer3 = BasicBlock(48, 64, 1, 2)
        self.aspp = ASPP(64, 32, (2, 3, 4))
        self.classifier = nn.Conv2d(64, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits at the input's resolution."""
        f = self.layer3(self.layer2(self.layer1(self.stem(x))))
        s = self.classifier(self.aspp(f))
        return F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)


ARCHS = {"fcn": SegFCN, "deeplab": SegDeepLab}


def confusion(pred: np.ndarray, gt: np.ndarray, k: int = NUM_CLASSES) -> np.ndarray:
    """[k, k] confusion matrix (rows ground truth, columns prediction)."""
    return np.bincount(gt.ravel() * k + pred.ravel(), minlength=k * k).reshape(k, k)


def miou(cm: np.ndarray) -> float:
    """Mean IoU over classes present in the ground truth or the prediction."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    return float((tp[union > 0] / union[union > 0]).mean())


def onnx_miou(path: Path, x: np.ndarray, mask: np.ndarray, batch: int = 100) -> float:
    """mIoU of an ONNX model's argmax over ``logits`` (onnxruntime, 2 threads)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for i in range(0, len(x), batch):
        logits = sess.run(["logits"], {"input": x[i : i + batch]})[0]
        cm += confusion(logits.argmax(1), mask[i : i + batch])
    return miou(cm)


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, lr: float) -> None:
    """AdamW with a one-cycle schedule, batch 32, random horizontal flips, per-pixel cross entropy."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    bs = 32
    per_epoch = len(xt) // bs
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
    net.train()
    for ep in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            xb, yb = xt[idx], yt[idx].long()
            flip = torch.rand(bs, generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            yb = torch.where(flip[:, None, None], yb.flip(2), yb)
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        print(f"  epoch {ep + 1}/{epochs}: loss {total / per_epoch:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    net.eval()


def export_onnx(model: nn.Module, path: Path) -> None:
    """Legacy exporter, opset 17, dynamic batch; BatchNorm left for the compiler to fold."""
    torch.onnx.export(
        model, (torch.zeros(1, 1, SIZE, SIZE),), str(path), dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def snn_check(path: Path, calib: Path, x: np.ndarray, mask: np.ndarray, Ts: list[int]) -> None:
    """Compile ``path`` with the default options and print ANN and SNN mIoU by T (default readout)."""
    import ann2snn
    from ann2snn.runtime import SpikingSession

    start = time.perf_counter()
    session = SpikingSession(ann2snn.compile(path, calib), threads=1)
    print(f"{path.name}: compiled in {time.perf_counter() - start:.0f} s, readout t0 = {session.t0}", flush=True)
    print(f"  ANN mIoU on {len(x)} test scenes: {onnx_miou(path, x, mask):.4f}", flush=True)
    ann = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cms = {T: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64) for T in Ts}
    err = dict.fromkeys(Ts, 0.0)
    for i in range(0, len(x), 25):
        ref = ann.run(["logits"], {"input": x[i : i + 25]})[0]
        out = session.run_many(x[i : i + 25], Ts)
        for T in Ts:
            cms[T] += confusion(out[T]["logits"].argmax(1), mask[i : i + 25])
            err[T] += float(np.abs(out[T]["logits"] - ref).sum()) / ref[0].size / len(x)
    print("  SNN mIoU: " + ", ".join(f"T={T} {miou(cms[T]):.4f}" for T in Ts), flush=True)
    print("  mean |SNN - ANN| logit: " + ", ".join(f"T={T} {err[T]:.4f}" for T in Ts), flush=True)


def main() -> None:
    """Generate training scenes, train the requested networks, export, report test mIoU."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["fcn", "deeplab", "both"], default="both")
    p.add_argument("--out-dir", type=Path, default=here)
    p.add_argument("--train-scenes", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snn-check", type=int, default=0, metavar="N",
                   help="do not train: compile the existing models and print SNN mIoU by T on N test scenes")
    p.add_argument("--T", default="16,32,64,128,256", help="timesteps for --snn-check")
    args = p.parse_args()
    archs = ["fcn", "deeplab"] if args.arch == "both" else [args.arch]
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    if args.snn_check:
        with np.load(here / "data" / "scenes_test.npz") as z:
            x_test, m_test = z["input"][: args.snn_check], z["mask"][: args.snn_check]
        for arch in archs:
            snn_check(args.out_dir / f"seg_{arch}.onnx", here / "data" / "scenes_calib.npz", x_test, m_test,
                      [int(t) for t in args.T.split(",")])
        return
    start = time.perf_counter()
    d = make_scenes(args.train_scenes, seed=args.seed, split="train")
    x, y = d["input"], d["mask"].astype(np.uint8)
    print(f"{len(x)} training scenes generated in {time.perf_counter() - start:.0f} s", flush=True)
    with np.load(here / "data" / "scenes_test.npz") as z:
        x_test, m_test = z["input"], z["mask"]

    for arch in archs:
        torch.manual_seed(args.seed)
        net = ARCHS[arch]()
        n_params = sum(p.numel() for p in net.parameters())
        print(f"{arch}: {n_params:,} parameters", flush=True)
        start = time.perf_counter()
        train(net, x, y, args.epochs, args.seed, args.lr)
        elapsed = time.perf_counter() - start
        path = args.out_dir / f"seg_{arch}.onnx"
        export_onnx(net, path)
        score = onnx_miou(path, x_test, m_test)
        print(f"{path.name}: trained in {elapsed:.0f} s, {path.stat().st_size:,} bytes, "
              f"ANN mIoU on scenes_test {score:.4f}", flush=True)


if __name__ == "__main__":
    main()
