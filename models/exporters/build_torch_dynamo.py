"""Export the four reference networks with torch's dynamo exporter (``dynamo=True``, needs
onnxscript), opset 18, weights inside the file (``external_data=False``), dynamic batch:
``torch_dynamo_<net>.onnx``.

Toolchain: torch 2.13.0+cpu, onnxscript 0.7.2 (see README.md). Run after build_torch_legacy.py:
``/work/exporters-venv/bin/python models/exporters/build_torch_dynamo.py``
"""
from __future__ import annotations

import onnxscript
import torch

import _torch_nets as nets
from _export_check import HERE, NETS, check, weights


def main() -> None:
    print("torch", torch.__version__, "onnxscript", onnxscript.__version__)
    for name in NETS:
        net = nets.load(name, {f"{name}/{k}": v for k, v in weights(name).items()})
        path = HERE / f"torch_dynamo_{name}.onnx"
        batch = torch.export.Dim("batch", min=1, max=4096)
        prog = torch.onnx.export(net, (nets.example(name, 4),), dynamo=True, opset_version=18,
                                 input_names=["input"], output_names=["logits"],
                                 dynamic_shapes=({0: batch},), external_data=False)
        prog.save(str(path), external_data=False)
        check(path, name)


if __name__ == "__main__":
    main()
