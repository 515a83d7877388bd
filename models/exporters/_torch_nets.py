"""The four reference networks of the exporter matrix, in torch (run as scripts: imported as
``_torch_nets``). Every other toolchain's build script rebuilds the same architectures and loads
the weights trained here (``data/weights.npz``), so that every cell of a row computes the same
function.

- ``cnn``: Conv-BN-ReLU, Conv-BN-ReLU, MaxPool, Flatten, Linear-ReLU, Linear. Images [N, 1, 8, 8].
- ``mbv3``: a MobileNetV3-style block: Conv-BN-ReLU stem, depthwise Conv-BN-HardSwish, a
  squeeze-excitation gate (GAP, Linear-ReLU, Linear-HardSigmoid, Mul), 1x1 projection with BN,
  GAP, Linear. Images [N, 1, 8, 8].
- ``transformer``: the 8 image rows as 8 tokens of 8 pixels [N, 8, 8]: Linear-ReLU token
  embedding, Linear, + position embedding, one pre-LN encoder block (LayerNorm, two-head
  softmax attention, LayerNorm, GELU MLP), mean over tokens, Linear.
- ``embedding``: the 64 pixel values as integer tokens 0..16 [N, 64] (int64): Embedding(17, 4),
  Flatten, Linear-ReLU, Linear-ReLU, Linear.
"""
from __future__ import annotations

import math

import torch
from torch import nn

NETS = ("cnn", "mbv3", "transformer", "embedding")


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class MBV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn1 = nn.BatchNorm2d(16)
        self.se1 = nn.Linear(16, 8)
        self.se2 = nn.Linear(8, 16)
        self.proj = nn.Conv2d(16, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = nn.functional.hardswish(self.bn1(self.dw(x)))
        s = x.mean((2, 3))
        s = nn.functional.hardsigmoid(self.se2(torch.relu(self.se1(s))))
        x = x * s[:, :, None, None]
        x = self.bn2(self.proj(x))
        return self.fc(x.mean((2, 3)))


class Transformer(nn.Module):
    def __init__(self, d: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.d, self.heads = d, heads
        self.embed = nn.Linear(8, d)
        self.mix = nn.Linear(d, d)
        self.pos = nn.Parameter(torch.zeros(8, d))
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp1 = nn.Linear(d, 2 * d)
        self.mlp2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.mix(torch.relu(self.embed(x))) + self.pos
        q, k, v = self.qkv(self.ln1(h)).split(self.d, dim=-1)
        dh = self.d // self.heads
        q = q.reshape(n, 8, self.heads, dh).transpose(1, 2)
        k = k.reshape(n, 8, self.heads, dh).transpose(1, 2)
        v = v.reshape(n, 8, self.heads, dh).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(dh), dim=-1)
        h = h + self.out((a @ v).transpose(1, 2).reshape(n, 8, self.d))
        h = h + self.mlp2(nn.functional.gelu(self.mlp1(self.ln2(h))))
        return self.head(h.mean(1))


class Embedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(17, 4)
        self.fc1 = nn.Linear(64 * 4, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.embed(tokens), 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make(name: str) -> nn.Module:
    """A fresh network by name."""
    return {"cnn": CNN, "mbv3": MBV3, "transformer": Transformer, "embedding": Embedding}[name]()


def example(name: str, batch: int = 2) -> torch.Tensor:
    """An input of the right shape and type for tracing."""
    if name == "embedding":
        return torch.zeros(batch, 64, dtype=torch.int64)
    if name == "transformer":
        return torch.zeros(batch, 8, 8)
    return torch.zeros(batch, 1, 8, 8)


def as_input(name: str, images: "torch.Tensor") -> torch.Tensor:
    """The network's input for digits images [N, 1, 8, 8] in [0, 1]."""
    if name == "embedding":
        return torch.round(images * 16).to(torch.int64).reshape(len(images), 64)
    if name == "transformer":
        return images.reshape(len(images), 8, 8)
    return images


def load(name: str, weights: dict) -> nn.Module:
    """The network ``name`` with the trained weights (keys ``name/param``) loaded, in eval mode."""
    net = make(name)
    prefix = f"{name}/"
    missing, unexpected = net.load_state_dict(
        {k[len(prefix):]: torch.from_numpy(v) for k, v in weights.items() if k.startswith(prefix)}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return net.eval()
