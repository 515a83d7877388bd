"""End to end on tiny networks: compile, emitted structure, convergence to the ANN, readout."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import ann2snn
from ann2snn.modelio import serialize
from ann2snn.runtime import SpikingSession, window_start
from conftest import CNN_TEXT, build, cnn_weights, run_ort

from test_swap_and_partition import TAIL


def rel_error(session: SpikingSession, ann: onnx.ModelProto, x: np.ndarray, Ts: list[int], out: int = 0) -> list[float]:
    ref = run_ort(ann, {"x": x})[out]
    res = session.run_many({"x": x}, Ts)
    name = session.output_names[out]
    return [float(np.abs(res[T][name] - ref).mean() / np.abs(ref).mean()) for T in Ts]


def test_emitted_model_structure(cnn, cnn_calib) -> None:
    snn = ann2snn.compile(cnn, cnn_calib, iters=20, batch=32)
    onnx.checker.check_model(snn, full_check=True)
    kinds = [(n.domain, n.op_type) for n in snn.graph.node]
    assert kinds.count(("ann2snn", "IFNeuron")) == 2
    assert ("", "BatchNormalization") not in kinds and ("", "Relu") not in kinds
    assert [f.name for f in snn.functions] == ["IFNeuron"]
    inputs = [i.name for i in snn.graph.input]
    assert inputs[0] == "x" and all(i.endswith("/v") for i in inputs[1:])
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    assert meta["config"]["method"] == "ltb" and meta["readout"]["t0"] >= 0
    assert meta["step_outputs"] == ["y"] and meta["tail"] is None
    assert all(n["theta_max"] > 0 for n in meta["neurons"])


def test_spikes_are_binary(cnn, cnn_calib) -> None:
    snn = ann2snn.compile(cnn, cnn_calib, iters=20, batch=32)
    probe = SpikingSession(snn)
    session = SpikingSession(snn, probes=probe.spike_tensors)
    counts = []
    session.run_many({"x": cnn_calib["x"][:8]}, [10], on_step=lambda t, v: counts.append(
        {k: (set(np.unique(a)), float(a.sum())) for k, a in v.items()}))
    assert len(counts) == 10
    for step in counts:
        assert set(step) == set(probe.spike_tensors)
        assert all(values <= {0.0, 1.0} for values, _ in step.values())
    assert sum(total for step in counts for _, total in step.values()) > 0
    with pytest.raises(ann2snn.ConfigError, match="not in the model"):
        SpikingSession(snn, probes=["nope"])


@pytest.mark.parametrize("method,granularity", [("ltb", "channel"), ("ltb", "layer"), ("max", "channel"),
                                                ("percentile", "layer")])
def test_snn_output_converges_to_ann(cnn, cnn_calib, method: str, granularity: str) -> None:
    snn = ann2snn.compile(cnn, cnn_calib, method=method, granularity=granularity, iters=50, batch=32)
    errs = rel_error(SpikingSession(snn), cnn, cnn_calib["x"][:64], [8, 32, 128, 512])
    assert errs[3] < errs[0] / 3, errs
    assert errs[1] < errs[0] and errs[2] < errs[1], errs


def test_analog_tail_runs_once_on_the_readout() -> None:
    rng = np.random.default_rng(0)
    model = build(TAIL, {"W1": rng.normal(0, 1, (6, 4)), "W2": rng.normal(0, 1, (3, 6))})
    x = rng.normal(0, 1, (64, 4)).astype(np.float32)
    snn = ann2snn.compile(model, {"x": x}, iters=30, batch=32)
    assert [f.name for f in snn.functions] == ["IFNeuron", "AnalogTail"]
    session = SpikingSession(snn)
    assert session.output_names == ["y", "p"]
    ref_y, ref_p = run_ort(model, {"x": x})
    out = session.run({"x": x}, 512)
    np.testing.assert_allclose(out["p"].sum(axis=1), 1.0, rtol=1e-5)  # a softmax of the readout
    assert np.abs(out["p"] - ref_p).mean() < 0.02
    assert np.all(out["y"] >= 0)  # the output ReLU ran on the readout
    assert np.abs(out["y"] - ref_y).mean() / np.abs(ref_y).mean() < 0.05


def test_streaming_matches_run(cnn, cnn_calib) -> None:
    session = SpikingSession(ann2snn.compile(cnn, cnn_calib, iters=20, batch=32))
    x = cnn_calib["x"][:16]
    T = session.t0 + 20
    whole = session.run({"x": x}, T)["y"]
    session.reset(16)
    for _ in range(T):
        session.step({"x": x})
    np.testing.assert_allclose(session.readout()["y"], whole, rtol=1e-5, atol=1e-6)


def test_readout_window() -> None:
    assert window_start(64, 10) == 10
    assert window_start(12, 10) == 8  # T < t0 + 4: the last 4 steps
    assert window_start(3, 10) == 0


def test_same_inputs_give_identical_bytes(cnn, cnn_calib) -> None:
    a = serialize(ann2snn.compile(cnn, cnn_calib, iters=20, batch=32))
    b = serialize(ann2snn.compile(cnn, cnn_calib, iters=20, batch=32))
    assert a == b
    c = serialize(ann2snn.compile(cnn, cnn_calib, iters=20, batch=32, seed=1))
    assert c != a


def test_iterable_calibration(cnn, cnn_calib) -> None:
    batches = [{"x": cnn_calib["x"][i:i + 32]} for i in range(0, 256, 32)]
    snn = ann2snn.compile(cnn, batches, iters=8)
    errs = rel_error(SpikingSession(snn), cnn, cnn_calib["x"][:32], [8, 256])
    assert errs[1] < errs[0]


CNN2 = """
g (float[N,1,8,8] x, float[4,1,3,3] W1, float[6,4,3,3] W2, float[3,96] W3) => (float[N,3] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, W2)
  r2 = Relu (c2)
  p2 = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r2)
  f = Flatten (p2)
  y = Gemm <transB=1> (f, W3)
}
"""


def cnn2():
    rng = np.random.default_rng(5)
    model = build(CNN2, {"W1": rng.normal(0, 0.6, (4, 1, 3, 3)), "W2": rng.normal(0, 0.4, (6, 4, 3, 3)),
                         "W3": rng.normal(0, 0.3, (3, 96))})
    return model, {"x": rng.uniform(0, 1, (128, 1, 8, 8)).astype(np.float32)}


def test_cumulative_maxpool_pools_the_running_sum() -> None:
    model, calib = cnn2()
    snn = ann2snn.compile(model, calib, method="max")
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    pool_states = [s for s in meta["states"] if s["init"] == "zeros"]
    assert len(pool_states) == 2 and len(meta["states"]) == 4
    session = SpikingSession(snn)
    x = calib["x"][:4]
    session.reset(4)
    for _ in range(9):
        session.step({"x": x})
    acc = session._states[pool_states[0]["input"]]
    pooled = session._states[pool_states[1]["input"]]
    ref = acc.reshape(4, 6, 4, 2, 4, 2).max(axis=(3, 5))
    np.testing.assert_allclose(pooled, ref, rtol=1e-6)


def test_cumulative_maxpool_beats_instant_pooling() -> None:
    model, calib = cnn2()
    x = calib["x"][:64]
    errs = {}
    for mode in ("cumulative", "instant"):
        snn = ann2snn.compile(model, calib, method="max", maxpool=mode)
        errs[mode] = rel_error(SpikingSession(snn), model, x, [16, 256])
    assert errs["cumulative"][1] < errs["cumulative"][0] / 3, errs
    assert errs["cumulative"][1] < errs["instant"][1], errs


@pytest.mark.parametrize("opset", [11, 13, 18, 21, 23])
def test_opsets_11_to_23(opset: int, cnn_calib) -> None:
    from conftest import CNN_TEXT, cnn_weights

    model = build(CNN_TEXT, cnn_weights(), opset=opset)
    snn = ann2snn.compile(model, cnn_calib, iters=30, batch=32)
    assert max(i.version for i in snn.opset_import if i.domain == "") == max(opset, 13)
    errs = rel_error(SpikingSession(snn), model, cnn_calib["x"][:32], [8, 256])
    assert errs[1] < errs[0] / 2, errs


def test_fixed_batch_models_become_dynamic(cnn_calib) -> None:
    from conftest import CNN_TEXT, cnn_weights

    text = CNN_TEXT.replace("float[N,1,8,8] x", "float[1,1,8,8] x").replace("float[N,3] y", "float[1,3] y")
    text = text.replace("f = Flatten <axis=1> (p1)", "f = Reshape (p1, shp)").replace(
        "float[3] b3)", "float[3] b3, int64[2] shp)")
    model = build(text, cnn_weights(), ints={"shp": np.array([1, 64], np.int64)})
    snn = ann2snn.compile(model, cnn_calib, iters=30, batch=32)
    assert snn.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    session = SpikingSession(snn)
    x = cnn_calib["x"][:16]
    out = session.run({"x": x}, 256)["y"]
    ref = np.concatenate([run_ort(model, {"x": x[i:i + 1]})[0] for i in range(16)])
    assert np.abs(out - ref).mean() / np.abs(ref).mean() < 0.1


def test_fixed_batch_that_cannot_be_freed_is_a_clear_error(cnn_calib) -> None:
    text = """g (float[2,4] x, float[4,3] W) => (float[1,3] y) {
      h = MatMul (x, W)
      r = Relu (h)
      y = ReduceSum <keepdims=1> (r, ax)
    }"""
    model = build(text, {"W": np.ones((4, 3))}, ints={"ax": np.array([0], np.int64)})
    with pytest.raises(ann2snn.ModelLoadError, match="batch dimension is fixed at 2.*dynamic_axes"):
        ann2snn.compile(model, {"x": np.ones((4, 4), np.float32)})


def test_infinite_constants_of_the_source_are_left_alone() -> None:
    """A Max against a constant -inf (as jax2tf writes) is valid: it compiles, and the folding
    check only blames constants that folding made non-finite."""
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.reference import reference_run

    rng = np.random.default_rng(0)
    text = """
    g (float[N,4] x) => (float[N,3] y) {
      a = Gemm <transB=1> (x, W1, b1)
      r = Relu (a)
      m = Max (r, neginf)
      y = Gemm <transB=1> (m, W2, b2)
    }
    """
    w = {"W1": rng.normal(0, .5, (8, 4)), "b1": np.zeros(8), "W2": rng.normal(0, .5, (3, 8)), "b2": np.zeros(3),
         "neginf": np.array(-np.inf)}
    x = rng.normal(size=(32, 4)).astype(np.float32)
    snn = ann2snn.compile(build(text, w), {"x": x}, iters=5, batch=8)
    np.testing.assert_array_equal(SpikingSession(snn).run({"x": x[:3]}, 8)["y"], reference_run(snn, {"x": x[:3]}, 8)["y"])


@pytest.mark.parametrize("dims", [["N", 1, "h", "w"], [-1, 1, "?", "?"], [1, 1, "height", "width"]])
def test_symbolic_input_sizes_come_from_the_calibration_data(dims: list, caplog: pytest.LogCaptureFixture) -> None:
    """paddle2onnx ([-1, 3, ?, ?]) and Ultralytics ([1, 3, height, width]) leave the sizes
    symbolic: the model compiles for the calibration data's size, says so, and runs there."""
    import logging

    from onnx import TensorProto, helper

    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.reference import reference_run

    model = build(CNN_TEXT, cnn_weights())
    for vi, shape in ((model.graph.input[0], dims), (model.graph.output[0], [dims[0], 3])):
        vi.CopyFrom(helper.make_tensor_value_info(vi.name, TensorProto.FLOAT, shape))
    x = np.random.default_rng(0).uniform(0, 1, (16, 1, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        snn = ann2snn.compile(model, {"x": x}, iters=5, batch=8)
    assert "compiled for the calibration data's size" in caplog.text
    session = SpikingSession(snn)
    assert list(session.input_specs[0].shape[1:]) == [1, 8, 8]
    n = 1 if dims[0] == 1 else 3
    np.testing.assert_array_equal(session.run({"x": x[:n]}, 8)["y"], reference_run(snn, {"x": x[:n]}, 8)["y"])


def test_recipe_search_on_symbolic_input_sizes() -> None:
    """The recipe search calibrates its candidates on arrays it holds (a part of the data), not on
    the CalibrationSource the API makes: their symbolic sizes must come from those arrays too (on
    the real paddle2onnx PP-OCR classifier, [-1, 3, ?, ?], every candidate failed with "per-sample
    shape is unknown"). ``run_until`` with a mapping or a single array fixes the sizes as well."""
    from onnx import TensorProto, helper

    from ann2snn.data.arrays import CalibrationSource, input_specs
    from ann2snn.pipeline import run_until
    from ann2snn.search import search_recipe

    model = build(CNN_TEXT, cnn_weights())
    for vi, shape in ((model.graph.input[0], [-1, 1, "?", "?"]), (model.graph.output[0], [-1, 3])):
        vi.CopyFrom(helper.make_tensor_value_info(vi.name, TensorProto.FLOAT, shape))
    x = np.random.default_rng(0).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)
    for data in ({"x": x}, x):
        state = run_until(model, ann2snn.CompileConfig(), data, "fix_input_sizes")
        assert list(state.graph.inputs[0].shape[1:]) == [1, 8, 8]
    cfg = ann2snn.CompileConfig(target_T=8, iters=3, batch=8, search_budget=30)
    source = CalibrationSource({"x": x}, input_specs(model))
    _, record = search_recipe(model, cfg, source)
    statuses = [c["status"] for c in record["candidates"]]
    assert "scored" in statuses and set(statuses) <= {"scored", "skipped (budget)"}, record["candidates"]
