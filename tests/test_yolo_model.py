"""The LeakyReLU YOLO-style detector (models/build_yolo.py, issue 16), both torch exporters.

With the default compile (``--signed-sites auto``) every LeakyReLU becomes a signed neuron site,
the whole network spikes (only the first Conv, on the constant input, is analog prefix), and only
the post-processing appended after the heads (sigmoids, box decoding, NonMaxSuppression, the
gathers) is left as the analog tail. The SNN's mAP on a few test scenes is close to the ANN's.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ann2snn
from ann2snn.analysis.inspection import inspect_model
from ann2snn.analysis.metrics import detection_ap
from ann2snn.runtime import SpikingSession
from conftest import MODELS

FILES = ["det_yolo.onnx", "det_yolo_dynamo.onnx"]
BOUNDARY = ["pp/cls_all", "pp/ctr_all", "pp/reg_all"]
LEAKY_RELUS = 22  # CBL blocks: stem 1, stage2 3, stage3 5, stage4 3, neck 6, head towers 2 x 2 levels

pytestmark = pytest.mark.skipif(not all((MODELS / f).exists() for f in FILES), reason="models/det_yolo*.onnx not built")


@pytest.mark.parametrize("name", FILES)
def test_interface(name: str) -> None:
    """Input ``input`` [batch,1,64,64], one output ``detections`` [K,7], NMS in the graph, LeakyReLU
    activations, small and self-contained (no external data)."""
    path = MODELS / name
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == "input" and dims[1:] == [1, 64, 64] and isinstance(dims[0], str)
    assert [o.name for o in model.graph.output] == ["detections"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LeakyRelu") == LEAKY_RELUS and "Relu" not in ops and "NonMaxSuppression" in ops
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert path.stat().st_size < 1_000_000
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert opset == (17 if name == "det_yolo.onnx" else 18)


@pytest.mark.parametrize("name", FILES)
def test_inspect_leaky_relus_are_neurons_and_tail_is_postprocessing(name: str) -> None:
    """Default options: each LeakyReLU a signed neuron site, every Conv but the first on spikes,
    the tail only the appended post-processing, read out at the flattened head outputs."""
    info = inspect_model(MODELS / name)
    rows = [r for r in info["nodes"] if r["role"] != "folded"]
    leaky = [r for r in rows if r["op"] == "ai.onnx::LeakyRelu"]
    assert len(leaky) == LEAKY_RELUS and all(r["role"] == "neuron" for r in leaky)
    assert all("signed activation site" in r["detail"] for r in leaky)
    assert info["neuron_layers"] == LEAKY_RELUS
    convs = [r["role"] for r in rows if r["op"] == "ai.onnx::Conv"]
    assert convs.count("prefix") == 1 and convs.count("spiking") == len(convs) - 1
    tail = [r["node"] for r in rows if r["role"] == "tail"]
    assert tail and all(n.startswith("pp/") for n in tail)
    assert {"pp/NonMaxSuppression", "pp/Sigmoid_cls", "pp/Exp_reg"} <= set(tail)
    assert sorted(info["boundary"]) == BOUNDARY
    assert info["macs"]["tail"] == 0 and info["macs"]["spiking"] > 0.99 * info["macs"]["total"]


def _compile(name: str, n_calib: int, **options: object) -> SpikingSession:
    with np.load(MODELS / "data" / "scenes_calib.npz") as z:
        calib = z["input"][:n_calib]
    logging.getLogger("ann2snn").setLevel(logging.ERROR)
    try:
        snn = ann2snn.compile(MODELS / name, {"input": calib}, threads=1, **options)
    finally:
        logging.getLogger("ann2snn").setLevel(logging.NOTSET)
    return SpikingSession(snn, threads=1)


@pytest.mark.parametrize("name", FILES)
def test_compiles_with_defaults(name: str) -> None:
    """Default options (a short calibration): 22 symmetric signed neuron layers on the LeakyReLUs'
    outputs, each LeakyReLU kept as an expectation-compensated op on its current, and the tail
    holding NonMaxSuppression and nothing but the post-processing nodes."""
    session = _compile(name, 64, iters=5, batch=16)
    neurons = session.meta["neurons"]
    assert len(neurons) == LEAKY_RELUS
    assert {n["op"] for n in neurons} == {"UnitSymmetricTotalIFNeuron"} and {n["site"] for n in neurons} == {"output"}
    tail = session.meta["tail"]
    assert sorted(tail["inputs"]) == BOUNDARY and tail["outputs"] == ["detections"]
    assert "pp/NonMaxSuppression" in tail["nodes"] and all(n.startswith("pp/") for n in tail["nodes"])


def _map(dets: np.ndarray, scenes: dict[str, np.ndarray]) -> float:
    return detection_ap(dets, scenes["boxes"], scenes["box_labels"], scenes["box_image"])["map"]


@pytest.mark.parametrize("name", FILES)
def test_snn_map_close_to_ann(name: str) -> None:
    """SNN mAP@[.5:.95] at T = 64 on 24 test scenes within 10 % of the ANN's (measured: 50.9 against
    50.3 % on det_yolo.onnx). Max-norm thresholds from 4 batches: LTB, the default method, needs its
    200 iterations to get there (with 20 it reached 45 % of the ANN), too slow for a unit test;
    benchmarks/yolo.py measures the default."""
    n = 24
    with np.load(MODELS / "data" / "scenes_test.npz") as z:
        keep = z["box_image"] < n
        scenes = {"input": z["input"][:n], "boxes": z["boxes"][keep], "box_labels": z["box_labels"][keep],
                  "box_image": z["box_image"][keep]}
    session = _compile(name, 128, method="max", iters=4, batch=32)
    ann = ort.InferenceSession(str(MODELS / name), providers=["CPUExecutionProvider"]).run(
        ["detections"], {"input": scenes["input"]})[0]
    ann_map = _map(ann, scenes)
    snn_map = _map(session.run({"input": scenes["input"]}, T=64)["detections"], scenes)
    assert ann_map > 0.4
    assert snn_map >= 0.9 * ann_map, f"SNN mAP {snn_map:.4f} against ANN {ann_map:.4f}"
