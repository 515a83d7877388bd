"""Issue 16, first step: expectation compensation (``--nonlinear compensate``).

The law: for any increments x_1..x_t, the running sum of a wrapped op's outputs is
t·f(mean input so far) at every t (docs/compensation.md). Then the exporter-matrix
transformer and MobileNetV3 block compiled with it: structure, convergence with T, and
accuracy / agreement at T = 64 beside the analog-tail default.
"""
from __future__ import annotations

import importlib.util
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import ann2snn
from ann2snn.analysis.evaluate import evaluate
from ann2snn.analysis.inspection import inspect_model
from ann2snn.passes.canonicalize_activations import _function as activation_function
from ann2snn.runtime import SpikingSession
from ann2snn.runtime.compensation import (compensated_function, compensated_reference, is_compensated,
                                          step_counter_nodes)
from ann2snn.runtime.ops import DOMAIN
from ann2snn.runtime.reference import model_metadata, reference_run
from ann2snn.support import ACTIVATION_DOMAIN
from conftest import MODELS

_spec = importlib.util.spec_from_file_location("exporter_matrix_cells", MODELS / "exporters" / "matrix.py")
matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)

SHAPE = [2, 3, 5]
F = TensorProto.FLOAT


def _op_cases() -> dict[str, tuple[onnx.NodeProto, list[int], dict[str, np.ndarray], int]]:
    """name -> (inner node, positions of its time-varying inputs, constant inputs, ai.onnx opset)."""
    rng = np.random.default_rng(1)
    scale, bias = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    return {
        "Softmax": (helper.make_node("Softmax", ["a"], ["y"], axis=-1), [0], {}, 17),
        "LayerNormalization": (helper.make_node("LayerNormalization", ["a", "scale", "bias"], ["y"], axis=-1,
                                                epsilon=1e-5), [0], {"scale": scale, "bias": bias}, 17),
        "Gelu": (helper.make_node("Gelu", ["a"], ["y"]), [0], {}, 20),
        "ErfGelu": (helper.make_node("Gelu", ["a"], ["y"], domain=ACTIVATION_DOMAIN), [0], {}, 17),
        "Sigmoid": (helper.make_node("Sigmoid", ["a"], ["y"]), [0], {}, 17),
        "HardSwish": (helper.make_node("HardSwish", ["a"], ["y"]), [0], {}, 17),
        "Mul": (helper.make_node("Mul", ["a", "b"], ["y"]), [0, 1], {}, 17),
        "MatMul": (helper.make_node("MatMul", ["a", "b"], ["y"]), [0, 1], {}, 17),
    }


