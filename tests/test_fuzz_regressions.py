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
