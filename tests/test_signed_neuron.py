"""The signed IF neuron (``neuron="signed"``): op vs reference, its tracking property, and the
compiler, runtime, report and NIR paths that meet it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ann2snn
from ann2snn.errors import ConfigError
from ann2snn.runtime import SpikingSession
from ann2snn.runtime.ops import DOMAIN, SIGNED_OP, signed_if_neuron_function, signed_if_neuron_reference
from conftest import MODELS, neuron_op_model, run_ort

DIGITS = MODELS / "digits_cnn.onnx"
DIGITS_CALIB = MODELS / "data" / "digits_calib.npz"
DIGITS_TEST = MODELS / "data" / "digits_test.npz"


def signed_model(shape: list[int], opset: int = 17) -> onnx.ModelProto:
    return neuron_op_model(signed_if_neuron_function(opset), {n: shape for n in ("i", "v", "c", "th")},
                           ["s", "v2", "c2"], shape, opset)


def test_signed_op_takes_back_a_spike_only_after_one_was_fired() -> None:
    model = signed_model([2])
    one = np.ones(2, np.float32)
    # both membranes drop below 0; only the neuron with a positive count answers with -1
    s, v2, c2 = run_ort(model, {"i": np.array([-0.8, -0.8], np.float32), "v": np.array([0.5, 0.5], np.float32),
                                "c": np.array([1.0, 0.0], np.float32), "th": one})
    np.testing.assert_array_equal(s, [-1.0, 0.0])
    np.testing.assert_allclose(v2, [0.7, -0.3], atol=1e-6)
    np.testing.assert_array_equal(c2, [0.0, 0.0])


def assert_count_tracks_rounded_input(xs: list[float], theta: float, step) -> None:
    """``step(current, v, count, θ) -> (spikes, v, count)`` from v(0) = θ/2: after every step the
    net count is max(0, round(Σ current / θ))."""
    th = np.float32(theta)
    v, c = np.float32(theta / 2), np.float32(0)
    total = 0.0
    for x in xs:
        cur = np.float32(x * theta)
        total += float(cur)
        _, v, c = step(cur, v, c, th)
        ideal = total / float(th) + 0.5
        # float rounding may flip a count that sits exactly on a rounding boundary
        if abs(ideal - round(ideal)) > 1e-4:
            assert c == max(0, int(np.floor(ideal)))


@settings(max_examples=80, deadline=None)
@given(xs=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=60), theta=st.floats(0.25, 2.0))
def test_signed_count_tracks_the_rounded_cumulative_input(xs: list[float], theta: float) -> None:
    """With |current| <= θ the signed neuron's count is the rounded cumulative input at every
    step: the property plain IF neurons only have for constant inputs."""
    assert_count_tracks_rounded_input(xs, theta, signed_if_neuron_reference)


def test_signed_neuron_recovers_from_an_early_surplus() -> None:
    """A current that is +θ for 8 steps, then -θ/2 for 16: the ANN's mean is 0. Plain IF keeps its
    8 spikes; the signed neuron takes them back."""
    th = np.float32(1.0)
    plain_v, v, c = np.float32(0.5), np.float32(0.5), np.float32(0)
    plain = 0.0
    from ann2snn.runtime.ops import if_neuron_reference
    for x in [1.0] * 8 + [-0.5] * 16:
        s, plain_v = if_neuron_reference(np.float32(x), plain_v, th)
        plain += float(s)
        _, v, c = signed_if_neuron_reference(np.float32(x), v, c, th)
    assert plain == 8 and c == 0


@pytest.fixture(scope="module")
def signed_snn() -> onnx.ModelProto:
    return ann2snn.compile(DIGITS, DIGITS_CALIB, neuron="signed", iters=20)


def test_compile_emits_signed_neurons_with_a_count_state(signed_snn: onnx.ModelProto) -> None:
    meta = json.loads({p.key: p.value for p in signed_snn.metadata_props}["ann2snn"])
    ops = {n.op_type for n in signed_snn.graph.node if n.domain == DOMAIN}
    assert ops == {SIGNED_OP}
    assert meta["config"]["neuron"] == "signed" and meta["readout"]["t0"] == 0
    states = {s["input"]: s for s in meta["states"]}
    for n in meta["neurons"]:
        assert n["op"] == SIGNED_OP and states[n["count_in"]]["init"] == "zeros"
        assert states[n["count_in"]]["output"] == n["count_out"] and states[n["state_in"]]["init"] != "zeros"
    assert {f.name for f in signed_snn.functions} >= {SIGNED_OP}


def test_signed_snn_converges_and_fires_negative_spikes(signed_snn: onnx.ModelProto) -> None:
    with np.load(DIGITS_TEST) as z:
        x = z["input"][:48]
    import onnxruntime as ort
    ann = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    sess = SpikingSession(signed_snn, probes=[n["spikes"] for n in SpikingSession(signed_snn).meta["neurons"]])
    negative = 0
    sess.reset(len(x))
    outs = []
    for _ in range(64):
        outs.append(next(iter(sess.step({"input": x}).values())))
        negative += sum(int((v < 0).sum()) for v in sess.probe_values.values())
    outs = np.stack(outs)
    err = [float(np.abs(outs[:T].mean(0) - ann).mean()) for T in (4, 16, 64)]
    assert negative > 0
    assert err[0] > err[1] > err[2]
    assert (outs[:64].mean(0).argmax(1) == ann.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("chunk", [None, 3])
def test_signed_step_forms_agree(signed_snn: onnx.ModelProto, chunk: int | None) -> None:
    """In-place states, states through numpy, the layered (multi-step) form and auto mode give
    the same outputs and the same final states."""
    with np.load(DIGITS_TEST) as z:
        x = z["input"][:32]
    forms = [SpikingSession(signed_snn, mode="step"), SpikingSession(signed_snn, mode="step"),
             SpikingSession(signed_snn, mode="layered", chunk=chunk), SpikingSession(signed_snn)]
    forms[1].bind = False
    assert forms[2]._plan.cuts is not None and any(c.kind == "signed" for c in forms[2]._plan.cuts.values())
    results = [s.run_many({"input": x}, [8, 32]) for s in forms]
    for r in results[1:]:
        for T in (8, 32):
            for k in results[0][T]:
                np.testing.assert_allclose(r[T][k], results[0][T][k], rtol=0, atol=1e-5)
    for name, value in forms[0]._states.items():
        np.testing.assert_allclose(forms[2]._states[name], value, rtol=0, atol=1e-5)


def test_unknown_neuron_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--neuron"):
        ann2snn.compile(DIGITS, DIGITS_CALIB, neuron="lif")


def test_report_counts_negative_spikes_as_operations(signed_snn: onnx.ModelProto, tmp_path) -> None:
    from ann2snn.analysis.report import SpikeCounter
    counter = SpikeCounter({"s": [3]}, [2], signed=True)
    counter.start()
    counter.on_step(0, {"s": np.array([[1.0, -1.0, 0.0]], np.float32)})
    counter.on_step(1, {"s": np.array([[-1.0, 0.0, 0.0]], np.float32)})
    np.testing.assert_array_equal(counter.totals[2]["s"], [2.0, 1.0, 0.0])


def test_nir_export_names_the_signed_neuron_and_the_fix(signed_snn: onnx.ModelProto, tmp_path) -> None:
    pytest.importorskip("nir")
    from ann2snn.errors import UnsupportedModelError
    from ann2snn.export.nir import export_nir
    with pytest.raises(UnsupportedModelError, match="--neuron if"):
        export_nir(signed_snn, tmp_path / "m.nir")


# -- bursts (--neuron signed --burst N) ---------------------------------------------------------

def burst_model(shape: list[int], opset: int = 17) -> onnx.ModelProto:
    from ann2snn.runtime.ops import signed_burst_if_neuron_function
    return neuron_op_model(signed_burst_if_neuron_function(opset), {**{n: shape for n in ("i", "v", "c", "th")}, "n": []},
                           ["s", "v2", "c2"], shape, opset)


@pytest.mark.parametrize("burst", [None, 1.0, 3.0])
def test_counting_ops_match_reference_on_random_inputs(burst: float | None) -> None:
    """SignedIFNeuron (burst None) and SignedBurstIFNeuron against their numpy references."""
    from ann2snn.runtime.ops import signed_burst_if_neuron_reference
    rng = np.random.default_rng(0)
    shape = [4, 6]
    model = signed_model(shape) if burst is None else burst_model(shape)
    seen = set()
    for _ in range(20):
        i = rng.normal(0, 1 if burst is None else 3, shape).astype(np.float32)
        v = rng.normal(0, 1, shape).astype(np.float32)
        c = rng.integers(0, 4, shape).astype(np.float32)
        th = rng.uniform(0.3, 2, shape).astype(np.float32)
        feeds = {"i": i, "v": v, "c": c, "th": th} | ({} if burst is None else {"n": np.array(burst, np.float32)})
        s, v2, c2 = run_ort(model, feeds)
        rs, rv, rc = (signed_if_neuron_reference(i, v, c, th) if burst is None
                      else signed_burst_if_neuron_reference(i, v, c, th, burst))
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_allclose(v2, rv, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(c2, rc)
        assert np.abs(s).max() <= (burst or 1) and (c2 >= 0).all()
        seen |= set(np.unique(s).tolist())
    assert seen >= ({-1.0, 0.0, 1.0} if burst in (None, 1.0) else {-3.0, -1.0, 0.0, 1.0, 3.0})


@settings(max_examples=80, deadline=None)
@given(xs=st.lists(st.floats(-4.0, 4.0), min_size=1, max_size=40), theta=st.floats(0.25, 2.0))
def test_burst_count_tracks_the_rounded_cumulative_input_at_every_step(xs: list[float], theta: float) -> None:
    """With bursts of up to 6 and |current| <= 4θ the count never lags behind."""
    from ann2snn.runtime.ops import signed_burst_if_neuron_reference
    assert_count_tracks_rounded_input(xs, theta, lambda i, v, c, th: signed_burst_if_neuron_reference(i, v, c, th, 6))


def test_burst_compile_emits_the_burst_op_and_all_forms_agree() -> None:
    from ann2snn.runtime.ops import BURST_OP
    snn = ann2snn.compile(DIGITS, DIGITS_CALIB, neuron="signed", burst=2, iters=20)
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    assert {n.op_type for n in snn.graph.node if n.domain == DOMAIN} == {BURST_OP}
    assert meta["config"]["burst"] == 2 and meta["readout"]["t0"] == 0
    with np.load(DIGITS_TEST) as z:
        x = z["input"][:32]
    forms = [SpikingSession(snn, mode="step"), SpikingSession(snn, mode="step"), SpikingSession(snn, mode="layered")]
    forms[1].bind = False
    probe = SpikingSession(snn, probes=[meta["neurons"][0]["spikes"]])
    probe.reset(len(x))
    biggest = 0.0
    for _ in range(8):
        probe.step({"input": x})
        biggest = max(biggest, float(np.abs(next(iter(probe.probe_values.values()))).max()))
    assert biggest <= 2.0
    results = [s.run_many({"input": x}, [8, 32]) for s in forms]
    for r in results[1:]:
        for T in (8, 32):
            for k in results[0][T]:
                np.testing.assert_allclose(r[T][k], results[0][T][k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("options, flag", [({"burst": 2}, "--neuron signed"), ({"neuron": "signed", "burst": 0}, "--burst"),
                                           ({"neuron": "signed", "burst": 1.5}, "--burst")])
def test_bad_burst_is_a_config_error(options: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ann2snn.compile(DIGITS, DIGITS_CALIB, **options)
