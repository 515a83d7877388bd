"""Signed activation sites (``--signed-sites``) and re-spiked compensated ops (``--respike``):
the symmetric neuron against its reference and its tracking property, convergence of every site
type on a small model in both forms, the runtime forms against the reference, inspect, NIR."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ann2snn
from ann2snn.analysis.inspection import inspect_model
from ann2snn.errors import ConfigError
from ann2snn.runtime import SpikingSession
from ann2snn.runtime.ops import (IF_OP, SYMMETRIC_BURST_OP, SYMMETRIC_OP, SYMMETRIC_OPS, TOTAL_SYMMETRIC_BURST_OP,
                                 TOTAL_SYMMETRIC_OP, UNIT_IF_OP, UNIT_SYMMETRIC_BURST_OP, UNIT_SYMMETRIC_OP,
                                 total_symmetric_if_neuron_function,
                                 symmetric_burst_if_neuron_function, symmetric_burst_if_neuron_reference,
                                 unit_symmetric_burst_if_neuron_function,
                                 symmetric_if_neuron_function, symmetric_if_neuron_reference)
from ann2snn.runtime.reference import model_metadata, reference_run
from conftest import build, neuron_op_model, run_ort

#: Conv -> ReLU -> Conv -> ACT -> Gemm -> ReLU -> Gemm; ACT reads a time-varying current
NET = """
g (float[N,2,6,6] x) => (float[N,3] y) {
  c0 = Conv <pads=[1,1,1,1]> (x, W0, b0)
  r0 = Relu (c0)
  c1 = Conv <pads=[1,1,1,1]> (r0, W1, b1)
  ACT
  f = Flatten (a1)
  h = Gemm <transB=1> (f, W2, b2)
  r2 = Relu (h)
  y = Gemm <transB=1> (r2, W3, b3)
}
"""
ACTS = {
    "LeakyRelu": "a1 = LeakyRelu <alpha=0.1> (c1)",
    "PRelu": "a1 = PRelu (c1, slope)",
    "SiLU": "sg = Sigmoid (c1)\n  a1 = Mul (c1, sg)",
    "HardSwish": "a1 = HardSwish (c1)",
    "Gelu": "d = Div (c1, sqrt2)\n  e = Erf (d)\n  p = Add (e, one)\n  q = Mul (c1, p)\n  a1 = Mul (q, half)",
}


def net(act: str, pool: bool = False) -> onnx.ModelProto:
    """NET with ACT, and with ``pool`` a 2x2 MaxPool after it."""
    rng = np.random.default_rng(1)
    text = NET.replace("ACT", ACTS[act])
    if pool:
        text = text.replace("f = Flatten (a1)", "a2 = MaxPool <kernel_shape=[2,2], strides=[2,2]> (a1)\n  f = Flatten (a2)")
    w = {"W0": rng.normal(0, 0.5, (4, 2, 3, 3)), "b0": rng.normal(0, 0.1, 4), "W1": rng.normal(0, 0.4, (4, 4, 3, 3)),
         "b1": rng.normal(0, 0.2, 4), "W2": rng.normal(0, 0.2, (8, 36 if pool else 144)), "b2": rng.normal(0, 0.1, 8),
         "W3": rng.normal(0, 0.5, (3, 8)), "b3": np.zeros(3)}
    extra = {"PRelu": {"slope": rng.uniform(0.05, 0.3, (4, 1, 1))},
             "Gelu": {"sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5}}.get(act, {})
    return build(text, {**w, **extra})


def data(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, 2, 6, 6)).astype(np.float32)}


def rel_error(snn: onnx.ModelProto, ann: onnx.ModelProto, x: dict[str, np.ndarray], Ts: list[int]) -> dict[int, tuple]:
    ref = run_ort(ann, x)[0]
    out = SpikingSession(snn).run_many(x, Ts)
    return {T: (float(np.abs(out[T]["y"] - ref).mean() / np.abs(ref).mean()),
                float((out[T]["y"].argmax(1) == ref.argmax(1)).mean())) for T in Ts}


# -- the neuron ------------------------------------------------------------------------------

def test_symmetric_op_matches_its_reference() -> None:
    model = neuron_op_model(symmetric_if_neuron_function(17), {n: [5] for n in ("i", "v", "th")}, ["s", "v2"], [5])
    rng = np.random.default_rng(0)
    feeds = {"i": rng.uniform(-2, 2, 5).astype(np.float32), "v": rng.uniform(0, 1, 5).astype(np.float32),
             "th": np.full(5, 0.7, np.float32)}
    for got, want in zip(run_ort(model, feeds), symmetric_if_neuron_reference(feeds["i"], feeds["v"], feeds["th"])):
        np.testing.assert_array_equal(got, want)


@settings(max_examples=80, deadline=None)
@given(xs=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=60), theta=st.floats(0.25, 2.0))
def test_symmetric_count_tracks_the_rounded_cumulative_input(xs: list[float], theta: float) -> None:
    """With |current| <= θ the count is round(Σ current / θ) at every step, for either sign."""
    th = np.float32(theta)
    v, count, total = np.float32(theta / 2), 0.0, 0.0
    for x in xs:
        cur = np.float32(x * theta)
        total += float(cur)
        s, v = symmetric_if_neuron_reference(cur, v, th)
        count += float(s)
        ideal = total / float(th) + 0.5
        if abs(ideal - round(ideal)) > 1e-4:  # float rounding may flip a count on a boundary
            assert count == np.floor(ideal)


def test_symmetric_burst_op_matches_its_reference() -> None:
    model = neuron_op_model(symmetric_burst_if_neuron_function(17), {"i": [7], "v": [7], "th": [7], "m": []},
                            ["s", "v2"], [7])
    rng = np.random.default_rng(0)
    feeds = {"i": rng.uniform(-4, 4, 7).astype(np.float32), "v": rng.uniform(0, 0.5, 7).astype(np.float32),
             "th": np.full(7, 0.5, np.float32), "m": np.array(3, np.float32)}
    got = run_ort(model, feeds)
    want = symmetric_burst_if_neuron_reference(feeds["i"], feeds["v"], feeds["th"], 3)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert np.abs(got[0]).max() == 3 and got[0].min() < -1  # bursts of either sign, capped at 3


def test_symmetric_neurons_fire_as_the_two_comparisons() -> None:
    """clip(floor(v'/θ), -1, 1) (SymmetricIFNeuron, and the burst neuron with N = 1, in ONNX) is
    [v' >= θ] - [v' < 0] away from float ties, on random walks that cross both bounds."""
    plain = neuron_op_model(symmetric_if_neuron_function(17), {n: [64] for n in ("i", "v", "th")}, ["s", "v2"], [64])
    burst = neuron_op_model(symmetric_burst_if_neuron_function(17), {"i": [64], "v": [64], "th": [64], "m": []},
                            ["s", "v2"], [64])
    rng = np.random.default_rng(1)
    th = rng.uniform(0.3, 1.5, 64).astype(np.float32)
    v = (th / 2).astype(np.float32)
    for _ in range(40):
        cur = (rng.uniform(-1, 1, 64) * th).astype(np.float32)
        charged = (v + cur).astype(np.float32)
        want = (charged >= th).astype(np.float32) - (charged < 0).astype(np.float32)
        s1, v1 = run_ort(plain, {"i": cur, "v": v, "th": th})
        s2, v2 = run_ort(burst, {"i": cur, "v": v, "th": th, "m": np.array(1, np.float32)})
        np.testing.assert_array_equal(s1, want)
        np.testing.assert_array_equal(s2, want)
        np.testing.assert_array_equal(v1, v2)
        v = v1


def test_total_neuron_fires_as_the_unit_neuron_on_increments() -> None:
    """UnitSymmetricTotal(Burst)IFNeuron fed running totals with state u = v − total fires as the
    unit neuron fed the increments (v' = u + total = v + increment), up to float rounding."""
    rng = np.random.default_rng(4)
    for burst, most in ((False, 1.0), (True, 3.0)):
        fn = total_symmetric_if_neuron_function(17, burst=burst)
        model = neuron_op_model(fn, {"total": [32], "u": [32], **({"m": []} if burst else {})}, ["s", "u2"], [32])
        unit = neuron_op_model(unit_symmetric_burst_if_neuron_function(17), {"i": [32], "v": [32], "m": []},
                               ["s", "v2"], [32])
        v = u = np.full(32, 0.5, np.float32)
        total = np.zeros(32, np.float32)
        differ = 0
        for _ in range(40):
            inc = rng.uniform(-most, most, 32).astype(np.float32)
            total = (total + inc).astype(np.float32)
            s_unit, v = run_ort(unit, {"i": inc, "v": v, "m": np.array(most, np.float32)})
            s_total, u = run_ort(model, {"total": total, "u": u, **({"m": np.array(most, np.float32)} if burst else {})})
            differ += int((s_unit != s_total).sum())
        assert differ <= 2, differ  # a float tie may flip a spike once


@settings(max_examples=80, deadline=None)
@given(xs=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=60), theta=st.floats(0.25, 2.0),
       most=st.integers(1, 8))
def test_symmetric_burst_count_tracks_the_rounded_cumulative_input(xs: list[float], theta: float, most: int) -> None:
    """With |current| <= N·θ the count of the burst neuron is round(Σ current / θ) at every step."""
    th = np.float32(theta)
    v, count, total = np.float32(theta / 2), 0.0, 0.0
    for x in xs:
        cur = np.float32(x * theta * most)
        total += float(cur)
        s, v = symmetric_burst_if_neuron_reference(cur, v, th, most)
        assert abs(float(s)) <= most
        count += float(s)
        ideal = total / float(th) + 0.5
        if abs(ideal - round(ideal)) > 1e-3:
            assert count == np.floor(ideal)


# -- sites in the compiler ---------------------------------------------------------------------

@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("form", ["output", "input"])
def test_every_site_type_converges(act: str, form: str) -> None:
    """The SNN's output error falls with T and agreement is high at large T (max-norm thresholds)."""
    ann = net(act)
    snn = ann2snn.compile(ann, data(256, 0), signed_sites=form, method="max")
    onnx.checker.check_model(snn, full_check=True)
    meta = model_metadata(snn)
    signed = [n for n in meta["neurons"] if n["op"] in SYMMETRIC_OPS]
    assert len(signed) == 1 and signed[0]["site"] == form and meta["tail"] is None
    # on a compensated op's output the neuron runs in units of θ and integrates the op's scaled
    # totals (the op keeps no total state); a guarded op keeps its increments
    assert signed[0]["op"] == (TOTAL_SYMMETRIC_OP if form == "output" else SYMMETRIC_OP)
    err = rel_error(snn, ann, data(64, 1), [8, 32, 256])
    assert err[256][0] < err[32][0] < err[8][0], err
    assert err[256][0] < 0.08 and err[256][1] >= 0.9, err


def test_auto_makes_leaky_relu_a_site_and_leaves_smooth_activations() -> None:
    """Default ``auto``: LeakyReLU / PReLU are output sites; SiLU ends the spiking part as before."""
    lrelu = model_metadata(ann2snn.compile(net("PRelu"), data(64, 0), iters=5))
    assert [n.get("site") for n in lrelu["neurons"]] == [None, "output", None] and lrelu["tail"] is None
    silu = model_metadata(ann2snn.compile(net("SiLU"), data(64, 0), iters=5))
    assert all("site" not in n for n in silu["neurons"]) and silu["tail"] is not None
    # an option left at its default is not recorded: ReLU models keep their bytes
    assert "signed_sites" not in lrelu["config"] and "respike" not in lrelu["config"]
    assert model_metadata(ann2snn.compile(net("SiLU"), data(64, 0), iters=5, signed_sites="input"))[
        "config"]["signed_sites"] == "input"
    with pytest.raises(ConfigError, match="--signed-sites"):
        ann2snn.CompileConfig(signed_sites="both")


@pytest.mark.parametrize("form", ["output", "input"])
def test_runtime_forms_agree_with_the_reference(form: str) -> None:
    """IF neurons in units of their thresholds beside symmetric ones (in calibrated units on an
    input site, in units of θ after the scaled compensated op on an output site): the step form
    and the layered form (batch 3 and 1) equal the reference."""
    snn = ann2snn.compile(net("Gelu"), data(128, 0), signed_sites=form, iters=20)
    ops = {n.op_type for n in snn.graph.node}
    symmetric = TOTAL_SYMMETRIC_OP if form == "output" else SYMMETRIC_OP
    assert IF_OP in ops and symmetric in ops and model_metadata(snn)["neuron_units"] == "threshold"
    ths = {i.name: onnx.numpy_helper.to_array(i) for i in snn.graph.initializer}
    for n in snn.graph.node:  # IF thresholds are ones, the symmetric neuron's its calibrated θ or none
        if n.op_type == IF_OP:
            assert np.all(ths[n.input[2]] == 1)
        elif n.op_type == SYMMETRIC_OP:
            assert not np.all(ths[n.input[2]] == 1)
        elif n.op_type == TOTAL_SYMMETRIC_OP:
            assert len(n.input) == 2
    assert_forms_match_reference(snn, data(3, 2)["x"], 11)
    assert SpikingSession(snn).run({"x": data(1, 2)["x"]}, T=11)["y"].shape == (1, 3)


def assert_forms_match_reference(snn: onnx.ModelProto, x: np.ndarray, T: int) -> None:
    """The step and layered forms equal the reference run, at batch 3 and 1."""
    for batch in (3, 1):
        feed = {"x": x[:batch]}
        ref = reference_run(snn, feed, T)
        for mode in ("step", "layered"):
            got = SpikingSession(snn, mode=mode, guard=False).run(feed, T=T)
            np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-6)


def test_unit_ops_leave_the_symmetric_neuron_alone() -> None:
    """exact_unit_ops turns only IF neurons with unit thresholds into UnitIFNeuron."""
    from ann2snn.runtime.unitform import exact_unit_ops

    snn = exact_unit_ops(ann2snn.compile(net("LeakyRelu"), data(64, 0), iters=5))
    ops = [n.op_type for n in snn.graph.node]
    assert ops.count(UNIT_IF_OP) == 2 and ops.count(TOTAL_SYMMETRIC_OP) == 1


def test_inspect_shows_sites_and_respiked_ops() -> None:
    ann = net("SiLU")
    rows = {r["node"]: r for r in inspect_model(ann, ann2snn.CompileConfig(signed_sites="output"))["nodes"]}
    silu = [r for r in rows.values() if r["role"] == "neuron" and "signed activation site" in r["detail"]]
    assert len(silu) == 2 and "on its output" in silu[0]["detail"]  # the Sigmoid and the Mul written out
    off = {r["node"]: r for r in inspect_model(ann, ann2snn.CompileConfig(signed_sites="off"))["nodes"]}
    assert any(r["role"] == "tail" and "ends the spiking part" in r["detail"] for r in off.values())
    comp = inspect_model(ann, ann2snn.CompileConfig(signed_sites="off", nonlinear="compensate"))
    respiked = [r for r in comp["nodes"] if r["role"] == "compensated"]
    assert respiked and all("re-spike its output" in r["detail"] for r in respiked), respiked
    assert comp["macs"]["compensated"] == 0
    dense = inspect_model(ann, ann2snn.CompileConfig(signed_sites="off", nonlinear="compensate", respike=False))
    assert dense["macs"]["compensated"] > 0 and not any("re-spike" in r["detail"] for r in dense["nodes"])


def test_respike_puts_a_neuron_after_a_compensated_op() -> None:
    """--nonlinear compensate: the compensated SiLU feeding the Gemm gets a symmetric neuron whose
    spikes the Gemm reads (threshold folded into it); --no-respike leaves the increments."""
    ann = net("SiLU")
    snn = ann2snn.compile(ann, data(128, 0), signed_sites="off", nonlinear="compensate", method="max")
    meta = model_metadata(snn)
    assert [n.get("site") for n in meta["neurons"]] == [None, "output", None]
    dense = model_metadata(ann2snn.compile(ann, data(128, 0), signed_sites="off", nonlinear="compensate",
                                           method="max", respike=False))
    assert len(dense["neurons"]) == 2 and dense["config"]["respike"] is False
    assert meta["macs"]["spiking"] > dense["macs"]["spiking"]
    err = rel_error(snn, ann, data(64, 1), [8, 256])
    assert err[256][0] < err[8][0] and err[256][1] >= 0.9, err


def test_nir_refuses_the_symmetric_neuron(tmp_path) -> None:
    pytest.importorskip("nir")
    from ann2snn.errors import UnsupportedModelError
    from ann2snn.export.nir import export_nir

    for form in ("output", "input"):  # the op comes first in one, the neuron in the other
        snn = ann2snn.compile(net("LeakyRelu"), data(64, 0), iters=5, signed_sites=form)
        first = "expectation-compensated op" if form == "output" else "symmetric signed-spike neuron"
        with pytest.raises(UnsupportedModelError, match=rf"LeakyRelu.*{first}.*--signed-sites off --nonlinear analog"):
            export_nir(snn, tmp_path / "m.nir")


def test_metadata_names_the_site() -> None:
    snn = ann2snn.compile(net("HardSwish"), data(64, 0), signed_sites="input", iters=5)
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    site = [n for n in meta["neurons"] if n["op"] in SYMMETRIC_OPS][0]
    assert site["site"] == "input" and site["source"] in {e["node"] for e in meta["compensated"]}


def test_probe_refuses_signed_sites() -> None:
    from ann2snn.analysis.probe import probe_layers
    from ann2snn.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"LeakyRelu.*signed site.*--signed-sites off"):
        probe_layers(net("LeakyRelu"), data(64, 0), data(4, 1), [4], iters=5)


