"""Export the four reference networks with torch's TorchScript-based exporter (``dynamo=False``),
opset 17, constant folding off (BatchNormalization nodes and Shape chains kept), dynamic batch:
``torch_legacy_<net>.onnx``. Also writes ``data/reference.npz``, the torch networks' logits on the test images that every build script checks its export against.

Toolchain: torch 2.13.0+cpu (see README.md). Run after train_reference.py:
``/work/exporters-venv/bin/python models/exporters/build_torch_legacy.py``
"""
from __future__ import annotations

import numpy as np
import torch

import _torch_nets as nets
from _export_check import HERE, NETS, check, images, net_input, weights


def main() -> None:
    print("torch", torch.__version__)
    refs = {}
    for name in NETS:
        net = nets.load(name, {f"{name}/{k}": v for k, v in weights(name).items()})
        with torch.no_grad():
            refs[name] = net(torch.from_numpy(net_input(name, images()))).numpy()
        path = HERE / f"torch_legacy_{name}.onnx"
        torch.onnx.export(net, (nets.example(name),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=False,  # keeps BatchNormalization and the Shape chains
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    np.savez_compressed(HERE / "data" / "reference.npz", **refs)
    for name in NETS:
        check(HERE / f"torch_legacy_{name}.onnx", name)


if __name__ == "__main__":
    main()
