"""The runtime's fast execution forms agree with the plain step-by-step execution.

Reference: the whole step graph run once per step (the path probes use). Compared: the
``step`` form (time-constant prefix once, reduced step graph, IOBinding of the states) and
the ``layered`` form (chunks of timesteps batched per layer). Both are built from the same
step graph at load time; arithmetic per element is the same, so readouts agree to float
rounding (spike counts could flip at exact threshold ties, hence the tolerance).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS, residual_net
from onnx import helper

import ann2snn
from ann2snn.errors import ConfigError
from ann2snn.runtime import SpikingSession
from ann2snn.runtime.forms import StepPlan, run_layered, run_steps
from ann2snn.runtime.ops import DOMAIN, if_neuron_function


@pytest.fixture(scope="module")
def resnet_snn() -> onnx.ModelProto:
    calib = np.random.default_rng(1).uniform(0, 1, (128, 1, 8, 8)).astype(np.float32)
    return ann2snn.compile(residual_net(), {"x": calib}, iters=20, batch=32)


@pytest.fixture(scope="module")
def digits_snn() -> onnx.ModelProto:
    with np.load(MODELS / "data" / "digits_calib.npz") as z:
        return ann2snn.compile(MODELS / "digits_cnn.onnx", z["input"], iters=20, batch=32)


def _reference(snn: onnx.ModelProto, x: dict[str, np.ndarray], Ts: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """The plain path: the whole step graph every step (forced by asking for a probe)."""
    ref = SpikingSession(snn, mode="step", probes=[SpikingSession(snn).spike_tensors[0]])
    return ref.run_many(x, Ts)


def _assert_close(a: dict[int, dict[str, np.ndarray]], b: dict[int, dict[str, np.ndarray]]) -> None:
    assert a.keys() == b.keys()
    for T in a:
        for name in a[T]:
            scale = max(float(np.abs(a[T][name]).max()), 1e-6)
            np.testing.assert_allclose(b[T][name], a[T][name], rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("mode,chunk", [("step", None), ("layered", 1), ("layered", 8), ("layered", 64), ("auto", None)])
def test_fast_forms_match_the_step_graph_on_digits(digits_snn, mode: str, chunk: int | None) -> None:
    with np.load(MODELS / "data" / "digits_test.npz") as z:
        x = {"input": z["input"][:6]}
    Ts = [3, 17, 40]  # not multiples of the chunk: the last chunk is partial
    _assert_close(_reference(digits_snn, x, Ts), SpikingSession(digits_snn, mode=mode, chunk=chunk).run_many(x, Ts))


@pytest.mark.parametrize("batch", [1, 5])
def test_layered_handles_residual_adds_and_cumulative_maxpool(resnet_snn, batch: int) -> None:
    meta_states = {s["init"] == "zeros" for s in SpikingSession(resnet_snn).meta["states"]}
    assert True in meta_states, "the fixture should contain a cumulative max pool"
    session = SpikingSession(resnet_snn, mode="layered", chunk=7)
    assert session._plan.refusal is None
    x = {"x": np.random.default_rng(2).uniform(0, 1, (batch, 1, 8, 8)).astype(np.float32)}
    _assert_close(_reference(resnet_snn, x, [4, 30]), session.run_many(x, [4, 30]))


def test_prefix_holds_the_time_constant_first_layer(resnet_snn) -> None:
    plan = SpikingSession(resnet_snn)._plan
    ops = [n.op_type for n in plan.prefix_nodes]
    assert "Sub" in ops and "Conv" in ops  # normalisation and the first convolution
    assert all(n.domain != DOMAIN for n in plan.prefix_nodes)


@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("mode,chunk", [("step", None), ("layered", 4)])
def test_states_after_run_are_the_final_states(digits_snn, mode: str, chunk: int | None, unit: bool) -> None:
    """The states left in the session are the step graph's (the unit-threshold kernel changes
    no arithmetic: equal bit for bit)."""
    with np.load(MODELS / "data" / "digits_test.npz") as z:
        x = {"input": z["input"][:3]}
    ref = SpikingSession(digits_snn, mode="step", probes=[SpikingSession(digits_snn).spike_tensors[0]])
    ref.run(x, 9)
    fast = SpikingSession(digits_snn, mode=mode, chunk=chunk, unit_thresholds=unit)
    fast.run(x, 9)
    assert fast._states.keys() == ref._states.keys()
    for name, value in ref._states.items():
        np.testing.assert_array_equal(fast._states[name], value)


def test_on_step_and_streaming_still_see_every_step(digits_snn) -> None:
    with np.load(MODELS / "data" / "digits_test.npz") as z:
        x = z["input"][:2]
    session = SpikingSession(digits_snn, mode="auto")
    seen: list[int] = []
    by_T = session.run_many({"input": x}, [12], on_step=lambda t, _: seen.append(t))
    assert seen == list(range(12))
    session.reset(2)
    for _ in range(12):
        session.step({"input": x})
    np.testing.assert_allclose(session.readout()["logits"], by_T[12]["logits"], rtol=1e-6, atol=1e-6)


def test_auto_picks_layered_only_for_small_batches(digits_snn) -> None:
    session = SpikingSession(digits_snn, mode="auto")
    assert session._layered_chunk(1, 128) == 32
    assert session._layered_chunk(32, 128) is None
    assert SpikingSession(digits_snn, mode="step")._layered_chunk(1, 128) is None
    assert SpikingSession(digits_snn, mode="layered", chunk=5)._layered_chunk(64, 128) == 5


def test_bad_mode_and_chunk_are_config_errors(digits_snn) -> None:
    with pytest.raises(ConfigError, match="mode must be one of"):
        SpikingSession(digits_snn, mode="fast")
    with pytest.raises(ConfigError, match="chunk must be a positive"):
        SpikingSession(digits_snn, chunk=0)


def _step_graph_with(op_after_if: onnx.NodeProto) -> tuple[onnx.ModelProto, list[tuple[str, str, tuple[int, ...]]]]:
    """A hand-made step graph: Gemm -> IFNeuron -> ``op_after_if`` -> Gemm."""
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["z"], transB=1, name="gemm"),
             helper.make_node("IFNeuron", ["z", "v", "theta"], ["s", "v_next"], domain=DOMAIN, name="if"),
             op_after_if,
             helper.make_node("Gemm", ["s2", "W2", "b2"], ["y"], transB=1, name="out")]
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             [("W", rng.normal(size=(4, 4))), ("b", np.zeros(4)), ("theta", np.ones(4)),
              ("W2", rng.normal(size=(2, 4))), ("b2", np.zeros(2))]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4]),
                                           helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("v_next", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(if_neuron_function(17))
    return model, [("v", "v_next", (4,))]


def test_layered_refuses_ops_that_mix_samples() -> None:
    ok, states = _step_graph_with(helper.make_node("Relu", ["s"], ["s2"], name="relu"))
    assert StepPlan(ok, states, ["y"], ort.SessionOptions()).refusal is None
    mixing, states = _step_graph_with(helper.make_node("Transpose", ["s"], ["s2"], perm=[1, 0], name="t"))
    plan = StepPlan(mixing, states, ["y"], ort.SessionOptions())
    assert plan.refusal is not None and "batch axis" in plan.refusal


def test_states_updated_in_place_are_exactly_the_safe_ones(resnet_snn) -> None:
    """IF membranes and running sums are rewritten in their own buffer; a running max is read
    after its next value is written (the increment), so it keeps two buffers."""
    session = SpikingSession(resnet_snn, mode="step")
    plan = session._plan
    kinds = {s["input"]: ("if" if s["init"] != "zeros" else "pool") for s in session.meta["states"]}
    maxes = {s for s in kinds if s.endswith("/max")}
    assert maxes and not maxes & plan.inplace
    assert {s for s, k in kinds.items() if k == "if"} <= plan.inplace
    assert {s for s in kinds if s.endswith("/acc")} <= plan.inplace
    x = {"x": np.random.default_rng(3).uniform(0, 1, (3, 1, 8, 8)).astype(np.float32)}
    _assert_close(_reference(resnet_snn, x, [2, 9]), session.run_many(x, [2, 9]))
    ref = SpikingSession(resnet_snn, mode="step", probes=[session.spike_tensors[0]])
    ref.run(x, 9)
    for name, value in ref._states.items():  # the buffers left in the session hold the final states
        np.testing.assert_allclose(session._states[name], value, rtol=0, atol=1e-5)


def test_timed_mode_times_both_forms_once_per_batch_and_keeps_the_results(digits_snn) -> None:
    with np.load(MODELS / "data" / "digits_test.npz") as z:
        x = {"input": z["input"][:2]}
    session = SpikingSession(digits_snn, mode="timed")
    first = session.run_many(x, [5, 20])
    assert list(session.auto_choices) == [(2, 16)] and session.auto_choices[(2, 16)] in ("layered", "step")
    _assert_close(_reference(digits_snn, x, [5, 20]), first)
    _assert_close(first, session.run_many(x, [5, 20]))  # the decision is reused, not re-timed
    assert list(session.auto_choices) == [(2, 16)]


def _rank3_step_graph(ops: list[onnx.NodeProto], extra: dict[str, np.ndarray] | None = None
                      ) -> tuple[onnx.ModelProto, list[tuple[str, str, tuple[int, ...]]]]:
    """A hand-made step graph on [N, 2, 4] tokens: MatMul -> IFNeuron -> ``ops`` (reading ``s``,
    the last one writing ``y``, the step output)."""
    rng = np.random.default_rng(0)
    values = {"W": rng.normal(size=(4, 4)), "theta": np.ones(4), **(extra or {})}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="proj"),
             helper.make_node("IFNeuron", ["z", "v", "theta"], ["s", "v_next"], domain=DOMAIN, name="if"), *ops]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 4]),
                                           helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, ["N", 2, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("v_next", onnx.TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in values.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(if_neuron_function(17))
    return model, [("v", "v_next", (2, 4))]


_LN = {"scale": np.ones(4), "bias": np.zeros(4)}
#: (ops after the neuron, their constants, the refusal's words or None where the layered form applies)
PER_SAMPLE_CASES = {
    "layernorm": ([helper.make_node("LayerNormalization", ["s", "scale", "bias"], ["y"], axis=-1, name="ln")], _LN, None),
    "layernorm-axis0": ([helper.make_node("LayerNormalization", ["s", "scale", "bias"], ["y"], axis=0, name="ln")], _LN,
                        "LayerNormalization along the batch axis"),
    "softmax": ([helper.make_node("Softmax", ["s"], ["y"], axis=2, name="sm")], {}, None),
    "softmax-axis-3": ([helper.make_node("Softmax", ["s"], ["y"], axis=-3, name="sm")], {}, "Softmax along the batch axis"),
    "erf-hardswish-prelu": ([helper.make_node("Erf", ["s"], ["e"], name="erf"),
                             helper.make_node("HardSwish", ["e"], ["h"], name="hs"),
                             helper.make_node("PRelu", ["h", "slope"], ["y"], name="prelu")],
                            {"slope": np.full(4, 0.1)}, None),
    "reducemean": ([helper.make_node("ReduceMean", ["s"], ["y"], axes=[-1], name="rm")], {}, None),
    "reducemean-batch": ([helper.make_node("ReduceMean", ["s"], ["y"], axes=[0, 2], name="rm")], {},
                         "ReduceMean on the batch axis"),
    "reducemean-all": ([helper.make_node("ReduceMean", ["s"], ["y"], name="rm")], {}, "over every axis"),
    "matmul-qk": ([helper.make_node("Transpose", ["s"], ["st"], perm=[0, 2, 1], name="t"),
                   helper.make_node("MatMul", ["s", "st"], ["y"], name="qk")], {}, None),
    "matmul-rows": ([helper.make_node("Flatten", ["s"], ["f"], axis=1, name="flat"),
                     helper.make_node("Transpose", ["f"], ["ft"], perm=[0, 1], name="t"),
                     helper.make_node("MatMul", ["f", "ft"], ["y"], name="mm")], {}, "MatMul of two varying"),
    "transpose-default": ([helper.make_node("Transpose", ["s"], ["y"], name="t")], {}, "Transpose moves the batch"),
}


@pytest.mark.parametrize("case", PER_SAMPLE_CASES)
def test_per_sample_checks_of_the_transformer_ops(case: str) -> None:
    """The ops of issue 16's networks are batched over the chunk unless an attribute or an
    operand would mix the samples (then the layered form is refused, naming the node); where
    accepted, the layered form gives the reference's outputs."""
    ops, extra, refusal = PER_SAMPLE_CASES[case]
    model, states = _rank3_step_graph(ops, extra)
    plan = StepPlan(model, states, ["y"], ort.SessionOptions())
    if refusal is not None:
        assert plan.refusal is not None and refusal in plan.refusal and ops[-1].name in plan.refusal, plan.refusal
        return
    assert plan.refusal is None, plan.refusal
    x = {"x": np.random.default_rng(1).uniform(-1, 2, (3, 2, 4)).astype(np.float32)}
    def rest() -> dict[str, np.ndarray]:  # the step form updates its states in place
        return {"v": np.full((3, 2, 4), 0.5, np.float32)}

    stepped = [o[0].copy() for o in run_steps(plan, x, rest(), 5)]
    layered = [o[0] for o in run_layered(plan, x, rest(), 5, 3)]
    assert len(stepped) == len(layered) == 5
    for a, b in zip(stepped, layered):
        np.testing.assert_array_equal(a, b)


