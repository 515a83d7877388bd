"""Issue 23 on the real pretrained exports of shared/REAL_MODELS.md (paddle2onnx PP-OCR, a YOLO
from ddddocr), read from the cache that models/fetch_real_models.py fills; skipped without it.

What landed before the exporter matrix is checked here on the files users have: an empty
initializer (paddle2onnx's Resize roi), symbolic H x W taking the calibration data's size, and
the written-out activations each exporter uses, recognised as one op each."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest

import ann2snn
from ann2snn.analysis.inspection import inspect_model
from ann2snn.runtime import SpikingSession
from conftest import MODELS, run_ort

_spec = importlib.util.spec_from_file_location("fetch_real_models", MODELS / "fetch_real_models.py")
fetch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch)


def _model(name: str) -> onnx.ModelProto:
    path = fetch.cached(name)
    if path is None:
        pytest.skip(f"{name} is not in the cache: python models/fetch_real_models.py")
    return onnx.load(str(path))


def _images(n: int, h: int, w: int) -> np.ndarray:
    """Inputs in the PP-OCR range (images in [0, 1] normalised with mean 0.5, std 0.5)."""
    return ((np.random.default_rng(0).uniform(size=(n, 3, h, w)) - 0.5) / 0.5).astype(np.float32)


def _recognised(info: dict, op: str) -> int:
    return sum(r["detail"].split(";")[0].endswith(f"recognised as {op}") for r in info["nodes"])


def test_ppocr_classifier_hardswish_and_symbolic_sizes() -> None:
    """paddle2onnx, opset 11, [-1, 3, ?, ?]: compiles for the data's size; its 18 HardSwish
    written as Clip/Div/Mul are one op each (a function: opset 13 has no HardSwish), and the SNN
    agrees with the ANN."""
    model = _model("ppocr_cls")
    x = _images(8, 48, 192)
    snn = ann2snn.compile(model, {"x": x})
    info = inspect_model(model, compiled=snn)
    assert _recognised(info, "ann2snn.activations::HardSwish") == 18
    assert info["macs"]["total"] > 0 and not info["problems"]
    ref = run_ort(model, {"x": x})[0]
    session = SpikingSession(snn)
    out = {T: session.run({"x": x}, T)[model.graph.output[0].name] for T in (8, 128)}
    err = {T: float(np.abs(y - ref).mean()) for T, y in out.items()}
    assert err[128] < err[8] and err[128] < 0.02, err  # noise images: low margins, so error, not top-1
    assert (out[128].argmax(1) == ref.argmax(1)).mean() >= 7 / 8


def test_ppocr_detector_empty_initializer_compiles() -> None:
    """The DB detector holds empty constants (Resize's roi; the issue's 'helper.constant.40'
    refusal), here also as empty initializers once loaded and folded."""
    model = _model("ppocr_det")
    assert any(n.op_type == "Constant" and 0 in n.attribute[0].t.dims for n in model.graph.node)
    snn = ann2snn.compile(model, {model.graph.input[0].name: _images(4, 64, 64)}, iters=3, batch=4)
    info = inspect_model(model, compiled=snn)
    assert _recognised(info, "ann2snn.activations::HardSwish") == 24
    assert info["macs"]["total"] > 0 and not info["problems"]


def test_ppocr_recogniser_layer_norm_and_silu_written_out() -> None:
    """The SVTR recogniser writes LayerNorm out (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add)
    and Swish as x*Sigmoid(x); with the input size given, inspect counts its MACs."""
    model = _model("ppocr_rec")
    info = inspect_model(model, input_shapes={"x": [1, 3, 48, 320]})
    assert _recognised(info, "ann2snn.activations::LayerNormalization") == 5
    assert _recognised(info, "ann2snn.activations::SiLU") == 7
    assert info["macs"]["total"] > 0
    tail = [r for r in info["nodes"] if r["detail"].startswith("ends the spiking part")
            or "; ends the spiking part" in r["detail"]]
    assert tail, "inspect says where and why the spiking part ends"


def test_yolo_silu_written_as_sigmoid_mul() -> None:
    """ddddocr's YOLO: 74 SiLU written as Sigmoid * Mul, each recognised as one op."""
    info = inspect_model(_model("yolo_det"))
    assert _recognised(info, "ann2snn.activations::SiLU") == 74
