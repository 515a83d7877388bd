"""Untrusted model files: every malformed model gets an Ann2SnnError naming the problem."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ann2snn
from ann2snn.errors import ModelLoadError
from conftest import MODELS

CALIB = {"x": np.ones((4, 4), np.float32)}
W = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")


def model(nodes, inits=(), opset: int = 17, width: int = 4) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def short_raw() -> TensorProto:
    t = TensorProto()
    t.CopyFrom(W)
    t.raw_data = b"\0" * 8
    return t


CASES = {
    "cycle": (model([helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                     helper.make_node("Identity", ["b"], ["y"])]), "topologically sorted"),
    "dangling input": (model([helper.make_node("MatMul", ["x", "nope"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]),
                       "input 'nope'"),
    "duplicate names": (model([helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Relu", ["a"], ["a"]),
                               helper.make_node("Relu", ["a"], ["y"])], [W]), "single static assignment"),
    "zero-sized tensor": (model([helper.make_node("MatMul", ["x", "W0"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
                                [numpy_helper.from_array(np.ones((4, 0), np.float32), "W0")], width=0),
                          "zero-sized shape"),
    "enormous declared tensor": (model([helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
                                       [TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[100000, 100000])]),
                                 "one and only one value field"),
    "data shorter than its shape": (model([helper.make_node("MatMul", ["x", "W"], ["a"]),
                                           helper.make_node("Relu", ["a"], ["y"])], [short_raw()]), "too small"),
    "opset too new": (model([helper.make_node("Relu", ["x"], ["y"])], opset=30), "newer than the newest"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_models_get_clean_errors(case: str) -> None:
    bad, pattern = CASES[case]
    with pytest.raises(ModelLoadError, match=pattern):
        ann2snn.compile(bad, CALIB)


@pytest.mark.parametrize("cut", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_files(tmp_path, cut: float) -> None:
    data = (MODELS / "digits_cnn.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ModelLoadError):
        ann2snn.compile(path, MODELS / "data" / "digits_calib.npz")


def test_random_bytes_and_huge_declared_length(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for i in range(20):
        path = tmp_path / f"r{i}.onnx"
        path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
        with pytest.raises(ModelLoadError):
            ann2snn.compile(path, CALIB)
    # field 7 (graph), length-delimited, declaring 2**31 bytes that are not there
    path = tmp_path / "huge.onnx"
    path.write_bytes(bytes([0x3A, 0x80, 0x80, 0x80, 0x80, 0x08]) + b"\0" * 16)
    with pytest.raises(ModelLoadError, match="is not an ONNX model"):
        ann2snn.compile(path, CALIB)