@pytest.mark.parametrize("act,swapped", [("LeakyRelu", True), ("Gelu", False), ("HardSwish", False)])
def test_maxpool_moves_before_monotone_sites_only(act: str, swapped: bool) -> None:
    """max(f(z)) = f(max(z)) for non-decreasing f only: GELU and HardSwish keep the pool after them,
    and the compiled model still converges to the ANN."""
    from ann2snn.passes.canonicalize_activations import canonicalize_activations
    from ann2snn.passes.find_activations import find_activations
    from ann2snn.passes.swap_maxpool import swap_maxpool
    from conftest import apply

    ann = net(act, pool=True)
    state, _ = apply(ann, canonicalize_activations, find_activations, swap_maxpool, signed_sites="output")
    site = [s for s in state.sites if s.signed][0]
    assert site.shape == ((4, 3, 3) if swapped else (4, 6, 6))
    snn = ann2snn.compile(ann, data(256, 0), signed_sites="output", method="max")
    err = rel_error(snn, ann, data(64, 1), [8, 256])
    assert err[256][0] < err[8][0] and err[256][0] < 0.08, err


def test_channel_axis_looks_past_a_constant_first_bias() -> None:
    """The legacy torch exporter writes a Linear on [N, L, C] as Add(bias, MatMul(x, W)): the
    channels are the last axis whichever input of the Add holds the bias."""
    import onnx_graphsurgeon as gs

    from ann2snn.passes._graph import channel_axis

    for bias_first in (True, False):
        x = gs.Variable("x", np.float32, ["N", 4, 3])
        w = gs.Constant("W", np.ones((3, 5), np.float32))
        b = gs.Constant("b", np.ones(5, np.float32))
        m = gs.Variable("m", np.float32, ["N", 4, 5])
        y = gs.Variable("y", np.float32, ["N", 4, 5])
        gs.Node("MatMul", inputs=[x, w], outputs=[m])
        gs.Node("Add", inputs=[b, m] if bias_first else [m, b], outputs=[y])
        assert channel_axis(y, 3) == 2


