"""The issue-3 reference models: Fashion-MNIST VGG and ResNet (committed), MobileNetV2 (built
on demand by models/build_mobilenet.py, skipped when absent)."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

import ann2snn
from ann2snn.analysis.evaluate import evaluate
from ann2snn.runtime import SpikingSession
from conftest import MODELS

FASHION = ["fashion_vgg.onnx", "fashion_resnet.onnx"]
DATA = MODELS / "data"


def _fashion_subset(n: int) -> dict[str, np.ndarray]:
    with np.load(DATA / "fashion_test.npz") as z:
        return {"input": z["input"][:n], "label": z["label"][:n]}


def _row_hashes(x: np.ndarray) -> set[str]:
    return {hashlib.sha1(row.tobytes()).hexdigest() for row in x.reshape(len(x), -1)}


def test_fashion_data_files() -> None:
    """Full 10,000-image test set in [0, 1]; calibration images are not test images."""
    with np.load(DATA / "fashion_test.npz") as z:
        x, y = z["input"], z["label"]
    with np.load(DATA / "fashion_calib.npz") as z:
        c = z["input"]
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    assert c.shape == (1000, 1, 28, 28) and c.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))
    assert not _row_hashes(c) & _row_hashes(x)


@pytest.mark.parametrize("name", FASHION)
def test_fashion_models_shape_and_ann_accuracy(name: str) -> None:
    model = onnx.load(str(MODELS / name))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 28, 28]
    assert model.graph.output[0].name == "logits"
    data = _fashion_subset(1000)
    res = evaluate(MODELS / name, SpikingSession(ann2snn.compile(MODELS / name, DATA / "fashion_calib.npz",
                                                                      iters=20, batch=32)),
                        {"input": data["input"][:200], "label": data["label"][:200]}, [32], batch_size=200)
    assert res["ann_accuracy"] > 0.85
    # K=20 keeps this test fast; it is far from the K=200 default (the ResNet agrees on
    # ~82% of these images at T=32 with K=20; the benchmarks give the real figures).
    assert res["snn"][0]["agreement"] > 0.75, res


def test_fashion_resnet_structure_compiles() -> None:
    """Residual adds, the 1x1 downsampling shortcut and GlobalAveragePool all stay in the spiking part."""
    snn = ann2snn.compile(MODELS / "fashion_resnet.onnx", DATA / "fashion_calib.npz", iters=10, batch=32)
    kinds = [n.op_type for n in snn.graph.node]
    assert kinds.count("IFNeuron") == 7  # stem + 2 per block x 3 blocks
    assert "BatchNormalization" not in kinds
    assert kinds.count("Add") >= 3


@pytest.mark.slow
@pytest.mark.parametrize("name", FASHION)
def test_fashion_targets_full_test_set(name: str) -> None:
    """Issue 3's targets with the defaults: >= 99% of the ANN at T=32, within 0.3 points at T=64."""
    ann = MODELS / name
    snn = ann2snn.compile(ann, DATA / "fashion_calib.npz")
    res = evaluate(ann, SpikingSession(snn), DATA / "fashion_test.npz", [32, 64], batch_size=1000)
    acc = {r["T"]: r["accuracy"] for r in res["snn"]}
    assert acc[32] >= 0.99 * res["ann_accuracy"], res
    assert acc[64] >= res["ann_accuracy"] - 0.003, res


@pytest.mark.slow
def test_mnist_target_T16() -> None:
    """Issue 3: the ccexam MNIST CNN reaches >= 99.0% at T=16 on the full test set."""
    ann = MODELS / "mnist_cnn.onnx"
    res = evaluate(ann, SpikingSession(ann2snn.compile(ann, DATA / "mnist_calib.npz")),
                   DATA / "mnist_test.npz", [16], batch_size=1000)
    assert res["snn"][0]["accuracy"] >= 0.990, res


@pytest.mark.slow
def test_mobilenet_v2_converts() -> None:
    """Depthwise convolutions, ReLU6 and residual adds: compiles to 35 neuron layers with the
    ReLU6 caps kept, and the output error falls with T. (With IF neurons agreement with the ANN
    comes slowly: benchmarks/results/mobilenet_study.md; see the signed-burst test below.)"""
    path = MODELS / "mobilenet_v2.onnx"
    if not path.exists() or not (DATA / "photos_eval.npz").exists():
        pytest.skip("run models/build_mobilenet.py first")
    # 10 iterations leave the thresholds so low that the SNN settles on a heavily clipped
    # network (error 1.00 at T=32, 1.04 at T=128, measured); 40 batches of 8 converge
    snn = ann2snn.compile(path, DATA / "photos_calib.npz", iters=40, batch=8)
    kinds = [n.op_type for n in snn.graph.node]
    assert kinds.count("IFNeuron") == 35 and "Clip" not in kinds
    with np.load(DATA / "photos_eval.npz") as z:
        x = z["input"][:4]
    res = evaluate(path, SpikingSession(snn), {"input": x}, [16, 128], batch_size=4)
    errors = {r["T"]: r["relative_error"] for r in res["snn"]}
    assert errors[128] < errors[16], errors


@pytest.mark.slow
def test_mobilenet_v2_signed_bursts_agree_with_the_ann() -> None:
    """Issue 3's MobileNetV2 figure, in small: percentile thresholds with signed neurons and
    bursts of 2 agree with the ANN's top-1 on >= 13 of 16 crops spread over the photos at
    T = 128 (all 96 crops: 92.7%, README), and on more crops at T = 128 than at T = 32."""
    path = MODELS / "mobilenet_v2.onnx"
    if not path.exists() or not (DATA / "photos_eval.npz").exists():
        pytest.skip("run models/build_mobilenet.py first")
    with np.load(DATA / "photos_calib.npz") as z:
        calib = z["input"][:64]  # percentile norm keeps every pre-activation: 64 crops
    snn = ann2snn.compile(path, {"input": calib}, method="percentile", iters=4, batch=16, neuron="signed", burst=2)
    assert [n.op_type for n in snn.graph.node].count("SignedBurstIFNeuron") == 35
    with np.load(DATA / "photos_eval.npz") as z:
        x = z["input"][::6][:16]
    res = evaluate(path, SpikingSession(snn), {"input": x}, [32, 128], batch_size=16)
    agree = {r["T"]: r["agreement"] for r in res["snn"]}
    assert agree[128] >= 13 / 16 and agree[128] > agree[32], agree
