"""Regression tests for the unclean failures benchmarks/fuzz.py found (each now a clean error)."""
from __future__ import annotations

import onnx
import pytest

import ann2snn
from ann2snn.errors import ModelLoadError
from conftest import MODELS


def test_fuzz_seed1_case19_model_onnxruntime_rejects() -> None:
    """The checker accepts a bfloat16 ArrayFeatureExtractor input; onnxruntime does not."""
    model = onnx.load(MODELS / "sklearn_mlp.onnx")
    classes = next(i for i in model.graph.initializer if i.name == "classes")
    classes.data_type = onnx.TensorProto.BFLOAT16
    with pytest.raises(ModelLoadError, match="not a valid ONNX model|onnxruntime cannot load the model"):
        ann2snn.compile(model, MODELS / "data" / "sklearn_calib.npz")


def test_fuzz_seed1_case114_declared_shape_disagrees() -> None:
    """A graph output declared [N, 3] where the graph computes [N, 10]."""
    model = onnx.load(MODELS / "digits_cnn.onnx")
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 3
    with pytest.raises(ModelLoadError, match="is not a valid ONNX model.*re-export it"):
        ann2snn.compile(model, MODELS / "data" / "digits_calib.npz")


def test_fuzz_seed0_case449_tail_fails_at_run_time() -> None:
    """fc2's bias rewired to fc1's output: loads, but cannot run; found before calibrating."""
    model = onnx.load(MODELS / "digits_cnn.onnx")
    fc2 = next(n for n in model.graph.node if n.name == "/fc2/Gemm")
    fc2.input[2] = "/fc1/Gemm_output_0"
    with pytest.raises(ann2snn.Ann2SnnError, match="fails in onnxruntime on the calibration data.*fc2"):
        ann2snn.compile(model, MODELS / "data" / "digits_calib.npz")


def test_fuzz_seed0_case406_huge_fixed_batch() -> None:
    """A fixed batch of 10**6 is made symbolic without running anything at that size."""
    model = onnx.load(MODELS / "keras_cnn.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**6
    snn = ann2snn.compile(model, MODELS / "data" / "keras_calib.npz", iters=5)
    assert snn.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_calibration_memory_limit() -> None:
    with pytest.raises(ann2snn.ResourceError, match="calibrating with batches of 64 needs about.*--max-memory"):
        ann2snn.compile(MODELS / "digits_cnn.onnx", MODELS / "data" / "digits_calib.npz", max_memory=1e-6)


def test_fuzz_seed0_case1074_emitted_model_fails_the_checker() -> None:
    """skl2onnx's Softmax rewired to the first hidden layer: the tail's types no longer fit."""
    model = onnx.load(MODELS / "sklearn_mlp.onnx")
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.input[0] = "next_activations"
    with pytest.raises(ann2snn.Ann2SnnError):
        ann2snn.compile(model, MODELS / "data" / "sklearn_calib.npz", iters=4, batch=16)


def test_fuzz_seed1_case898_data_checked_before_any_work() -> None:
    """Keras input declared with 10**6 channels: the data mismatch is reported at once, not after
    minutes of folding huge shapes."""
    model = onnx.load(MODELS / "keras_cnn.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 10**6
    with pytest.raises(ann2snn.DataError, match=r"axis 3: 1 != 1000000"):
        ann2snn.compile(model, MODELS / "data" / "keras_calib.npz")