def test_resolution_at_signed_sites() -> None:
    """--resolution N at a signed site: the symmetric neuron bursts (up to N spikes of θ/N per
    step) with the calibrated thresholds divided by N, and every runtime form equals the
    reference; IF neurons at the ReLU sites keep their θ. With signed neurons at the ReLU sites
    too, the error at small T falls."""
    ann = net("Gelu")
    plain = ann2snn.compile(ann, data(256, 0), signed_sites="output", method="max")
    fine = ann2snn.compile(ann, data(256, 0), signed_sites="output", method="max", resolution=4)
    meta_p, meta_f = model_metadata(plain), model_metadata(fine)
    site_p = [n for n in meta_p["neurons"] if n.get("site")][0]
    site_f = [n for n in meta_f["neurons"] if n.get("site")][0]
    assert site_p["op"] == TOTAL_SYMMETRIC_OP and site_f["op"] == TOTAL_SYMMETRIC_BURST_OP
    np.testing.assert_allclose(site_f["theta_max"], site_p["theta_max"] / 4, rtol=1e-6)
    relu_p = [n for n in meta_p["neurons"] if not n.get("site")]
    relu_f = [n for n in meta_f["neurons"] if not n.get("site")]
    assert [n["op"] for n in relu_f] == [IF_OP, IF_OP] and [n["theta_max"] for n in relu_f] == [
        n["theta_max"] for n in relu_p]
    limits = [onnx.numpy_helper.to_array(i) for i in fine.graph.initializer if i.name == "ann2snn/max_spikes_per_step"]
    assert len(limits) == 1 and float(limits[0]) == 4
    x = data(64, 1)
    assert_forms_match_reference(fine, x["x"], 9)
    signed = ann2snn.compile(ann, data(256, 0), signed_sites="output", method="max", neuron="signed")
    signed_fine = ann2snn.compile(ann, data(256, 0), signed_sites="output", method="max", neuron="signed",
                                  resolution=4)
    e_p, e_f = rel_error(signed, ann, x, [4, 8]), rel_error(signed_fine, ann, x, [4, 8])
    assert e_f[4][0] < 0.6 * e_p[4][0] and e_f[8][0] < 0.6 * e_p[8][0], (e_p, e_f)


