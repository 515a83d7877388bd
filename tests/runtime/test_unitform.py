"""The unit-threshold form (runtime/unitform.py): IF neurons in units of θ, 1/θ folded into
the weights that produce their input. The compiler emits it (thresholds of ones); the runtime
then runs each such neuron as three elementwise kernels instead of five, bit for bit."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, neuron_op_model, residual_net, run_ort
from onnx import helper, numpy_helper

import ann2snn
from ann2snn.runtime import SpikingSession
from ann2snn.runtime.ops import (DOMAIN, IF_OP, UNIT_IF_OP, if_neuron_function, if_neuron_reference,
                                 unit_if_neuron_function)
from ann2snn.runtime.unitform import unit_form


@pytest.fixture(scope="module")
def net_snn() -> onnx.ModelProto:
    calib = np.random.default_rng(0).uniform(0, 1, (128, 1, 8, 8)).astype(np.float32)
    return ann2snn.compile(residual_net(), {"x": calib}, iters=20, batch=32)


def test_unit_neuron_is_the_if_neuron_with_threshold_one() -> None:
    shape = [4, 5]
    unit = neuron_op_model(unit_if_neuron_function(17), {"i": shape, "v": shape}, ["s", "v2"], shape)
    one = np.float32(1)
    edges = np.array([np.nextafter(one, np.float32(0)), 1, np.nextafter(one, np.float32(2)), 0.5, 0, -0.0,
                      -1e-38, 1e38, -1e38, 2, 0.75, 1e-7, -3, 0.999, 1.5, 7, -0.5, 0.25, 3e30, -3e30], np.float32)
    rng = np.random.default_rng(0)
    cases = [(edges.reshape(shape), np.zeros(shape, np.float32))]
    cases += [(rng.normal(0, 1, shape).astype(np.float32), rng.uniform(-1, 1, shape).astype(np.float32))
              for _ in range(50)]
    for i, v in cases:
        s, v2 = run_ort(unit, {"i": i, "v": v})
        rs, rv = if_neuron_reference(i, v, np.ones(shape, np.float32))
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_array_equal(v2, rv)


def test_every_if_neuron_is_compiled_in_units_of_its_threshold(net_snn) -> None:
    graph = net_snn.graph
    assert [n.op_type for n in graph.node if n.domain == DOMAIN] == [IF_OP] * 4
    assert not any(n.name.endswith("/to_unit") for n in graph.node)  # no Mul by 1/θ was needed
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert all(np.all(values[n.input[2]] == 1) for n in graph.node if n.op_type == IF_OP)
    session = SpikingSession(net_snn, kernels=False)  # the compiled kernels replace the unit op
    # the runtime swaps in the three-kernel op; no state changes units
    assert [n.op_type for n in session._plan.proto.graph.node if n.domain == DOMAIN] == [UNIT_IF_OP] * 4
    assert not any(n.op_type == UNIT_IF_OP for n in session.model.graph.node)  # the artifact is untouched
    init = {s["input"]: s["init"] for s in session.meta["states"]}
    v0 = [st[2] for st in session._state_specs if isinstance(init[st[0]], dict)]
    assert v0 and all(np.all(v == np.float32(0.5)) for v in v0)  # v(0) = θ/2 = 1/2 in units of θ


@pytest.mark.parametrize("mode,chunk", [("step", None), ("layered", 5)])
def test_unit_kernel_gives_identical_results(net_snn, mode: str, chunk: int | None) -> None:
    x = {"x": np.random.default_rng(4).uniform(0, 1, (6, 1, 8, 8)).astype(np.float32)}
    exact = SpikingSession(net_snn, mode=mode, chunk=chunk, unit_thresholds=False)
    unit = SpikingSession(net_snn, mode=mode, chunk=chunk)
    a, b = exact.run_many(x, [3, 11, 26]), unit.run_many(x, [3, 11, 26])
    for T in a:
        np.testing.assert_array_equal(b[T]["y"], a[T]["y"])
    for name, value in exact._states.items():
        np.testing.assert_array_equal(unit._states[name], value)


def _gemm_if_graph(current_also_out: bool) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Gemm -> IFNeuron -> Gemm; with ``current_also_out`` the current is also a step output."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["z"], transB=1, name="gemm"),
             helper.make_node(IF_OP, ["z", "v", "theta"], ["s", "v_next"], domain=DOMAIN, name="if"),
             helper.make_node("Gemm", ["s", "W2", "b2"], ["y"], transB=1, name="out")]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             [("W", rng.normal(size=(4, 4))), ("b", rng.normal(size=4)), ("theta", np.array([[0.5, 1, 2, 4]])),
              ("W2", rng.normal(size=(2, 4))), ("b2", np.zeros(2))]]
    outputs = ["y", "v_next"] + (["z"] if current_also_out else [])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4]),
                                           helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(if_neuron_function(17))
    return model, {"v": "v_next"}


@pytest.mark.parametrize("shared", [False, True])
def test_a_current_read_elsewhere_is_scaled_by_a_mul_instead(shared: bool) -> None:
    model, states = _gemm_if_graph(shared)
    unit, factors = unit_form(model, states)
    names = [n.name for n in unit.graph.node]
    assert ("if/to_unit" in names) == shared  # folding would change the other reader's value
    # the neuron stays an IFNeuron (what the compiler emits), with a threshold of ones
    assert [n.op_type for n in unit.graph.node if n.domain == DOMAIN] == [IF_OP]
    theta = next(i for i in unit.graph.initializer if i.name == "theta")
    np.testing.assert_array_equal(numpy_helper.to_array(theta), np.ones((1, 4), np.float32))
    inits = {i.name for i in unit.graph.initializer}
    assert ("gemm/unit_input1" in inits) == (not shared)
    np.testing.assert_array_equal(factors["v"], [[2, 1, 0.5, 0.25]])
    rng = np.random.default_rng(2)
    for _ in range(10):  # thresholds are powers of two: the same spikes and (scaled) membranes
        x, v = rng.normal(size=(3, 4)).astype(np.float32), rng.uniform(0, 1, (3, 4)).astype(np.float32)
        ref = dict(zip(["y", "v_next", "z"], run_ort(model, {"x": x, "v": v})))
        got = dict(zip(["y", "v_next", "z"], run_ort(unit, {"x": x, "v": v * factors["v"]})))
        np.testing.assert_array_equal(got["y"], ref["y"])
        np.testing.assert_array_equal(got["v_next"] / factors["v"], ref["v_next"])
        if shared:
            np.testing.assert_array_equal(got["z"], ref["z"])


def test_signed_neurons_keep_their_own_arithmetic() -> None:
    with np.load(MODELS / "data" / "digits_calib.npz") as z:
        snn = ann2snn.compile(MODELS / "digits_cnn.onnx", z["input"][:64], iters=5, batch=32, neuron="signed")
    session = SpikingSession(snn, kernels=False)  # (the compiled kernels would replace them)
    assert session._plan.proto is session.model


@pytest.mark.parametrize("pad,folds", [({"mode": "constant"}, True), ({"mode": "reflect"}, True),
                                       ({"mode": "constant", "value": 1.0}, False)])
def test_pads_fold_only_when_they_commute_with_the_scale(pad: dict, folds: bool) -> None:
    """Conv -> Pad -> IFNeuron: a zero or reflecting pad commutes with 1/θ, a pad of 1 does not."""
    rng = np.random.default_rng(3)
    value = pad.pop("value", None)
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    pad_inputs = ["c", "pads"] + (["pad_value"] if value is not None else [])
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Pad", pad_inputs, ["p"], name="pad", **pad),
             helper.make_node(IF_OP, ["p", "v", "theta"], ["s", "v_next"], domain=DOMAIN, name="if")]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             [("W", rng.normal(size=(2, 1, 3, 3))), ("b", rng.normal(size=2)), ("theta", np.array([[[[0.5]], [[2.0]]]]))]]
    inits.append(pads)
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "pad_value"))
    vi = lambda n, shape: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi("x", ["N", 1, 4, 4]), vi("v", ["N", 2, 6, 6])],
                              [vi("s", None), vi("v_next", None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(if_neuron_function(17))
    unit, factors = unit_form(model, {"v": "v_next"})
    assert ("if/to_unit" not in [n.name for n in unit.graph.node]) == folds
    for _ in range(5):
        x, v = rng.normal(size=(2, 1, 4, 4)).astype(np.float32), rng.uniform(0, 1, (2, 2, 6, 6)).astype(np.float32)
        ref = run_ort(model, {"x": x, "v": v})
        got = run_ort(unit, {"x": x, "v": v * factors["v"]})
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1] / factors["v"], ref[1])
