"""The ViT reference model (models/build_vit.py, issue 16), both torch exporters.

Today a ViT has no ReLU, so no neuron forms: every op is in the time-constant prefix, with the
defaults and with ``--nonlinear compensate`` alike, and the compiled model must reproduce its ANN
exactly at every T (the defect issue 16 asked to fix first). When signed neuron sites for GELU
land, this file is where the ViT's spiking structure gets pinned.
"""
from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

import ann2snn
from ann2snn.analysis.inspection import inspect_model
from ann2snn.runtime import SpikingSession
from ann2snn.runtime.reference import model_metadata
from conftest import MODELS

FILES = ["fashion_vit.onnx", "fashion_vit_dynamo.onnx"]


def _data(n: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / "data" / "fashion_test.npz") as z:
        return z["input"][:n], z["label"][:n]


@pytest.mark.parametrize("name", FILES)
def test_vit_has_the_transformer_ops(name: str) -> None:
    """Patch Conv, >= 4 LayerNorms per block stack, Softmax, MatMuls of two activations, GELU (Erf or Gelu)."""
    import onnx

    model = onnx.load(str(MODELS / name))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 1 and ops.count("Softmax") == 4
    assert ops.count("LayerNormalization") == 9  # 2 per block + the final one
    assert "Erf" in ops or "Gelu" in ops
    assert len(model.SerializeToString()) < 1_000_000


@pytest.mark.parametrize("nonlinear", ["analog", "compensate"])
@pytest.mark.parametrize("name", FILES)
def test_vit_without_neurons_equals_its_ann(name: str, nonlinear: str) -> None:
    """No ReLU, so no neuron and nothing compensated: inspect marks every op prefix or folded,
    and the SNN's logits equal the ANN's at T = 1 and 16 (no division by T, no garbage)."""
    path = MODELS / name
    info = inspect_model(path, ann2snn.CompileConfig(nonlinear=nonlinear))
    assert {r["role"] for r in info["nodes"]} <= {"prefix", "folded"}
    assert info["macs"]["spiking"] == 0 and info["macs"]["prefix"] == info["macs"]["total"]
    x, labels = _data(64)
    with np.load(MODELS / "data" / "fashion_calib.npz") as z:
        calib = z["input"][:100]
    logging.getLogger("ann2snn").setLevel(logging.ERROR)
    try:
        snn = ann2snn.compile(path, calib, nonlinear=nonlinear)
    finally:
        logging.getLogger("ann2snn").setLevel(logging.NOTSET)
    meta = model_metadata(snn)
    assert meta["neurons"] == [] and not meta["compensated"]
    ann = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert (ann.argmax(1) == labels).mean() > 0.7
    session = SpikingSession(snn)
    for T in (1, 16):
        np.testing.assert_allclose(session.run({"input": x}, T=T)["logits"], ann, rtol=1e-5, atol=1e-5)