def _compensated_step_graph(inner: onnx.NodeProto) -> tuple[onnx.ModelProto, list[tuple[str, str, tuple[int, ...]]]]:
    """MatMul -> IFNeuron -> the expectation-compensated ``inner`` (reading ``s``) -> ``y``, with
    the op's running sum, total and step count as states (as passes/_compensation.py emits)."""
    from ann2snn.runtime.compensation import compensated_function

    from ann2snn.runtime.compensation import step_counter_nodes

    fn = compensated_function("ExpectationCompensatedTest", inner, [0], {"": 17})
    rng = np.random.default_rng(0)
    counter, counter_inits, t_of = step_counter_nodes("count", "count_next", [3])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="proj"),
             helper.make_node("IFNeuron", ["z", "v", "theta"], ["s", "v_next"], domain=DOMAIN, name="if"),
             *counter,
             helper.make_node(fn.name, ["s", "sum0", "total", t_of[3], t_of[3]], ["y", "sum0_next", "total_next"],
                              domain=DOMAIN, name="ec")]
    shapes = {"v": (2, 4), "sum0": (2, 4), "total": (2, 4), "count": (1,)}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", *shape])
                     for n, shape in {"x": (2, 4), **shapes}.items()],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y", *(f"{s}_next" for s in shapes))],
        [onnx.numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "W"),
         onnx.numpy_helper.from_array(np.full(4, 0.7, np.float32), "theta"), *counter_inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.functions.extend([if_neuron_function(17), fn])
    return model, [(n, f"{n}_next", shape) for n, shape in shapes.items()]


