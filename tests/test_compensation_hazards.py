"""Issue 16, "Bad input": numerical hazards of expectation compensation, with adversarial inputs.

A compensated op sees only running means (runtime/compensation.py), so a step that swings wildly
does not reach it; Softmax subtracts the row maximum of the mean; the ops that can give inf /
NaN on finite inputs (GUARDED) keep their previous total where t·f(means) is not finite. Each
case checks that every emitted increment is finite and that the running sum is t·f(mean input)
wherever f(mean input) is finite. An op whose ANN output is not finite is refused by name.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_expectation_compensation import _model

import ann2snn
from ann2snn.runtime import SpikingSession
from ann2snn.runtime.compensation import GUARDED, compensated_function, compensated_reference
from ann2snn.runtime.reference import model_metadata
from ann2snn.support import ACTIVATION_DOMAIN

ROWS, WIDTH = 3, 8


def _stepper(inner: onnx.NodeProto, varying: list[int], consts: dict[str, np.ndarray], opset: int,
             shapes: list[list[int]]):
    """A function feeding one step's increments and returning the increment y (states kept)."""
    sess = ort.InferenceSession(_model(inner, varying, consts, opset, shapes).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    out_shape = [d if isinstance(d, int) else shapes[0][0] for d in sess.get_outputs()[0].shape]
    state = {"sums": [np.zeros(s, np.float32) for s in shapes], "total": np.zeros(out_shape, np.float32),
             "count": np.zeros((shapes[0][0], 1), np.float32)}

    def step(*xs: np.ndarray) -> np.ndarray:
        feed = {**{f"x{i}": x.astype(np.float32) for i, x in enumerate(xs)},
                **{f"sum{i}": s for i, s in enumerate(state["sums"])},
                "total": state["total"], "count": state["count"], **consts}
        y, *rest = sess.run(None, feed)
        state["sums"], state["total"], state["count"] = rest[:len(xs)], rest[-2], rest[-1]
        return y

    return step


def _softmax(m: np.ndarray) -> np.ndarray:
    e = np.exp(m - m.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _layernorm(m: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mu = m.mean(axis=-1, keepdims=True)
    return (m - mu) / np.sqrt(((m - mu) ** 2).mean(axis=-1, keepdims=True) + eps) * scale + bias


def test_function_body_subtracts_the_row_max_and_guards_only_guarded_ops() -> None:
    """Structure: Softmax's body shifts its mean by ReduceMax; Div's has the finite guard, Sigmoid's not."""
    soft = compensated_function("S", helper.make_node("Softmax", ["a"], ["y"], axis=-1), [0], {"": 17})
    assert [n.op_type for n in soft.node][-5:-2] == ["ReduceMax", "Sub", "Softmax"]
    div = compensated_function("D", helper.make_node("Div", ["a", "b"], ["y"]), [0, 1], {"": 17})
    assert {"IsNaN", "IsInf", "Where"} <= {n.op_type for n in div.node} and "Div" in GUARDED
    sig = compensated_function("G", helper.make_node("Sigmoid", ["a"], ["y"]), [0], {"": 17})
    assert "Where" not in {n.op_type for n in sig.node}


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_softmax_stable_for_huge_logits(opset: int, scale: float) -> None:
    """Logits up to ±1e4 (and ±1e30) whose per-step increments swing by ±50%: finite at
    every step, Σy = t·softmax(mean) to 1e-5·t."""
    step = _stepper(helper.make_node("Softmax", ["a"], ["y"], axis=-1), [0], {}, opset, [[ROWS, WIDTH]])
    rng = np.random.default_rng(0)
    logits = (rng.choice([-1.0, 1.0], size=(ROWS, WIDTH)) * rng.random((ROWS, WIDTH)) * scale).astype(np.float32)
    emitted, seen = np.zeros((ROWS, WIDTH)), np.zeros((ROWS, WIDTH))
    for t in range(1, 33):
        # the increments alternate around the logits so that the running mean stays within them
        x = logits * (1.5 if t % 2 else 0.5)
        y = step(x)
        assert np.all(np.isfinite(y)), t
        emitted += y
        seen += x.astype(np.float64)
        want = t * _softmax(seen / t)
        np.testing.assert_allclose(emitted, want, atol=1e-5 * t, err_msg=f"t = {t}")


@pytest.mark.parametrize("form", ["op", "function"])
def test_layernorm_constant_rows_with_swinging_steps(form: str) -> None:
    """Rows whose running mean is constant (variance 0) at every even step while each step's
    values swing by ±1e3: epsilon is applied to the variance of the running mean, so the output is
    finite and, at even t, exactly the bias; at odd t it is LayerNorm of the (benign) mean."""
    rng = np.random.default_rng(1)
    scale, bias = rng.normal(size=WIDTH).astype(np.float32), rng.normal(size=WIDTH).astype(np.float32)
    consts = {"scale": scale, "bias": bias}
    if form == "op":
        inner, opset = helper.make_node("LayerNormalization", ["a", "scale", "bias"], ["y"], axis=-1,
                                        epsilon=1e-5), 17
    else:  # the canonical function opsets 13..16 get (canonicalize_activations): epsilon is an input
        inner, opset = helper.make_node("LayerNormalization", ["a", "scale", "bias", "eps"], ["y"],
                                        domain=ACTIVATION_DOMAIN), 13
        consts["eps"] = np.array(1e-5, np.float32)
    step = _stepper(inner, [0], consts, opset, [[ROWS, WIDTH]])
    # integers and quarters: the running sums are exact in float32, so at even t the mean is
    # exactly constant along each row (with 1e3-sized swings that are not, rounding leaves ~1e-4
    # of spread, which LayerNorm's 1/sqrt(eps) = 316 amplifies, as it would in the ANN)
    level = (rng.integers(-8, 8, size=(ROWS, 1)) / 4).astype(np.float32)
    swing = rng.integers(1, 1000, size=(ROWS, WIDTH)).astype(np.float32)
    emitted, seen = np.zeros((ROWS, WIDTH)), np.zeros((ROWS, WIDTH))
    for t in range(1, 41):
        x = level + (swing if t % 2 else -swing)
        y = step(x)
        assert np.all(np.isfinite(y)), t
        emitted += y
        seen += x
        if t % 2 == 0:
            np.testing.assert_allclose(emitted / t, np.broadcast_to(bias, (ROWS, WIDTH)), atol=2e-3, err_msg=f"t = {t}")
        else:
            np.testing.assert_allclose(emitted / t, _layernorm(seen / t, scale, bias, 1e-5), atol=2e-3,
                                       err_msg=f"t = {t}")


def _domain_cases() -> dict[str, tuple[onnx.NodeProto, list[int], Callable[..., np.ndarray]]]:
    """Ops whose running mean starts outside their domain (a spike train that has not fired yet)."""
    return {
        "Div": (helper.make_node("Div", ["a", "b"], ["y"]), [0, 1], lambda a, b: a / b),
        "Reciprocal": (helper.make_node("Reciprocal", ["b"], ["y"]), [0], lambda b: 1 / b),
        "Log": (helper.make_node("Log", ["b"], ["y"]), [0], np.log),
        "Sqrt": (helper.make_node("Sqrt", ["b"], ["y"]), [0], np.sqrt),
        "Pow": (helper.make_node("Pow", ["b", "e"], ["y"]), [0], lambda b: b ** np.float32(-0.5)),
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the numpy reference outside the op's domain (masked)
@pytest.mark.parametrize("name", list(_domain_cases()))
def test_guard_holds_until_the_mean_is_in_the_domain(name: str) -> None:
    """The denominator / argument is a spike train that has not fired in the first step(s) (its
    mean is 0, and -1e-7 at step 2 for Sqrt and Log, as rounding may leave it); each step's
    increment stays finite and, once the mean is in the op's domain, Σy = t·f(mean) again: the
    ANN (f of the converged mean) is finite, so the SNN converges to it."""
    inner, varying, f = _domain_cases()[name]
    consts = {"e": np.array(-0.5, np.float32)} if name == "Pow" else {}
    shapes = [[ROWS, WIDTH]] * len(varying)
    step = _stepper(inner, varying, consts, 17, shapes)
    rng = np.random.default_rng(2)
    rate = (0.2 + 0.7 * rng.random((ROWS, WIDTH))).astype(np.float32)
    a = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    emitted, seen = np.zeros((ROWS, WIDTH)), np.zeros((ROWS, WIDTH))
    for t in range(1, 65):
        if t == 2 and name in ("Sqrt", "Log"):  # what rounding may leave of a mean of 0
            b = np.full((ROWS, WIDTH), -1e-7, np.float32)
        else:  # a rate-coded spike train that has not fired before step 2
            b = (np.floor(rate * (t - 1)) - np.floor(rate * max(t - 2, 0))).astype(np.float32)
        y = step(a, b) if len(varying) == 2 else step(b)
        assert np.all(np.isfinite(y)), (name, t)
        emitted += y
        seen += b
        spikes = seen / t
        ok = spikes > 0
        if ok.any():
            want = t * (f(a.astype(np.float64), spikes) if len(varying) == 2 else f(spikes))
            np.testing.assert_allclose(emitted[ok], want[ok], rtol=1e-4, atol=1e-4 * t, err_msg=f"{name} at t = {t}")
    # the running mean has converged near the rate; the readout converges to the ANN's value
    final = (f(a.astype(np.float64), rate) if len(varying) == 2 else f(rate.astype(np.float64)))
    assert np.abs(emitted / 64 - final).max() < 0.15 * np.abs(final).max()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_unguarded_division_would_poison_the_stream() -> None:
    """Why the guard exists: without it, a first step dividing by a mean of 0 emits inf, and the
    next step's increment finite − inf poisons every running sum after it (numpy reference)."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    for guarded, finite in ((False, False), (True, True)):
        state = ([np.zeros_like(a), np.zeros_like(a)], np.zeros_like(a), np.zeros((ROWS, 1), np.float32))
        downstream = np.zeros_like(a)
        for b in (np.zeros_like(a), np.ones_like(a), np.ones_like(a)):
            y, *state = compensated_reference(lambda m, d: m / d, [a, b], *state, guarded=guarded)
            downstream += y
        assert bool(np.all(np.isfinite(downstream))) is finite


# -- compiled models --------------------------------------------------------------------------------

def _div_model(offset: float) -> onnx.ModelProto:
    """x -> Gemm -> Relu = r; Div(x, r + offset) -> Gemm -> y. With offset 0 and calibration data
    for which r is 0, the ANN itself divides by 0."""
    rng = np.random.default_rng(4)
    w1 = np.abs(rng.normal(size=(WIDTH, WIDTH))).astype(np.float32)
    w2 = rng.normal(size=(WIDTH, 4)).astype(np.float32)
    inits = [helper.make_tensor("w1", TensorProto.FLOAT, w1.shape, w1.ravel()),
             helper.make_tensor("b1", TensorProto.FLOAT, [WIDTH], np.full(WIDTH, 0.5, np.float32)),
             helper.make_tensor("w2", TensorProto.FLOAT, w2.shape, w2.ravel()),
             helper.make_tensor("off", TensorProto.FLOAT, [], [offset])]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["z"], name="fc1"),
             helper.make_node("Relu", ["z"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "off"], ["d"], name="shift"),
             helper.make_node("Div", ["x", "d"], ["q"], name="divide"),
             helper.make_node("Gemm", ["q", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "div", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _compile(model: onnx.ModelProto, calib: np.ndarray) -> onnx.ModelProto:
    logging.getLogger("ann2snn").setLevel(logging.ERROR)
    try:
        return ann2snn.compile(model, {"x": calib}, nonlinear="compensate")
    finally:
        logging.getLogger("ann2snn").setLevel(logging.NOTSET)


def test_division_by_a_spike_train_converges() -> None:
    """Div(x, Relu(...)): positive on the data (the ANN is finite), but the neuron has not fired
    in the first steps, so the compensated Div starts from a mean of 0. The SNN stays finite at
    every T and converges to the ANN."""
    rng = np.random.default_rng(5)
    x = np.abs(rng.normal(size=(64, WIDTH))).astype(np.float32)
    model = _div_model(0.0)
    snn = _compile(model, x)
    assert [e["op"] for e in model_metadata(snn)["compensated"]] == ["Div"]
    ann = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    session = SpikingSession(snn)
    errors = []
    for T in (1, 2, 4, 16, 64, 256):
        got = session.run({"x": x}, T=T)["y"]
        assert np.all(np.isfinite(got)), T
        errors.append(float(np.abs(got - ann).mean() / np.abs(ann).mean()))
    assert errors[-1] < 0.05 and errors[-1] < errors[2], errors


def test_op_with_non_finite_ann_output_is_refused_by_name() -> None:
    """Calibration data on which Relu gives 0: the ANN's Div is inf there, so nothing finite to
    converge to: compile refuses, naming the node, the problem and the remedy."""
    rng = np.random.default_rng(6)
    x = -np.abs(rng.normal(size=(16, WIDTH))).astype(np.float32) - 1.0  # z = x·|w1| + 0.5 < 0: Relu gives 0
    with pytest.raises(ann2snn.UnsupportedModelError,
                       match=r"node 'divide' \(ai.onnx::Div\) gives \d+ of \d+ values inf / NaN in the ANN itself.*"
                             r"--spiking-until x"):
        _compile(_div_model(0.0), x)
    _compile(_div_model(1.0), x)  # with an epsilon the same model compiles
