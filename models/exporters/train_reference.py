"""Train the four reference networks of the exporter matrix (torch, CPU, about a minute) and
write the data every build script and test uses.

Writes ``data/weights.npz`` (every network's state dict, keys ``net/param``) and
``data/digits.npz``: scikit-learn's 8x8 digits scaled to [0, 1], ``calib`` (256 images) and
``test`` (300 images, ``label``), float32 [N, 1, 8, 8], disjoint from each other and from the
training images. The build scripts derive each network's input from these images (see
``_torch_nets.as_input`` and ``_data.py``).

Run: ``/work/exporters-venv/bin/python models/exporters/train_reference.py``
(torch 2.13.0+cpu, scikit-learn, numpy; see README.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from _torch_nets import NETS, as_input, make

HERE = Path(__file__).resolve().parent
N_CALIB, N_TEST = 256, 300


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    test, calib, train = perm[:N_TEST], perm[N_TEST:N_TEST + N_CALIB], perm[N_TEST + N_CALIB:]
    (HERE / "data").mkdir(exist_ok=True)
    np.savez_compressed(HERE / "data" / "digits.npz", calib=x[calib], test=x[test], label=y[test])
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    weights = {}
    for name in NETS:
        net = make(name)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for epoch in range(40):
            net.train()
            order = torch.randperm(len(xt))
            for i in range(0, len(xt), 64):
                idx = order[i:i + 64]
                loss = torch.nn.functional.cross_entropy(net(as_input(name, xt[idx])), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            acc = (net(as_input(name, torch.from_numpy(x[test]))).argmax(1).numpy() == y[test]).mean()
        print(f"{name}: test accuracy {acc * 100:.1f}%")
        weights.update({f"{name}/{k}": v.detach().numpy().copy() for k, v in net.state_dict().items()
                        if v.dtype.is_floating_point})
    np.savez_compressed(HERE / "data" / "weights.npz", **weights)


if __name__ == "__main__":
    main()
