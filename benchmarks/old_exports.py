"""Old exports (issue 15): how close each zoo-style family's SNN comes to its ANN, by T.

For each model in ``models/old_exports/`` (IR 3, opset 9, initializers listed as inputs,
batch 1 baked in; built by ``models/build_old_exports.py``): compile with the default options
(LTB), with ``--method max``, and with max-norm on calibration data that include the test
images (so no threshold clips a test activation: what remains is the conversion's own
error), run the 16 held-out images of ``test.npz`` as one batch, and
report the relative output error ``||snn - ann|| / ||ann||``, the top-1 agreement with the
ANN, and the share of MACs that take spikes as input. Writes
``benchmarks/results/old_exports.md``.

Run: ``python benchmarks/old_exports.py`` (about two minutes on 2 cores).
"""
from __future__ import annotations

import logging
import sys

import numpy as np
import onnxruntime as ort
from common import ROOT, T_header, command_line, md_row

import ann2snn
from ann2snn.analysis.inspection import inspect_model
from ann2snn.runtime import SpikingSession

OLD = ROOT / "models" / "old_exports"
FAMILIES = ("squeezenet", "shufflenet", "inception", "densenet", "alexnet", "googlenet")
TS = (8, 32, 128, 512, 2048)
#: (label, method, whether the test images join the calibration data): the last shows the
#: conversion itself is exact once no threshold clips a test activation
METHODS = (("ltb", "ltb", False), ("max", "max", False), ("max, test in calib", "max", True))


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    x = np.load(OLD / "test.npz")["input"]
    calib = np.load(OLD / "calib.npz")["input"]
    lines = [f"`{command_line()}`", "", "Relative output error of the SNN against the ANN (16 held-out images, one "
             "batch), by T; top-1 agreement with the ANN at the largest T; share of MACs on spikes.", ""]
    lines += T_header(["model", "method"], TS, ["agreement", "spiking MACs"])
    for name in FAMILIES:
        path = OLD / f"{name}.onnx"
        ann = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ref = np.concatenate([ann.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
        macs = inspect_model(path)["macs"]
        for label, method, with_test in METHODS:
            data = np.concatenate([calib, x]) if with_test else calib
            snn = ann2snn.compile(path, {"input": data}, method=method)
            runs = SpikingSession(snn).run_many({"input": x}, TS)
            errs = [float(np.linalg.norm(runs[T]["logits"] - ref) / np.linalg.norm(ref)) for T in TS]
            agree = float((runs[TS[-1]]["logits"].argmax(1) == ref.argmax(1)).mean())
            lines.append(md_row([name, label, *(f"{e:.3f}" for e in errs), f"{agree:.0%}",
                                 f"{macs['spiking'] / macs['total']:.0%}"]))
            print(lines[-1], file=sys.stderr)
    out = ROOT / "benchmarks" / "results" / "old_exports.md"
    out.write_text("\n".join(lines) + "\n")
    print(out)


if __name__ == "__main__":
    main()