def _model(inner: onnx.NodeProto, varying: list[int], consts: dict[str, np.ndarray], opset: int,
           shapes: list[list[int]]) -> onnx.ModelProto:
    """A model of one compensated op, its states as inputs / outputs."""
    opsets = {"": opset, **({ACTIVATION_DOMAIN: 1} if inner.domain == ACTIVATION_DOMAIN else {})}
    fn = compensated_function("ExpectationCompensatedTest", inner, varying, opsets)
    xs = [f"x{i}" for i in range(len(varying))]
    sums = [f"sum{i}" for i in range(len(varying))]
    out_shape = _reference(inner, opset, [np.zeros(s, np.float32) for s in shapes], consts).shape
    counter, counter_inits, t_of = step_counter_nodes("count", "count_next", [len(out_shape), *map(len, shapes)])
    call = helper.make_node(fn.name, xs + sums + ["total", t_of[len(out_shape)]] + [t_of[len(sh)] for sh in shapes]
                            + list(consts), ["y"] + [s + "_next" for s in sums] + ["total_next"], domain=DOMAIN)
    vi = lambda n, s: helper.make_tensor_value_info(n, F, list(s))  # noqa: E731
    inputs = ([vi(x, s) for x, s in zip(xs, shapes)] + [vi(s, sh) for s, sh in zip(sums, shapes)]
              + [vi("total", out_shape), vi("count", [shapes[0][0], 1])] + [vi(c, v.shape) for c, v in consts.items()])
    outputs = ([vi("y", out_shape)] + [vi(s + "_next", sh) for s, sh in zip(sums, shapes)]
               + [vi("total_next", out_shape), vi("count_next", [shapes[0][0], 1])])
    functions = [fn] + ([activation_function(inner.op_type, opset)] if inner.domain == ACTIVATION_DOMAIN else [])
    model = helper.make_model(helper.make_graph(counter + [call], "ec", inputs, outputs, counter_inits),
                              functions=functions,
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()]
                              + [helper.make_opsetid(DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _reference(inner: onnx.NodeProto, opset: int, args: list[np.ndarray], consts: dict[str, np.ndarray]) -> np.ndarray:
    """The plain op on ``args`` (its time-varying inputs, in order) by onnxruntime."""
    names = [f"m{i}" for i in range(len(args))]
    node = onnx.NodeProto()
    node.CopyFrom(inner)
    it = iter(names)
    node.input[:] = [next(it) if n not in consts else n for n in inner.input]
    node.output[:] = ["y"]
    vi = lambda n, s: helper.make_tensor_value_info(n, F, None if s is None else list(s))  # noqa: E731
    fns = [activation_function(inner.op_type, opset)] if inner.domain == ACTIVATION_DOMAIN else []
    model = helper.make_model(helper.make_graph([node], "f", [vi(n, a.shape) for n, a in zip(names, args)]
                                                + [vi(c, v.shape) for c, v in consts.items()], [vi("y", None)]),
                              functions=fns, opset_imports=[helper.make_opsetid("", opset)]
                              + ([helper.make_opsetid(ACTIVATION_DOMAIN, 1)] if fns else []))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {**dict(zip(names, args)), **consts})[0]


@pytest.mark.parametrize("name", list(_op_cases()))
def test_running_sum_is_t_times_f_of_the_mean(name: str) -> None:
    """Random increments (spike-like and real-valued): after every step t, Σ y = t·f(mean input)."""
    inner, varying, consts, opset = _op_cases()[name]
    shapes = [SHAPE, [2, 5, 4]] if name == "MatMul" else [SHAPE] * len(varying)
    model = _model(inner, varying, consts, opset, shapes)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    sums = [np.zeros(s, np.float32) for s in shapes]
    total = np.zeros(_reference(inner, opset, sums, consts).shape, np.float32)
    count = np.zeros((shapes[0][0], 1), np.float32)
    emitted = np.zeros_like(total, dtype=np.float64)
    seen = [np.zeros(s, np.float64) for s in shapes]
    for t in range(1, 41):
        xs = [(rng.random(s) < 0.4).astype(np.float32) * 1.5 - 0.3 * rng.random(s).astype(np.float32)
              for s in shapes]
        feed = {**{f"x{i}": x for i, x in enumerate(xs)}, **{f"sum{i}": s for i, s in enumerate(sums)},
                "total": total, "count": count, **consts}
        y, *rest = sess.run(None, feed)
        sums, total, count = rest[:len(shapes)], rest[-2], rest[-1]
        emitted += y
        seen = [s + x for s, x in zip(seen, xs)]
        want = t * _reference(inner, opset, [(s / t).astype(np.float32) for s in seen], consts).astype(np.float64)
        np.testing.assert_allclose(emitted, want, rtol=1e-4, atol=1e-4 * t, err_msg=f"{name} at t = {t}")
        assert np.all(count == t)


def test_numpy_reference_matches_the_function() -> None:
    """compensated_reference (numpy) and the ONNX function agree step by step on Sigmoid."""
    inner, varying, consts, opset = _op_cases()["Sigmoid"]
    sess = ort.InferenceSession(_model(inner, varying, consts, opset, [SHAPE]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    state = ([np.zeros(SHAPE, np.float32)], np.zeros(SHAPE, np.float32), np.zeros((2, 1), np.float32))
    for _ in range(5):
        x = rng.normal(size=SHAPE).astype(np.float32)
        y, s_next, total_next, count_next = compensated_reference(lambda m: 1 / (1 + np.exp(-m)), [x], *state)
        got = sess.run(None, {"x0": x, "sum0": state[0][0], "total": state[1], "count": state[2]})
        np.testing.assert_allclose(got[0], y, rtol=1e-5, atol=1e-6)
        state = (s_next, total_next, count_next)


# -- the exporter matrix ----------------------------------------------------------------------------

CELLS = [("transformer", "torch_legacy"), ("mbv3", "torch_legacy")]


@pytest.fixture(scope="module")
def compiled() -> dict:
    cache: dict = {}

    def get(net: str, exporter: str, nonlinear: str) -> onnx.ModelProto:
        if (net, exporter, nonlinear) not in cache:
            path = matrix.cell_path(net, exporter)
            logging.getLogger("ann2snn").setLevel(logging.ERROR)
            try:
                cache[(net, exporter, nonlinear)] = ann2snn.compile(path, matrix.cell_inputs(path, "calib"),
                                                                    nonlinear=nonlinear)
            finally:
                logging.getLogger("ann2snn").setLevel(logging.NOTSET)
        return cache[(net, exporter, nonlinear)]

    return get


@pytest.mark.parametrize("net,exporter", CELLS)
def test_compensated_model_structure(compiled, net: str, exporter: str) -> None:
    """The compiled model passes the full ONNX check, has no analog tail, and every compensated
    op is a function call whose states are in the metadata."""
    snn = compiled(net, exporter, "compensate")
    onnx.checker.check_model(snn, full_check=True)
    meta = model_metadata(snn)
    assert meta["tail"] is None and meta["config"]["nonlinear"] == "compensate"
    calls = [n for n in snn.graph.node if is_compensated(n)]
    assert calls and len(calls) == len(meta["compensated"])
    states = {s["input"] for s in meta["states"]}
    for entry in meta["compensated"]:
        assert set(entry["states"]) <= states
    ops = {e["op"] for e in meta["compensated"]}
    assert ops >= ({"LayerNormalization", "Softmax", "MatMul", "Gelu"} if net == "transformer"
                   else {"HardSwish", "HardSigmoid", "Mul"}), ops


@pytest.mark.parametrize("net,exporter", CELLS)
def test_compensated_model_converges(compiled, net: str, exporter: str) -> None:
    """Error against the ANN falls with T; at T = 64 accuracy within 1 point of the ANN's and
    agreement at least 97% (the analog-tail default is evaluated beside it, same images)."""
    path = matrix.cell_path(net, exporter)
    data = matrix.cell_inputs(path, "test")
    data["label"] = matrix.labels()
    res = {mode: evaluate(path, SpikingSession(compiled(net, exporter, mode)), data, [8, 64], batch_size=300)
           for mode in ("compensate", "analog")}
    rows = {r["T"]: r for r in res["compensate"]["snn"]}
    assert rows[64]["relative_error"] < rows[8]["relative_error"], rows
    assert rows[64]["accuracy"] >= res["compensate"]["ann_accuracy"] - 0.01, rows
    assert rows[64]["agreement"] >= 0.97, rows
    analog = {r["T"]: r for r in res["analog"]["snn"]}[64]
    assert rows[64]["agreement"] >= analog["agreement"] - 0.02, (rows[64], analog)


def test_forms_agree_with_the_reference_on_a_compensated_model(compiled) -> None:
    """The auto form (step at batch 3, layered at batch 1: runtime/session.py,
    LAYERED_MAX_BATCH_COMPENSATED) and the layered form with chunks of 4 equal the reference."""
    snn = compiled("transformer", "torch_legacy", "compensate")
    path = matrix.cell_path("transformer", "torch_legacy")
    x = matrix.cell_inputs(path, "test", limit=3)
    for batch in (3, 1):
        feed = {k: v[:batch] for k, v in x.items()}
        ref = reference_run(snn, feed, 9)
        session = SpikingSession(snn)
        got = session.run(feed, T=9)
        assert session.last_form.startswith("step" if batch > 1 else "layered"), session.last_form
        layered = SpikingSession(snn, mode="layered", chunk=4, guard=False).run(feed, T=9)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(layered[k], ref[k], rtol=1e-5, atol=1e-6)


def test_inspect_names_compensated_ops() -> None:
    """inspect --nonlinear compensate: the nonlinear ops have the role 'compensated', no tail."""
    info = inspect_model(matrix.cell_path("transformer", "torch_legacy"), ann2snn.CompileConfig(nonlinear="compensate"))
    roles = {r["node"]: r["role"] for r in info["nodes"]}
    assert roles["/Softmax"] == "compensated" and roles["/ln1/LayerNormalization"] == "compensated"
    assert info["macs"]["tail"] == 0 and info["macs"]["compensated"] > 0


def test_nonlinear_option_is_checked() -> None:
    with pytest.raises(ann2snn.ConfigError, match="--nonlinear"):
        ann2snn.CompileConfig(nonlinear="exact")


def test_shape_of_a_varying_tensor_does_not_end_the_spiking_part() -> None:
    """tf2onnx's Tensordot reads Shape of time-varying tensors: constant in time, so prefix; its
    attention MatMul has no static shapes, so it is not compensated and inspect says why."""
    info = inspect_model(matrix.cell_path("transformer", "tf2onnx"), ann2snn.CompileConfig(nonlinear="compensate"))
    rows = {r["node"]: r for r in info["nodes"]}
    shapes = [r for r in rows.values() if r["op"] == "ai.onnx::Shape"]
    assert shapes and not any("ends the spiking part" in r["detail"] for r in shapes)
    assert any("not compensated: the per-sample shapes" in r["detail"] for r in rows.values())
    assert info["macs"]["compensated"] == 0  # every weighted op after a compensated op reads re-spiked values
    dense = inspect_model(matrix.cell_path("transformer", "tf2onnx"),
                          ann2snn.CompileConfig(nonlinear="compensate", respike=False))
    assert dense["macs"]["compensated"] > 0
    assert info["macs"]["spiking"] == dense["macs"]["spiking"] + dense["macs"]["compensated"]