def test_bursts_need_a_neuron_that_can_burst() -> None:
    """--burst / --resolution with IF neurons only is refused before calibration, naming the fix;
    with a signed site and IF neurons at the ReLU sites it is accepted (the site bursts)."""
    relu_only = build(NET.replace("ACT", "a1 = Relu (c1)"), {
        "W0": np.ones((4, 2, 3, 3)), "b0": np.zeros(4), "W1": np.ones((4, 4, 3, 3)), "b1": np.zeros(4),
        "W2": np.ones((8, 144)), "b2": np.zeros(8), "W3": np.ones((3, 8)), "b3": np.zeros(3)})
    for options in ({"burst": 2}, {"resolution": 3}):
        with pytest.raises(ConfigError, match="--neuron signed"):
            ann2snn.compile(relu_only, data(16, 0), **options)
    meta = model_metadata(ann2snn.compile(net("LeakyRelu"), data(64, 0), iters=5, burst=2))
    assert [n["op"] for n in meta["neurons"]] == [IF_OP, TOTAL_SYMMETRIC_BURST_OP, IF_OP]


#: Conv -> ReLU -> Conv (a linear projection) -> + residual -> Conv -> ReLU -> Gemm: the second
#: 3x3 Conv reads the projection's current (no neuron between them)
BOTTLENECK = """
g (float[N,2,6,6] x) => (float[N,3] y) {
  c0 = Conv <pads=[1,1,1,1]> (x, W0, b0)
  r0 = Relu (c0)
  p = Conv (r0, Wp, bp)
  a = Add (p, r0)
  c2 = Conv <pads=[1,1,1,1]> (a, W2, b2)
  r2 = Relu (c2)
  f = Flatten (r2)
  y = Gemm <transB=1> (f, W3, b3)
}
"""