@pytest.mark.parametrize("inner,at_once", [
    (helper.make_node("Softmax", ["s"], ["y"], axis=-1), True),
    (helper.make_node("Sqrt", ["s"], ["y"]), False),  # guarded: a total kept where not finite links the steps
    (helper.make_node("Softmax", ["s"], ["y"], axis=0), False),  # mixes the samples: stepped one copy per step
], ids=["softmax", "sqrt-guarded", "softmax-batch-axis"])
def test_compensated_op_runs_its_chunk_at_once_or_unrolled(inner: onnx.NodeProto, at_once: bool) -> None:
    """An expectation-compensated op runs all steps of a chunk at once (running sums by CumSum,
    the op on every row, increments as differences of the totals) where nothing but its running
    sums and count links the steps and the op acts per sample; else it is unrolled. Either way
    the step outputs and the states after the chunk are the step form's, bit for bit."""
    model, states = _compensated_step_graph(inner)
    plan = StepPlan(model, states, ["y"], ort.SessionOptions())
    assert plan.refusal is None, plan.refusal
    assert (plan.cuts["ec"].body is not None) == at_once
    x = {"x": np.random.default_rng(1).uniform(-1, 2, (3, 2, 4)).astype(np.float32)}

    def rest() -> dict[str, np.ndarray]:
        return {n: np.full((3, *shape), 0.35 if n == "v" else 0.0, np.float32) for n, _, shape in states}

    after_steps, after_chunks = rest(), rest()
    stepped = [o[0].copy() for o in run_steps(plan, x, after_steps, 7)]
    layered = [o[0] for o in run_layered(plan, x, after_chunks, 7, 3)]  # chunks of 3, 3 and 1 steps
    assert len(stepped) == len(layered) == 7 and np.abs(stepped[-1]).max() > 0
    for a, b in zip(stepped, layered):
        np.testing.assert_array_equal(a, b)
    for name in after_steps:
        np.testing.assert_array_equal(after_steps[name], after_chunks[name])
