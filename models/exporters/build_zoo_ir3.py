"""Old model-zoo-style exports of the four reference networks, as the Caffe2-era conversions
look: torch's TorchScript exporter at opset 9 with ``keep_initializers_as_inputs=True`` (every
weight is also a graph input), the batch fixed to 1 (baked into the Reshape shapes), and the
file's ``ir_version`` set to 3: ``zoo_ir3_<net>.onnx``.

Toolchain: torch 2.13.0+cpu (see README.md). Run after build_torch_legacy.py:
``/work/exporters-venv/bin/python models/exporters/build_zoo_ir3.py``
"""
from __future__ import annotations

import onnx
import torch

import _torch_nets as nets
from _export_check import HERE, NETS, check, weights


def main() -> None:
    print("torch", torch.__version__)
    for name in NETS:
        net = nets.load(name, {f"{name}/{k}": v for k, v in weights(name).items()})
        path = HERE / f"zoo_ir3_{name}.onnx"
        torch.onnx.export(net, (nets.example(name, 1),), str(path), dynamo=False, opset_version=9,
                          keep_initializers_as_inputs=True, input_names=["input"], output_names=["logits"],
                          do_constant_folding=True)
        model = onnx.load(str(path))
        model.ir_version = 3
        onnx.save(model, str(path))
        check(path, name)


if __name__ == "__main__":
    main()
