"""Old exports (issue 15): the ONNX model zoo's Caffe/Caffe2-era files compile.

The six families in ``models/old_exports/`` (built by ``models/build_old_exports.py``) are
IR 3, opset 9, list every initializer in ``graph.input`` and bake batch 1 into their Reshape
shapes. Each compiles with the default options, runs at batch 1 and at a larger batch, is
inspectable, and its output error against the ANN falls with T. Tiny hand-written graphs
pin the rest: opset 6-8 ops, the batch-1 fallback and where LRN goes.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

import ann2snn
from ann2snn.analysis.inspection import format_inspection, inspect_model
from ann2snn.errors import DataError, ModelLoadError
from ann2snn.runtime import SpikingSession

OLD = Path(__file__).resolve().parents[1] / "models" / "old_exports"
FAMILIES = ("squeezenet", "shufflenet", "inception", "densenet", "alexnet", "googlenet")
TS = (8, 32, 128)
#: relative output error bound at T = 128 (measured 0.06-0.26; see README "Which graphs convert")
BOUND_128 = 0.35


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| over the whole batch."""
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def ann_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """The ANN's outputs, one sample at a time (the file's batch is 1)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    return np.load(OLD / "test.npz")["input"]


@pytest.fixture(scope="module")
def compiled() -> dict[str, onnx.ModelProto]:
    """Every family compiled once, with the default options."""
    return {name: ann2snn.compile(OLD / f"{name}.onnx", OLD / "calib.npz") for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_zoo_style_file_is_what_the_zoo_ships(name: str) -> None:
    model = onnx.load(OLD / f"{name}.onnx")
    inits = {t.name for t in model.graph.initializer}
    assert model.ir_version == 3 and model.opset_import[0].version == 9
    assert inits and inits <= {i.name for i in model.graph.input}
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert (OLD / f"{name}.onnx").stat().st_size < 200_000


@pytest.mark.parametrize("name", FAMILIES)
def test_family_compiles_runs_and_converges(name: str, compiled: dict[str, onnx.ModelProto],
                                            test_images: np.ndarray) -> None:
    snn = compiled[name]
    onnx.checker.check_model(snn, full_check=True)
    inits = {t.name for t in onnx.load(OLD / f"{name}.onnx").graph.initializer}
    inputs = [i.name for i in snn.graph.input]
    assert "input" in inputs and not inits & set(inputs), "weights are constants, not inputs"
    batch_dim = snn.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "the batch of 1 baked into the export is generalised"
    ref = ann_outputs(OLD / f"{name}.onnx", test_images)
    sess = SpikingSession(snn)
    runs = sess.run_many({"input": test_images}, TS)  # a batch of 16
    errors = [rel_error(runs[T]["logits"], ref) for T in TS]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < BOUND_128, errors
    single = sess.run({"input": test_images[3:4]}, TS[-1])["logits"]
    np.testing.assert_allclose(single, runs[TS[-1]]["logits"][3:4], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_inspect_reports_initializers_as_inputs(name: str) -> None:
    info = inspect_model(OLD / f"{name}.onnx")
    n = len(onnx.load(OLD / f"{name}.onnx").graph.initializer)
    text = format_inspection(info)
    assert f"note: {n} initializer(s) are also listed as graph inputs (old export: IR 3, opset 9)" in text
    assert "batch: fixed at 1 in the export, made dynamic" in text
    assert info["neuron_layers"] > 0 and not info["problems"]


def test_lrn_runs_in_the_analog_prefix_and_the_spiking_part_starts_after_it(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        info = inspect_model(OLD / "alexnet.onnx")
    rows = {r["node"]: r for r in info["nodes"]}
    lrns = [r for r in info["nodes"] if r["op"] == "ai.onnx::LRN"]
    assert len(lrns) == 2 and all(r["role"] == "prefix" and "not correct on spikes" in r["detail"] for r in lrns)
    assert rows["/features/features.1/Relu"]["role"] == "prefix"  # in front of an LRN: stays analog
    assert rows["/features/features.9/Relu"]["role"] == "neuron"  # the first ReLU after the last LRN
    assert rows["/classifier/classifier.1/Relu_dropout"]["role"] == "folded"
    assert "not correct on spikes and sit(s) behind the first layers" in caplog.text


def test_googlenet_stem_with_two_lrns_is_prefix_and_the_inception_blocks_spike() -> None:
    info = inspect_model(OLD / "googlenet.onnx")
    roles = {r["node"]: r["role"] for r in info["nodes"]}
    stem = [r for r in info["nodes"] if r["node"].startswith("/stem/")]
    assert stem and all(r["role"] == "prefix" for r in stem)
    assert sum(r["op"] == "ai.onnx::LRN" for r in stem) == 2
    assert roles["/a/b1/b1.1/Relu"] == "neuron" and roles["/b/Concat"] == "spiking"
    assert not [r for r in info["nodes"] if r["role"] == "tail"]


def _graph_model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], shape: list[int], out: list[int],
                 opset: int) -> onnx.ModelProto:
    """An IR-3 model with input ``x`` and output ``y``, initializers listed as inputs."""
    tensors = [numpy_helper.from_array(np.asarray(v, np.int64 if k.startswith("shape") else np.float32), k)
               for k, v in inits.items()]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    ins += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors]
    graph = helper.make_graph(nodes, "old", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def _old_ops(opset: int) -> onnx.ModelProto:
    """Conv, BatchNormalization (``spatial`` below opset 9, ``is_test`` at 6), MaxPool, Upsample
    (``scales`` attribute below 9, input at 9), Flatten(axis=1), Dropout(ratio), Gemm(transB)."""
    rng = np.random.default_rng(0)
    c = 6
    inits = {"w1": rng.normal(0, 0.5, (c, 3, 3, 3)), "b1": np.zeros(c), "g": np.ones(c), "be": np.full(c, 0.1),
             "mu": rng.normal(0, 0.1, c), "var": np.ones(c), "w2": rng.normal(0, 0.3, (c, c, 3, 3)),
             "b2": np.full(c, 0.05), "w3": rng.normal(0, 0.1, (4, c * 8 * 8)), "b3": np.zeros(4)}
    bn: dict = {"epsilon": 1e-5, **({"spatial": 1} if opset < 9 else {}), **({"is_test": 1} if opset == 6 else {})}
    drop: dict = {"ratio": 0.5, **({"is_test": 1} if opset == 6 else {})}
    up_in = ["p"]
    up: dict = {"mode": "nearest"}
    if opset < 9:
        up["scales"] = [1.0, 1.0, 2.0, 2.0]
    else:
        inits["scales"] = np.array([1, 1, 2, 2])
        up_in.append("scales")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"], name="bn", **bn),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool")]
    if opset >= 7:  # Upsample's opset-1 form is experimental; zoo files of opset 6 have none
        nodes.append(helper.make_node("Upsample", up_in, ["u"], name="up", **up))
    else:
        nodes.append(helper.make_node("Concat", ["p", "p"], ["u0"], axis=2, name="up0"))
        nodes.append(helper.make_node("Concat", ["u0", "u0"], ["u"], axis=3, name="up"))
    nodes += [helper.make_node("Conv", ["u", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
              helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
              helper.make_node("Flatten", ["r2"], ["f"], axis=1, name="flat"),
              helper.make_node("Dropout", ["f"], ["d"], name="drop", **drop),
              helper.make_node("Gemm", ["d", "w3", "b3"], ["y"], transB=1, name="fc")]
    return _graph_model(nodes, inits, [1, 3, 16, 16], [1, 4], opset)


@pytest.mark.parametrize("opset", [6, 7, 8, 9])
def test_old_opset_ops_are_upgraded_and_converge(opset: int, caplog) -> None:
    model = _old_ops(opset)
    rng = np.random.default_rng(1)
    calib = rng.uniform(0, 1, (64, 3, 16, 16)).astype(np.float32)
    x = rng.uniform(0, 1, (8, 3, 16, 16)).astype(np.float32)
    # onnxruntime has no BatchNormalization-6 kernel: the reference runs the upgraded ANN there
    ann_model = version_converter.convert_version(model, 13) if opset < 7 else model
    ann = ort.InferenceSession(ann_model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = np.concatenate([ann.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    with caplog.at_level(logging.WARNING):
        snn = ann2snn.compile(model, {"x": calib}, iters=50)
    n = len(model.graph.initializer)
    assert f"{n} initializer(s) are also listed as graph inputs (an old export: IR 3, opset {opset})" in caplog.text
    assert {i.name for i in snn.graph.input} >= {"x"} and "w1" not in {i.name for i in snn.graph.input}
    runs = SpikingSession(snn).run_many({"x": x}, [8, 64, 512])
    errors = [rel_error(runs[T]["y"], ref) for T in (8, 64, 512)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1, errors


def test_opsets_before_6_are_refused_with_the_remedy() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = _graph_model(nodes, {"w": np.ones((3, 3, 1, 1))}, [1, 3, 16, 16], [1, 3, 16, 16], 5)
    with pytest.raises(ModelLoadError, match="opset 5, older than ann2snn reads .6.; .*opset 7, 8 or 9"):
        ann2snn.compile(model, {"x": np.zeros((4, 3, 16, 16), np.float32)})


def _batch_bound(rows_first: bool) -> onnx.ModelProto:
    """Conv-ReLU, then an op that depends on the batch: a Slice of the first sample (the leading
    axis stays 1), or a Reshape to [4, 16] (the leading axis stops being the batch)."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(0, 0.5, (4, 4, 1, 1)), "b1": np.full(4, 0.1)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    if rows_first:
        inits |= {"shape1": np.array([4, 16]), "w2": rng.normal(0, 0.3, (16, 8)), "shape2": np.array([1, 32]),
                  "w3": rng.normal(0, 0.3, (3, 32)), "b3": np.zeros(3)}
        nodes += [helper.make_node("Reshape", ["r", "shape1"], ["rs"], name="rows"),
                  helper.make_node("MatMul", ["rs", "w2"], ["m"], name="mm"),
                  helper.make_node("Relu", ["m"], ["r2"], name="relu2"),
                  helper.make_node("Reshape", ["r2", "shape2"], ["f"], name="flat")]
    else:
        inits |= {"w3": rng.normal(0, 0.3, (3, 64)), "b3": np.zeros(3)}
        nodes += [helper.make_node("Slice", ["r"], ["s"], starts=[0], ends=[1], axes=[0], name="first"),
                  helper.make_node("Flatten", ["s"], ["f"], name="flat")]
    nodes.append(helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc"))
    return _graph_model(nodes, inits, [1, 4, 4, 4], [1, 3], 9)


def test_batch_that_cannot_be_generalised_compiles_for_batch_1(caplog) -> None:
    model = _batch_bound(rows_first=False)
    x = np.random.default_rng(2).uniform(0, 1, (32, 4, 4, 4)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        snn = ann2snn.compile(model, {"x": x}, iters=20)
    assert "it is compiled for batch 1" in caplog.text
    assert snn.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert '"batch": 1' in {p.key: p.value for p in snn.metadata_props}["ann2snn"]
    ann = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess = SpikingSession(snn)
    errors = [rel_error(sess.run({"x": x[:1]}, T)["y"], ann.run(None, {"x": x[:1]})[0]) for T in (8, 64, 512)]
    assert errors[0] > errors[2] and errors[2] < 0.05, errors
    # a batch of 2 is refused, naming the input, the batch it expects and the remedy
    with pytest.raises(DataError, match=r"input 'x' has 2 samples but the model was compiled for a batch of 1.*"
                                        r"--batch-size 1"):
        sess.run({"x": x[:2]}, 8)
    # the CLI's default batch is the fixed one, so `run` works as it is
    from ann2snn.runtime.batches import default_batch_size
    assert default_batch_size(sess) == 1


def test_batch_folded_into_another_axis_is_a_clear_error() -> None:
    model = _batch_bound(rows_first=True)
    with pytest.raises(ModelLoadError, match="cannot be compiled for batch 1 either.*dynamic batch axis"):
        ann2snn.compile(model, {"x": np.ones((8, 4, 4, 4), np.float32)}, iters=5)


def test_lrn_at_the_end_stays_in_the_tail() -> None:
    """An LRN behind most of the work ends the spiking part (the prefix rule would leave less spiking)."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(0, 0.5, (8, 3, 3, 3)), "b1": np.zeros(8), "w2": rng.normal(0, 0.3, (8, 8, 3, 3)),
             "b2": np.zeros(8)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("LRN", ["r2"], ["y"], size=3, name="lrn")]
    info = inspect_model(_graph_model(nodes, inits, [1, 3, 8, 8], [1, 8, 8, 8], 9))
    roles = {r["node"]: r["role"] for r in info["nodes"]}
    assert roles == {"conv1": "prefix", "relu1": "neuron", "conv2": "spiking", "relu2": "tail", "lrn": "tail"}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_conversion_is_exact_once_no_threshold_clips(name: str, test_images: np.ndarray) -> None:
    """Max-norm thresholds over calibration data that include the test images: no test
    activation is clipped, so the SNN must converge to the ANN itself (the floor of the
    default LTB thresholds is their clipping, not the handling of the old export)."""
    data = np.concatenate([np.load(OLD / "calib.npz")["input"], test_images])
    snn = ann2snn.compile(OLD / f"{name}.onnx", {"input": data}, method="max")
    ref = ann_outputs(OLD / f"{name}.onnx", test_images)
    runs = SpikingSession(snn).run_many({"input": test_images}, [128, 512, 2048])
    errors = [rel_error(runs[T]["logits"], ref) for T in (128, 512, 2048)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01, errors
