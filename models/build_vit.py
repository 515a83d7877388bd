"""Train a small Vision Transformer on Fashion-MNIST and export it with both torch exporters.

The issue-16 reference transformer: a 7x7 patch-embedding Conv (16 tokens), a learned position
embedding, 4 pre-norm blocks (LayerNorm, softmax multi-head attention whose Q·Kᵀ and
attention·V are MatMuls of two activations, GELU MLP), a final LayerNorm, mean pooling over the
tokens and a Linear head. Raw pixels in [0, 1] are normalised inside the graph.

Outputs (in ``--out-dir``, default: the folder of this script):

* ``fashion_vit.onnx``: legacy exporter (``dynamo=False``), opset 17 (LayerNormalization op,
  GELU as Erf), dynamic batch.
* ``fashion_vit_dynamo.onnx``: dynamo exporter, opset 18, one file (no external data).
* ``fashion_vit.pt``: the state dict (benchmarks/vit.py hands it to SpikingJelly).

Data: the committed ``data/fashion_calib.npz`` / ``data/fashion_test.npz`` (models/build_fashion.py)
serve this model as they are. Training is short by design (``--minutes``, a wall-clock budget
checked after every batch; ``--train-size`` images), on 1 thread.

Run: ``/work/torch-venv/bin/python models/build_vit.py``
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from _common import accuracy, onnx_logits
from build_fashion import FASHION_MEAN, FASHION_STD, Normalised, export_dynamo, export_onnx, load_fashion
from scenes import FASHION_DIR
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention written out (no fused kernel), so that both exporters emit
    MatMul(Q, Kᵀ), Softmax and MatMul(attention, V)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads, self.scale = dim, heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, D] -> [N, L, D]."""
        # static slices and unflatten, no permute of the batch axis: SpikingJelly's FX step-mode
        # adapters trace this form (they refuse a permuted batch axis and dynamic indices)
        qkv, d, h = self.qkv(x), self.dim, self.heads
        q, k, v = (qkv[:, :, i * d:(i + 1) * d].unflatten(-1, (h, d // h)).transpose(1, 2) for i in range(3))
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN x), then x + MLP(LN x) with GELU."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, D] -> [N, L, D]."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class FashionViT(nn.Module):
    """Patch 7 (4x4 = 16 tokens), dim 48, 4 heads, MLP 96, 4 blocks, mean pooling, Linear(48, 10).
    Small on purpose: it trains to a useful accuracy in a few CPU minutes."""

    def __init__(self, dim: int = 48, depth: int = 4, heads: int = 4, hidden: int = 96, patch: int = 7) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (28 // patch) ** 2, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised images [N, 1, 28, 28]."""
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, minutes: float, seed: int) -> None:
    """AdamW, 2-pixel shifts, a cosine schedule over whichever ends first, ``epochs`` or the
    wall-clock budget (so the rate has annealed when the budget stops training; the weights then
    depend on the machine's speed, not only on the seed)."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy((x - FASHION_MEAN) / FASHION_STD), torch.from_numpy(y)
    bs = 128
    steps = epochs * (len(xt) // bs)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
    begin, budget = time.perf_counter(), 60 * minutes
    deadline = begin + budget

    def factor(s: int) -> float:
        done = min(1.0, max(s / steps, (time.perf_counter() - begin) / budget))
        return min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for ep in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(xt), generator=gen)
        total, done = 0.0, 0
        for i in range(len(xt) // bs):
            idx = perm[i * bs : (i + 1) * bs]
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            xb = torch.roll(xt[idx], shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            loss = loss_fn(net(xb), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total, done = total + float(loss.detach()), done + 1
            if time.perf_counter() > deadline:
                break
        print(f"  epoch {ep + 1}/{epochs}: loss {total / done:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if time.perf_counter() > deadline:
            print("  wall-clock budget reached", flush=True)
            break
    net.eval()


def main() -> None:
    """Train, export with both exporters, report ONNX accuracy on the full test set."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=here)
    p.add_argument("--data-dir", type=Path, default=FASHION_DIR)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--minutes", type=float, default=5.5, help="wall-clock training budget")
    p.add_argument("--from-pt", type=Path, default=None, help="export these weights (a state dict) without training")
    p.add_argument("--train-size", type=int, default=60000)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on the shared 2-core machine 2 threads were 30x slower than 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_fashion(args.data_dir)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    net = FashionViT()
    if args.from_pt:
        net.load_state_dict(torch.load(args.from_pt))
    else:
        print(f"training vit ({sum(p.numel() for p in net.parameters())} parameters)", flush=True)
        train(net, x_train, y_train, args.epochs, args.minutes, args.seed)
        torch.save(net.state_dict(), args.out_dir / "fashion_vit.pt")
    model = Normalised(net, FASHION_MEAN, FASHION_STD).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x_test[:256])).numpy()
    for name, export in (("fashion_vit.onnx", export_onnx), ("fashion_vit_dynamo.onnx", export_dynamo)):
        path = args.out_dir / name
        export(model, path)
        logits = onnx_logits(path, x_test)
        print(f"{name}: {path.stat().st_size} bytes; max |torch - ort| {np.abs(ref - logits[:256]).max():.2e}; "
              f"ANN accuracy, full test set: {accuracy(logits, y_test):.2f}%", flush=True)


if __name__ == "__main__":
    main()
