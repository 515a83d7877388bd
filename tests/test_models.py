"""End to end on the committed reference models (see models/README.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import ann2snn
from ann2snn.analysis.evaluate import evaluate
from ann2snn.runtime import SpikingSession
from conftest import MODELS, digits_path


@pytest.fixture(scope="module")
def digits_test() -> dict[str, np.ndarray]:
    with np.load(MODELS / "data" / "digits_test.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", ["digits_cnn.onnx", "digits_cnn_opset11.onnx", "digits_cnn_dynamo.onnx"])
def test_digits_exports_convert(name: str, digits_test) -> None:
    """Legacy export with BatchNorm and a Shape->Reshape chain, opset 11, and dynamo with external weights."""
    path = digits_path(name)
    snn = ann2snn.compile(path, MODELS / "data" / "digits_calib.npz", iters=100, batch=32)
    kinds = [n.op_type for n in snn.graph.node]
    assert kinds.count("IFNeuron") == 3
    assert not {"BatchNormalization", "Shape", "Gather", "Concat"} & set(kinds)
    res = evaluate(path, SpikingSession(snn), digits_test, [8, 32, 128], batch_size=600)
    acc = {r["T"]: r["accuracy"] for r in res["snn"]}
    assert res["ann_accuracy"] > 0.97
    assert acc[32] >= res["ann_accuracy"] - 0.02, res
    assert acc[128] >= res["ann_accuracy"] - 0.01, res
    err = [r["relative_error"] for r in res["snn"]]
    assert err[2] < err[0], res


def test_dynamic_batch_survives(digits_test) -> None:
    snn = ann2snn.compile(digits_path(), MODELS / "data" / "digits_calib.npz", iters=20, batch=32)
    session = SpikingSession(snn)
    for n in (1, 7):
        out = session.run({"input": digits_test["input"][:n]}, 8)
        assert out["logits"].shape == (n, 10)


def test_mnist_cnn_accuracy_targets() -> None:
    """Issue 2's targets on the full 10,000-image MNIST test set: >= 98.8% at T=16, >= 99.0% at T=32."""
    ann = MODELS / "mnist_cnn.onnx"
    snn = ann2snn.compile(ann, MODELS / "data" / "mnist_calib.npz")
    res = evaluate(ann, SpikingSession(snn), MODELS / "data" / "mnist_test.npz", [16, 32], batch_size=1000)
    acc = {r["T"]: r["accuracy"] for r in res["snn"]}
    assert abs(res["ann_accuracy"] - 0.9905) < 1e-9
    assert acc[16] >= 0.988, res
    assert acc[32] >= 0.990, res


def test_mnist_outputs_converge_with_T() -> None:
    ann = MODELS / "mnist_cnn.onnx"
    with np.load(MODELS / "data" / "mnist_test.npz") as z:
        data = {"input": z["input"][:300], "label": z["label"][:300]}
    snn = ann2snn.compile(ann, MODELS / "data" / "mnist_calib.npz")
    res = evaluate(ann, SpikingSession(snn), data, [8, 32, 128, 256], batch_size=300)
    err = [r["relative_error"] for r in res["snn"]]
    assert err[0] > err[1] > err[2] > err[3], res
    assert err[3] < err[0] / 2, res


def test_sklearn_mlp_keeps_its_zipmap_tail() -> None:
    """skl2onnx's MLPClassifier export: MatMul/Add/Relu spike; Softmax, ArgMax, ZipMap stay in the tail."""
    ann = digits_path("sklearn_mlp.onnx")
    snn = ann2snn.compile(ann, MODELS / "data" / "sklearn_calib.npz")
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    tail_ops = {f.name: [n.op_type for n in f.node] for f in snn.functions}["AnalogTail"]
    assert {"Softmax", "ArgMax", "ZipMap"} <= set(tail_ops)
    assert meta["outputs"] == ["output_label", "output_probability"]
    assert sum(n.op_type == "IFNeuron" for n in snn.graph.node) == 2
    session = SpikingSession(snn)
    with np.load(MODELS / "data" / "sklearn_test.npz") as z:
        data = {k: z[k] for k in z.files}
    out = session.run({"X": data["X"][:3]}, 32)
    assert isinstance(out["output_probability"], list) and set(out["output_probability"][0]) == set(range(10))
    res = evaluate(ann, session, data, [16, 256], batch_size=600)
    assert res["ann_accuracy"] > 0.97
    agree = {r["T"]: r["agreement"] for r in res["snn"]}
    assert agree[256] >= 0.99 and agree[256] >= agree[16], res


def test_keras_tf2onnx_nhwc_export_converts() -> None:
    """Keras (channels-last) through tf2onnx: Transpose chains around the convolutions."""
    ann = digits_path("keras_cnn.onnx")
    snn = ann2snn.compile(ann, MODELS / "data" / "keras_calib.npz")
    assert sum(n.op_type == "IFNeuron" for n in snn.graph.node) == 3
    assert not [n.name for n in snn.graph.node if n.name.endswith("/scale")]  # θ folded through Transpose/Reshape
    res = evaluate(ann, SpikingSession(snn), MODELS / "data" / "keras_test.npz", [16, 64], batch_size=600)
    acc = {r["T"]: r["accuracy"] for r in res["snn"]}
    assert res["ann_accuracy"] > 0.98 and acc[64] >= res["ann_accuracy"] - 0.005, res