def _bottleneck(respike_currents: bool) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """BOTTLENECK with its weights, and its compile (max-norm thresholds)."""
    rng = np.random.default_rng(3)
    ann = build(BOTTLENECK, {"W0": rng.normal(0, 0.5, (4, 2, 3, 3)), "b0": rng.normal(0, 0.1, 4),
                             "Wp": rng.normal(0, 0.5, (4, 4, 1, 1)), "bp": rng.normal(0, 0.1, 4),
                             "W2": rng.normal(0, 0.3, (4, 4, 3, 3)), "b2": rng.normal(0, 0.1, 4),
                             "W3": rng.normal(0, 0.3, (3, 144)), "b3": np.zeros(3)})
    return ann, ann2snn.compile(ann, data(256, 0), method="max", respike_currents=respike_currents)


def test_respike_currents_puts_linear_bottlenecks_on_spikes() -> None:
    """--respike-currents: the Conv reading the projection's current gets a symmetric neuron on
    that input (a site of kind ``current``), its MACs move from the analog-current share to the
    spiking share (metadata, inspect and report agree), the residual path reads the current
    unchanged, and the SNN converges to the ANN in every runtime form."""
    from ann2snn.analysis.report import report

    ann, plain = _bottleneck(False)
    _, fine = _bottleneck(True)
    meta_p, meta_f = model_metadata(plain), model_metadata(fine)
    assert meta_p["macs"]["analog_current"] > 0 and "analog_current" not in meta_f["macs"]
    assert meta_f["macs"]["spiking"] == meta_p["macs"]["spiking"] + meta_p["macs"]["analog_current"]
    current = [n for n in meta_f["neurons"] if n.get("site") == "current"]
    assert len(current) == 1 and current[0]["op"] == SYMMETRIC_OP and len(meta_f["neurons"]) == len(meta_p["neurons"]) + 1
    assert meta_f["config"]["respike_currents"] is True and "respike_currents" not in meta_p["config"]
    x = data(64, 1)
    assert report(fine, {"x": x["x"][:8]}, [4])["mac_share"] == meta_f["macs"]
    rows = {r["node"]: r for r in inspect_model(ann, ann2snn.CompileConfig(respike_currents=True))["nodes"]}
    conv2 = [r for r in rows.values() if "re-spike the current" in r["detail"]]
    assert len(conv2) == 1 and conv2[0]["role"] == "spiking"
    err = rel_error(fine, ann, x, [8, 32, 256])
    assert err[256][0] < err[32][0] < err[8][0] and err[256][0] < 0.08 and err[256][1] >= 0.9, err
    assert_forms_match_reference(fine, x["x"], 9)


def test_nir_refuses_a_respiked_current_naming_its_option(tmp_path) -> None:
    pytest.importorskip("nir")
    from ann2snn.errors import UnsupportedModelError
    from ann2snn.export.nir import export_nir

    _, snn = _bottleneck(True)
    with pytest.raises(UnsupportedModelError, match=r"re-spiked current.*--no-respike-currents"):
        export_nir(snn, tmp_path / "m.nir")
