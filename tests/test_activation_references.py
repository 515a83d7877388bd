"""The issue-16 reference CNNs from both torch exporters: the ConvNeXt-style GELU / LayerNorm
network (models/build_convnext.py) and the dynamo exports of the LeakyReLU, SiLU, HardSwish and
GELU networks (models/build_activations.py), compiled as benchmarks/signed_activations.py compiles
them (``--signed-sites output``, ``--nonlinear compensate`` where gates or LayerNorms need it).

Each compiles with neuron layers and no analog tail; the ConvNeXt's SNN agrees with its ANN on a
few test images at T = 64 (thresholds by max-norm here, which calibrates in about a second).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ann2snn
from ann2snn.analysis.inspection import inspect_model
from ann2snn.runtime import SpikingSession
from ann2snn.runtime.reference import model_metadata
from conftest import MODELS

CONVNEXT = ["fashion_convnext.onnx", "fashion_convnext_dynamo.onnx"]
DYNAMO = [f"fashion_{arch}_dynamo.onnx" for arch in ("lrelu", "silu", "hswish", "gelu")]


def _options(name: str) -> dict[str, Any]:
    """The benchmark's options: output-form signed sites, compensation for gates and LayerNorms."""
    gated = any(arch in name for arch in ("silu", "hswish", "convnext"))
    return {"signed_sites": "output", **({"nonlinear": "compensate"} if gated else {})}


def _compile(name: str, **extra: Any) -> onnx.ModelProto:
    with np.load(MODELS / "data" / "fashion_calib.npz") as z:
        calib = z["input"][:100]
    logging.getLogger("ann2snn").setLevel(logging.ERROR)
    try:
        return ann2snn.compile(MODELS / name, {"input": calib}, method="max", **_options(name), **extra)
    finally:
        logging.getLogger("ann2snn").setLevel(logging.NOTSET)


@pytest.mark.parametrize("name", CONVNEXT)
def test_convnext_has_the_convnext_ops(name: str) -> None:
    """Depthwise 7x7 convs, LayerNormalization (channels-last) and the decomposed channels-first
    LayerNorm (ReduceMean, Pow, Sqrt), erf GELU, one file under 1 MB."""
    model = onnx.load(str(MODELS / name))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LayerNormalization") == 6  # one per block (5) + the one before the head
    assert ops.count("Sqrt") == 3 and ops.count("Pow") == 3  # stem + 2 downsampling layers
    assert ops.count("Erf") == 5 and ops.count("Gemm") == 1
    depthwise = [n for n in model.graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(depthwise) == 5
    assert not model.graph.initializer or all(not t.external_data for t in model.graph.initializer)
    assert (MODELS / name).stat().st_size < 1_000_000


@pytest.mark.parametrize("name", CONVNEXT + DYNAMO)
def test_compiles_with_neurons_and_no_tail(name: str) -> None:
    """inspect and the compiled model agree: neuron layers, nothing in the analog tail."""
    info = inspect_model(MODELS / name, ann2snn.CompileConfig(**_options(name)))
    roles = {r["role"] for r in info["nodes"]}
    assert "neuron" in roles and not roles & {"tail", "unsupported"}
    assert info["macs"]["tail"] == 0 and info["macs"]["spiking"] > 0.5 * info["macs"]["total"]
    meta = model_metadata(_compile(name))
    assert len(meta["neurons"]) == info["neuron_layers"] > 0
    assert meta["tail"] is None
    if "convnext" in name or "silu" in name or "hswish" in name:
        assert meta["compensated"]


@pytest.mark.parametrize("name", CONVNEXT)
def test_convnext_snn_agrees_with_its_ann(name: str) -> None:
    """On 40 test images at T = 64 the SNN's top-1 matches the ANN's on at least 37 (measured:
    40 of 40 for both files) and its mean logit error stays under 0.08 of the ANN's mean |logit|
    (measured: 0.021 legacy, 0.016 dynamo)."""
    with np.load(MODELS / "data" / "fashion_test.npz") as z:
        x = z["input"][:40]
    ann = ort.InferenceSession(str(MODELS / name), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    out = SpikingSession(_compile(name)).run({"input": x}, T=64)["logits"]
    assert (out.argmax(1) == ann.argmax(1)).sum() >= 37
    assert np.abs(out - ann).mean() / np.abs(ann).mean() < 0.08
