"""The cost report: SOP counting against brute force, firing rates, energy, SOPs90/95, the CLI."""
from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

import ann2snn
from ann2snn.cli import main
from ann2snn.analysis.cost import analyse, conv_fanout
from ann2snn.analysis.report import (
    EnergyModel,
    SpikeCounter,
    cmos45_energy,
    paper_energy,
    report,
    sops_at_fraction,
    summarise,
)
from ann2snn.analysis.report_format import format_report
from ann2snn.runtime import SpikingSession
from conftest import CNN_TEXT, MODELS, build, cnn_weights


# -- brute force definitions ---------------------------------------------------------------------

def brute_conv_sops(counts: np.ndarray, w_shape, strides, pads, dil, groups, out_sp, mask=None) -> float:
    """One SOP per (output element, weight tap) whose input element spiked, times its spike count."""
    cin, h, wd = counts.shape
    cout, cin_g, kh, kw = w_shape
    total = 0.0
    for co, oy, ox in product(range(cout), range(out_sp[0]), range(out_sp[1])):
        g = co // (cout // groups)
        for cg, ky, kx in product(range(cin_g), range(kh), range(kw)):
            if mask is not None and not mask[co, cg, ky, kx]:
                continue
            iy, ix = oy * strides[0] - pads[0] + ky * dil[0], ox * strides[1] - pads[1] + kx * dil[1]
            if 0 <= iy < h and 0 <= ix < wd:
                total += counts[g * cin_g + cg, iy, ix]
    return total


def brute_pool_conv_sops(counts: np.ndarray, pool_k, pool_s, pool_p, pool_out, conv_w_shape, conv_p, conv_out) -> float:
    """Spikes -> AveragePool -> Conv (stride 1): one SOP per path spike -> window -> conv tap -> output."""
    c, h, w = counts.shape
    cout, _, kh, kw = conv_w_shape
    total = 0.0
    for co, oy, ox, ci, ky, kx in product(range(cout), range(conv_out[0]), range(conv_out[1]), range(c),
                                          range(kh), range(kw)):
        py, px = oy - conv_p + ky, ox - conv_p + kx
        if not (0 <= py < pool_out[0] and 0 <= px < pool_out[1]):
            continue
        for a, b in product(range(pool_k), range(pool_k)):
            iy, ix = py * pool_s - pool_p + a, px * pool_s - pool_p + b
            if 0 <= iy < h and 0 <= ix < w:
                total += counts[ci, iy, ix]
    return total


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups,hw", [
    (3, 4, 3, 1, 1, 1, 1, (6, 6)),     # padding edges
    (2, 3, 3, 2, 1, 1, 1, (7, 6)),     # stride with an odd size
    (4, 6, 3, 1, 0, 2, 2, (7, 7)),     # dilation, groups
    (4, 4, 2, 2, 0, 1, 4, (5, 5)),     # depthwise, uncovered last row/column
    (6, 6, 5, 3, 2, 1, 3, (9, 8)),     # large kernel, stride 3
])
@pytest.mark.parametrize("nonzero", [False, True])
def test_conv_fanout_matches_brute_force(cin, cout, k, stride, pad, dil, groups, hw, nonzero) -> None:
    rng = np.random.default_rng(cin * 7 + k)
    w = rng.normal(size=(cout, cin // groups, k, k)).astype(np.float32)
    w[rng.uniform(size=w.shape) < 0.3] = 0
    out_sp = [(hw[d] + 2 * pad - dil * (k - 1) - 1) // stride + 1 for d in range(2)]
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride] * 2, pads=[pad] * 4,
                            dilations=[dil] * 2, group=groups)
    fan = conv_fanout(node, w, (cin,) + hw, (cout,) + tuple(out_sp), nonzero_weights=nonzero)
    counts = rng.integers(0, 4, size=(cin,) + hw).astype(np.float64)
    brute = brute_conv_sops(counts, w.shape, [stride] * 2, [pad] * 2, [dil] * 2, groups, out_sp,
                            mask=(w != 0) if nonzero else None)
    assert (counts * fan).sum() == brute
    # one spike at every position: the total fan-out is the number of synapses (MACs of the layer)
    assert fan.sum() == brute_conv_sops(np.ones_like(counts), w.shape, [stride] * 2, [pad] * 2, [dil] * 2, groups,
                                        out_sp, mask=(w != 0) if nonzero else None)


def test_conv_fanout_auto_pad_same() -> None:
    w = np.ones((2, 1, 3, 3), np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER")
    fan = conv_fanout(node, w, (1, 6, 6), (2, 3, 3))
    # SAME_UPPER, in 6, out 3, stride 2: total pad 1 -> 0 before, 1 after
    counts = np.ones((1, 6, 6))
    assert fan.sum() == brute_conv_sops(counts, w.shape, [2, 2], [0, 0], [1, 1], 1, [3, 3])


# -- end to end on small compiled models: counted SOPs == brute force on the probed spikes --------

def _compile(text: str, weights: dict, shape, seed: int = 0) -> onnx.ModelProto:
    model = build(text, weights)
    x = np.random.default_rng(seed).uniform(0, 1, (64,) + shape).astype(np.float32)
    return ann2snn.compile(model, {"x": x}, iters=10, batch=32)


def _spike_counts(snn: onnx.ModelProto, x: np.ndarray, T: int) -> dict[str, np.ndarray]:
    """Spike counts per neuron layer and position, summed over samples and T steps."""
    session = SpikingSession(snn, probes=SpikingSession(snn).spike_tensors)
    totals: dict[str, np.ndarray] = {}

    def on_step(t, values):
        for k, v in values.items():
            totals[k] = totals.get(k, 0) + v.sum(axis=0)
    session.run_many({"x": x}, [T], on_step=on_step)
    return totals


def _layer_sops(result: dict, name: str, T: int) -> float:
    """SOPs per input into one layer; nodes of ONNX text are named op_index (``Conv_2``)."""
    rows = [la for la in result["synaptic_layers"] if la["name"] == name]
    assert len(rows) == 1, [la["name"] for la in result["synaptic_layers"]]
    return rows[0]["by_T"][result["Ts"].index(T)]["sops_per_input"]


CONV_TEXT = """
g (float[N,2,8,8] x, float[6,2,3,3] W1, float[6] b1, float[6,3,3,3] W2, float[6] b2, float[5,96] W3, float[5] b3)
  => (float[N,5] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1, b1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,0,1,1], strides=[2,2], group=2> (r1, W2, b2)
  r2 = Relu (c2)
  f = Flatten <axis=1> (r2)
  y = Gemm <transB=1> (f, W3, b3)
}
"""


def test_conv_and_linear_sops_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    weights = {"W1": rng.normal(0, 0.5, (6, 2, 3, 3)), "b1": rng.normal(0.1, 0.1, 6),
               "W2": rng.normal(0, 0.5, (6, 3, 3, 3)), "b2": rng.normal(0.2, 0.1, 6),
               "W3": rng.normal(0, 0.3, (5, 96)), "b3": np.zeros(5)}
    snn = _compile(CONV_TEXT, weights, (2, 8, 8))
    x = rng.uniform(0, 1, (6, 2, 8, 8)).astype(np.float32)
    T = 12
    result = report(snn, {"x": x}, [4, T], batch_size=4)  # two batches: counts add up across batches
    counts = _spike_counts(snn, x, T)
    s1, s2 = (n["spikes"] for n in SpikingSession(snn).meta["neurons"])
    assert counts[s1].sum() > 0 and counts[s2].sum() > 0
    # conv2: pads top 1, left 0, bottom 1, right 1, stride 2, 2 groups; output 4 x 4
    brute2 = brute_conv_sops(counts[s1], (6, 3, 3, 3), [2, 2], [1, 0], [1, 1], 2, [4, 4])
    assert _layer_sops(result, "Conv_2", T) * len(x) == pytest.approx(brute2)
    # Gemm: every spike drives all 5 outputs
    assert _layer_sops(result, "Gemm_5", T) * len(x) == pytest.approx(counts[s2].sum() * 5)
    # the first conv sees the analog input: MACs, no SOPs; dense: 6 x 2 x 9 taps at 8 x 8 outputs
    first = next(la for la in result["synaptic_layers"] if la["inputs"] == ["analog input"])
    assert first["by_T"][-1]["sops_per_input"] == 0
    assert first["by_T"][-1]["macs_per_input"] == 6 * 2 * 9 * 64


POOL_TEXT = """
g (float[N,2,8,8] x, float[4,2,3,3] W1, float[4] b1, float[3,4,3,3] W2, float[3] b2, float[2,48] W3, float[2] b3)
  => (float[N,2] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1, b1)
  r1 = Relu (c1)
  p = AveragePool <kernel_shape=[KS,KS], strides=[ST,ST], pads=[PD,PD,PD,PD]> (r1)
  c2 = Conv <pads=[1,1,1,1]> (p, W2, b2)
  r2 = Relu (c2)
  f = Flatten <axis=1> (r2)
  y = Gemm <transB=1> (f, W3, b3)
}
"""


@pytest.mark.parametrize("ks,st,pd", [(2, 2, 0), (3, 2, 1)])  # non-overlapping, overlapping with padding
def test_average_pool_sops_match_brute_force(ks, st, pd) -> None:
    rng = np.random.default_rng(1)
    text = POOL_TEXT.replace("KS", str(ks)).replace("ST", str(st)).replace("PD", str(pd))
    weights = {"W1": rng.normal(0, 0.5, (4, 2, 3, 3)), "b1": rng.normal(0.2, 0.1, 4),
               "W2": rng.normal(0, 0.5, (3, 4, 3, 3)), "b2": rng.normal(0.2, 0.1, 3),
               "W3": rng.normal(0, 0.3, (2, 48)), "b3": np.zeros(2)}
    snn = _compile(text, weights, (2, 8, 8))
    assert "AveragePool" in [n.op_type for n in snn.graph.node]
    x = rng.uniform(0, 1, (4, 2, 8, 8)).astype(np.float32)
    T = 10
    result = report(snn, {"x": x}, [T])
    s1 = SpikingSession(snn).meta["neurons"][0]["spikes"]
    counts = _spike_counts(snn, x, T)[s1]
    assert counts.sum() > 0
    brute = brute_pool_conv_sops(counts, ks, st, pd, (4, 4), (3, 4, 3, 3), 1, (4, 4))
    assert _layer_sops(result, "Conv_3", T) * len(x) == pytest.approx(brute)


RESIDUAL_TEXT = """
g (float[N,3,6,6] x, float[3,3,3,3] W1, float[3] b1, float[3,3,3,3] W2, float[3] b2, float[2,108] W3, float[2] b3)
  => (float[N,2] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1, b1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, W2, b2)
  s = Add (c2, r1)
  r2 = Relu (s)
  f = Flatten <axis=1> (r2)
  y = Gemm <transB=1> (f, W3, b3)
}
"""


def test_residual_add_sops_match_brute_force() -> None:
    rng = np.random.default_rng(2)
    weights = {"W1": rng.normal(0, 0.5, (3, 3, 3, 3)), "b1": rng.normal(0.2, 0.1, 3),
               "W2": rng.normal(0, 0.3, (3, 3, 3, 3)), "b2": rng.normal(0.1, 0.1, 3),
               "W3": rng.normal(0, 0.3, (2, 108)), "b3": np.zeros(2)}
    snn = _compile(RESIDUAL_TEXT, weights, (3, 6, 6))
    x = rng.uniform(0, 1, (4, 3, 6, 6)).astype(np.float32)
    T = 10
    result = report(snn, {"x": x}, [T])
    s1, s2 = (n["spikes"] for n in SpikingSession(snn).meta["neurons"])
    counts = _spike_counts(snn, x, T)
    assert counts[s1].sum() > 0
    conv = brute_conv_sops(counts[s1], (3, 3, 3, 3), [1, 1], [1, 1], [1, 1], 1, [6, 6])
    # the residual branch: each spike is added (times θ) into one element of the next neuron's input
    layers = result["neuron_layers"]
    assert layers[0]["by_T"][0]["sops_per_input"] * len(x) == pytest.approx(conv + counts[s1].sum())
    assert _layer_sops(result, "Conv_2", T) * len(x) == pytest.approx(conv)
    add = [la for la in result["synaptic_layers"] if la["op"] in ("Add", "IFNeuron")]
    assert len(add) == 1 and add[0]["by_T"][0]["sops_per_input"] * len(x) == pytest.approx(counts[s1].sum())
    assert layers[1]["by_T"][0]["sops_per_input"] * len(x) == pytest.approx(counts[s2].sum() * 2)


# -- rates, energy, SOPs90 ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = build(CNN_TEXT, cnn_weights())
    x = np.random.default_rng(1).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)
    snn = ann2snn.compile(model, {"x": x}, iters=10, batch=32)
    return model, snn, {"x": x[:16], "label": np.arange(16) % 3}


def test_rates_counts_and_energy(tiny) -> None:
    ann, snn, data = tiny
    Ts = [2, 8, 16]
    res = report(snn, data, Ts, ann=ann, batch_size=8)
    assert res["samples"] == 16 and res["Ts"] == Ts
    for nl in res["neuron_layers"]:
        for r in nl["by_T"]:
            assert 0.0 <= r["firing_rate"] <= 1.0
            assert r["spikes_per_input"] == pytest.approx(r["firing_rate"] * nl["units"] * r["T"])
    sops = [r["sops_per_input"] for r in res["snn"]]
    assert sops == sorted(sops) and sops[-1] > 0
    paper, c45 = res["energy_models"]
    assert paper["sop_j"] == pytest.approx(77e-15) and paper["mac_j"] == pytest.approx(12.5e-12)
    assert c45["sop_j"] == pytest.approx(0.9e-12) and c45["mac_j"] == pytest.approx(4.6e-12)
    # ANN, dense: 4 x 9 taps at 8 x 8 outputs, 64 x 16, 16 x 3
    assert res["ann"]["macs"] == 4 * 9 * 64 + 64 * 16 + 16 * 3
    for r in res["snn"]:
        assert r["macs_per_input"] == 4 * 9 * 64  # the first conv, once per input (direct coding)
        for e in (paper, c45):
            expect = r["sops_per_input"] * e["sop_j"] + r["macs_per_input"] * e["mac_j"]
            assert r["energy_j"][e["name"]] == pytest.approx(expect)
            assert r["ann_over_snn_energy"][e["name"]] == pytest.approx(res["ann"]["energy_j"][e["name"]] / expect)
        assert r["accuracy"] is not None and r["agreement"] is not None
    # per-layer SOPs add up to the network's
    for i, r in enumerate(res["snn"]):
        assert sum(la["by_T"][i]["sops_per_input"] for la in res["synaptic_layers"]) == pytest.approx(r["sops_per_input"])
    assert cmos45_energy(1.0, 2.0).mac_j == pytest.approx(2e-12)
    every = report(snn, data, [16], analog_once=False, energy=(paper_energy(flops_per_mac=2.0),))
    assert every["snn"][0]["macs_per_input"] == 16 * 4 * 9 * 64
    assert every["energy_models"][0]["mac_j"] == pytest.approx(25e-12)
    assert every["snn"][0]["sops_per_input"] == pytest.approx(res["snn"][-1]["sops_per_input"])
    text = format_report(res)
    assert "SOPs90" in text and "| 16 |" in text and "Synaptic layers at T=16" in text


def test_errors_name_the_problem(tiny) -> None:
    ann, snn, data = tiny
    with pytest.raises(ann2snn.ModelLoadError, match="not a compiled spiking model"):
        analyse(ann)
    with pytest.raises(ann2snn.ConfigError, match="T must be a positive"):
        report(snn, data, [0])
    with pytest.raises(ann2snn.DataError, match="labels under 'label' for 16 samples"):
        report(snn, {"x": data["x"], "label": np.zeros(3)}, [4])


def test_sops90_and_sops95_on_a_hand_made_table() -> None:
    rows = [{"T": 8, "accuracy": 0.50, "sops_per_input": 1.0}, {"T": 16, "accuracy": 0.905, "sops_per_input": 2.0},
            {"T": 32, "accuracy": 0.94, "sops_per_input": 4.0}, {"T": 64, "accuracy": 0.951, "sops_per_input": 8.0},
            {"T": 128, "accuracy": 0.93, "sops_per_input": 16.0}]
    assert sops_at_fraction(rows, 1.0, 0.90)["T"] == 16
    assert sops_at_fraction(rows, 1.0, 0.95)["sops_per_input"] == 8.0
    assert sops_at_fraction(list(reversed(rows)), 1.0, 0.95)["T"] == 64  # order of rows does not matter
    assert sops_at_fraction(rows, 0.98, 0.90)["T"] == 16  # 0.905 >= 0.882
    assert sops_at_fraction(rows, 0.95, 0.95)["T"] == 16  # exactly at the boundary: 0.905 >= 0.9025
    assert sops_at_fraction(rows, 1.0, 0.99) is None
    assert sops_at_fraction(rows, None, 0.9) is None
    assert sops_at_fraction([{"T": 4, "accuracy": None, "sops_per_input": 1.0}], 1.0, 0.9) is None


def test_summarise_from_hand_made_counts() -> None:
    """Energy and rates from known counts, without a simulation."""
    from ann2snn.analysis.cost import NetworkCost
    cost = NetworkCost(neurons=[{"name": "n1", "spikes": "s", "units": 4, "shape": [4]}],
                       fanout={"s": {"fc": np.array([2.0, 2.0, 3.0, 0.0])}},
                       layers=[{"name": "conv", "op": "Conv", "part": "spiking", "ann_macs": 10, "analog_macs_per_step": 10},
                               {"name": "fc", "op": "Gemm", "part": "spiking", "ann_macs": 7, "analog_macs_per_step": 0}],
                       tail_macs=0, ann_macs=17)
    counter = SpikeCounter({"s": [4]}, [2])
    counter.on_step(0, {"s": np.array([[1, 0, 1, 0], [1, 1, 0, 0]], np.float32)})
    counter.on_step(1, {"s": np.array([[0, 0, 1, 1], [1, 0, 0, 0]], np.float32)})
    e = EnergyModel("unit", 1.0, 10.0)
    res = summarise(cost, counter, {"samples": 2, "t0": 0, "snn": [{"T": 2, "accuracy": 1.0}], "ann_accuracy": 1.0},
                    [e], analog_once=False)
    row = res["snn"][0]
    # spikes per position: [3, 1, 2, 1]; SOPs = 3*2 + 1*2 + 2*3 + 1*0 = 14 over 2 samples
    assert row["sops_per_input"] == 7.0 and row["spikes_per_input"] == 3.5
    assert row["firing_rate"] == pytest.approx(3.5 / (4 * 2))
    assert row["macs_per_input"] == 20 and row["energy_j"]["unit"] == 7.0 + 200.0
    assert res["ann"]["energy_j"]["unit"] == 170.0
    assert res["sops95"]["T"] == 2


def test_reference_model_macs() -> None:
    path = MODELS / "mnist_cnn.onnx"
    if not path.exists():
        pytest.skip("reference model not built")
    snn = ann2snn.compile(path, MODELS / "data" / "mnist_calib.npz", iters=2, batch=16)
    # dense (as `ann2snn inspect`): conv1 32x9 taps at 28x28, conv2 64x32x9 at 14x14, fc 3136x128, fc 128x10
    cost = analyse(snn)
    assert cost.ann_macs == 32 * 9 * 784 + 64 * 32 * 9 * 196 + 3136 * 128 + 128 * 10 == 4_241_152
    assert [la["analog_macs_per_step"] for la in cost.layers] == [32 * 9 * 784, 0, 0, 0]
    # valid taps only: 32x1x(3*28-2)^2, 64x32x(3*14-2)^2
    valid = analyse(snn, mac_count="valid")
    assert valid.ann_macs == 32 * 82 ** 2 + 64 * 32 * 40 ** 2 + 3136 * 128 + 128 * 10
    # one spike from every neuron of the first layer costs exactly conv2's valid MACs in SOPs
    assert valid.synapses(cost.neurons[0]["spikes"]) == 64 * 32 * 40 ** 2
    with pytest.raises(ann2snn.ConfigError, match="mac_count must be one of dense, valid"):
        analyse(snn, mac_count="exact")


def test_tail_macs_counted_once() -> None:
    text = """
    g (float[N,6] x, float[8,6] W1, float[8] b1, float[4,8] W2, float[4] b2, float[3,4] W3, float[3] b3) => (float[N,3] y) {
      h = Gemm <transB=1> (x, W1, b1)
      r = Relu (h)
      z = Gemm <transB=1> (r, W2, b2)
      s = Sigmoid (z)
      y = Gemm <transB=1> (s, W3, b3)
    }"""
    rng = np.random.default_rng(3)
    weights = {"W1": rng.normal(size=(8, 6)), "b1": np.full(8, 0.2), "W2": rng.normal(size=(4, 8)),
               "b2": np.zeros(4), "W3": rng.normal(size=(3, 4)), "b3": np.zeros(3)}
    model = build(text, weights)
    x = rng.uniform(0, 1, (32, 6)).astype(np.float32)
    snn = ann2snn.compile(model, {"x": x}, iters=5, batch=16)
    res = report(snn, {"x": x[:4]}, [4, 8])
    tail = [la for la in res["synaptic_layers"] if la["part"] == "tail"]
    assert [la["ann_macs"] for la in tail] == [12]
    assert all(r["macs_per_input"] == 48 + 12 for r in res["snn"])  # first Gemm (analog) once + the tail once
    assert res["ann"]["macs"] == 48 + 32 + 12


# -- CLI ------------------------------------------------------------------------------------------------------

def test_cli_report(tiny, tmp_path: Path) -> None:
    ann, snn, data = tiny
    onnx.save(snn, tmp_path / "m.snn.onnx")
    onnx.save(ann, tmp_path / "m.onnx")
    np.savez(tmp_path / "test.npz", **data)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["report", str(tmp_path / "m.snn.onnx"), "--data", str(tmp_path / "test.npz"),
                                  "-T", "4,8", "--ann", str(tmp_path / "m.onnx"), "--json", str(out),
                                  "--no-progress", "--sop-fj", "100", "--layer-T", "4"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "SOPs95" in r.stdout and "Neuron layers at T=4" in r.stdout and "100 fJ/SOP" in r.stdout
    res = json.loads(out.read_text())
    assert res["Ts"] == [4, 8] and res["energy_models"][0]["sop_j"] == pytest.approx(100e-15)
    bad = CliRunner().invoke(main, ["report", str(tmp_path / "m.snn.onnx"), "--data", str(tmp_path / "test.npz"),
                                    "-T", "4", "--layer-T", "8", "--json", str(tmp_path / "b.json")])
    assert bad.exit_code == 2 and "--layer-T 8" in bad.stderr and not (tmp_path / "b.json").exists()
    notsnn = CliRunner().invoke(main, ["report", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "test.npz")])
    assert notsnn.exit_code == 3 and "not a compiled spiking model" in notsnn.stderr


def test_cli_plot_without_matplotlib(tiny, tmp_path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
        pytest.skip("matplotlib is installed")
    except ImportError:
        pass
    _, snn, data = tiny
    onnx.save(snn, tmp_path / "m.snn.onnx")
    np.savez(tmp_path / "test.npz", **data)
    r = CliRunner().invoke(main, ["report", str(tmp_path / "m.snn.onnx"), "--data", str(tmp_path / "test.npz"),
                                  "-T", "4", "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 2 and "pip install matplotlib" in r.stderr and not (tmp_path / "p.png").exists()


def test_plot(tiny, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from ann2snn.analysis.report_format import plot_report
    ann, snn, data = tiny
    res = report(snn, data, [4, 8], ann=ann)
    plot_report(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "digits"])
def test_reference_model_report(name: str) -> None:
    ann = MODELS / f"{name}_cnn.onnx"
    if not ann.exists():
        pytest.skip("reference model not built")
    snn = ann2snn.compile(ann, MODELS / "data" / f"{name}_calib.npz")
    with np.load(MODELS / "data" / f"{name}_test.npz") as z:
        data = {k: z[k][:1000] for k in z.files}
    res = report(snn, data, [16, 64], ann=ann)
    assert res["snn"][-1]["accuracy"] > 0.9
    assert res["sops95"] is not None
    for r in res["snn"]:
        assert r["ann_over_snn_energy"]["paper"] > 1.0


GAP_TEXT = """
g (float[N,2,6,6] x, float[4,2,3,3] W1, float[4] b1, float[4,5] W2, float[5] b2, float[5,3] W3) => (float[N,3] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1, b1)
  r1 = Relu (c1)
  p = GlobalAveragePool (r1)
  f = Flatten <axis=1> (p)
  h = Gemm (f, W2, b2)
  r2 = Relu (h)
  y = MatMul (r2, W3)
}
"""


def test_global_pool_and_matmul_sops() -> None:
    rng = np.random.default_rng(4)
    weights = {"W1": rng.normal(0, 0.5, (4, 2, 3, 3)), "b1": np.full(4, 0.3), "W2": rng.normal(0, 0.5, (4, 5)),
               "b2": np.full(5, 0.3), "W3": rng.normal(0, 0.5, (5, 3))}
    snn = _compile(GAP_TEXT, weights, (2, 6, 6))
    x = rng.uniform(0, 1, (4, 2, 6, 6)).astype(np.float32)
    res = report(snn, {"x": x}, [8])
    counts = _spike_counts(snn, x, 8)
    s1, s2 = (n["spikes"] for n in SpikingSession(snn).meta["neurons"])
    assert counts[s1].sum() > 0 and counts[s2].sum() > 0
    # a spike anywhere in a channel reaches the pooled value of that channel, which drives 5 Gemm outputs
    assert _layer_sops(res, "Gemm_4", 8) * len(x) == pytest.approx(counts[s1].sum() * 5)
    assert _layer_sops(res, "MatMul_6", 8) * len(x) == pytest.approx(counts[s2].sum() * 3)


def test_routing_through_transpose_concat_and_reshape() -> None:
    """Per-element fan-out follows each element to its own weight row (nonzero weights differ per row)."""
    from ann2snn.analysis.cost import _Graph, _Router, _static_shapes
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,2,3] s, float[N,3,2] other) => (float[N,4] y) {
      t = Transpose <perm=[0,2,1]> (s)
      c = Concat <axis=2> (other, t)
      r = Flatten <axis=1> (c)
      y = MatMul (r, W)
    }"""
    model = onnx.parser.parse_model(text)
    w = np.zeros((12, 4), np.float32)
    for row in range(12):
        w[row, : row % 5] = 1.0  # row k has k % 5 nonzero weights
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "W"))
    g = _Graph(model.graph.node, _static_shapes(model, {}), {"W": w}, ["y"])
    fan = _Router(g, nonzero_weights=True).route("s")
    (key, m), = fan.items()
    assert key == g.nodes[3].name and m.shape == (1, 2, 3)
    # s[0, i, j] -> t[0, j, i] -> c[0, j, 2 + i] -> r[0, 4 j + 2 + i]
    expect = np.array([[((4 * j + 2 + i) % 5) for j in range(3)] for i in range(2)], np.float64)
    np.testing.assert_array_equal(m[0], expect)


@pytest.mark.parametrize("cin,cout,k,stride,pad,outpad,groups,hw", [
    (2, 3, 3, 2, 1, 1, 1, (4, 5)),
    (4, 4, 2, 2, 0, 0, 2, (3, 3)),
    (2, 2, 3, 1, 1, 0, 1, (5, 4)),
])
def test_conv_transpose_fanout_matches_brute_force(cin, cout, k, stride, pad, outpad, groups, hw) -> None:
    from ann2snn.analysis.cost import conv_transpose_fanout
    rng = np.random.default_rng(k + stride)
    w = rng.normal(size=(cin, cout // groups, k, k)).astype(np.float32)
    out_sp = [stride * (hw[d] - 1) + outpad + k - 2 * pad for d in range(2)]
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[stride] * 2, pads=[pad] * 4,
                            output_padding=[outpad] * 2, group=groups)
    fan = conv_transpose_fanout(node, w, (cin,) + hw, (cout,) + tuple(out_sp))
    counts = rng.integers(0, 3, size=(cin,) + hw).astype(np.float64)
    brute = 0.0
    for ci, iy, ix, co_g, ky, kx in product(range(cin), range(hw[0]), range(hw[1]), range(cout // groups),
                                            range(k), range(k)):
        oy, ox = iy * stride - pad + ky, ix * stride - pad + kx
        if 0 <= oy < out_sp[0] and 0 <= ox < out_sp[1]:
            brute += counts[ci, iy, ix]
    assert (counts * fan).sum() == brute


def test_routing_through_pad() -> None:
    from ann2snn.analysis.cost import _Graph, _Router, _static_shapes
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,1,3,3] s) => (float[N,2,3,3] y) {
      p = Pad (s, pads)
      y = Conv (p, W)
    }"""
    model = onnx.parser.parse_model(text)
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    w = np.ones((2, 1, 3, 3), np.float32)
    model.graph.initializer.extend([onnx.numpy_helper.from_array(pads, "pads"), onnx.numpy_helper.from_array(w, "W")])
    g = _Graph(model.graph.node, _static_shapes(model, {}), {"pads": pads, "W": w}, ["y"])
    (m,) = _Router(g, nonzero_weights=False).route("s").values()
    # an explicit zero Pad of 1 then a 3x3 conv = a 3x3 conv with pads 1: every element reaches 2 x (taps in range)
    per_dim = np.array([2, 3, 2])
    np.testing.assert_array_equal(m[0, 0], 2 * np.outer(per_dim, per_dim))


def _conv_conv_relu(spiking_first: bool) -> onnx.ModelProto:
    """A hand-built CNN with Conv -> Conv -> Relu (no neuron between the two convolutions),
    behind a Conv + Relu when ``spiking_first`` (so the pair reads spikes, then a current)."""
    rng = np.random.default_rng(0)
    values = {"w0": rng.normal(0, 0.5, (4, 1, 3, 3)), "w1": rng.normal(0, 0.5, (4, 4 if spiking_first else 1, 3, 3)),
              "w2": rng.normal(0, 0.3, (4, 4, 3, 3)), "b": np.full(4, 0.1), "wf": rng.normal(0, 0.2, (3, 64)),
              "bf": np.zeros(3)}
    first = [helper.make_node("Conv", ["x", "w0", "b"], ["c0"], pads=[1] * 4, name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0")] if spiking_first else []
    nodes = first + [
        helper.make_node("Conv", ["r0" if spiking_first else "x", "w1", "b"], ["c1"], pads=[1] * 4, name="conv1"),
        helper.make_node("Conv", ["c1", "w2", "b"], ["c2"], pads=[1] * 4, name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "conv_conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
                              [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in values.items()
                               if spiking_first or k != "w0"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _layer_line(text: str, name: str) -> list[str]:
    line = next(li for li in text.splitlines() if li.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.parametrize("spiking_first", [False, True], ids=["prefix", "after-spikes"])
def test_conv_reading_a_conv_gets_no_sops(spiking_first: bool) -> None:
    """A Conv that reads another Conv with no neuron between them receives no spikes: the
    report shows "-" for its SOPs and counts its MACs (once per input in the time-constant
    prefix; at every step behind spikes, where the current it reads changes every step)."""
    x = np.random.default_rng(1).uniform(0, 1, (32, 1, 4, 4)).astype(np.float32)
    snn = ann2snn.compile(_conv_conv_relu(spiking_first), {"x": x}, iters=4, batch=16)
    T = 4
    result = report(snn, {"x": x[:8]}, [T])
    rows = {la["name"]: la for la in result["synaptic_layers"]}
    conv2 = rows["conv2"]
    dense = 4 * 4 * 9 * 16  # out channels × in channels × taps × output positions
    assert not conv2["from_spikes"] and conv2["by_T"][-1]["sops_per_input"] == 0
    assert conv2["by_T"][-1]["macs_per_input"] == dense * (T if spiking_first else 1)
    assert conv2["inputs"] == (["analog current every step"] if spiking_first else ["analog input"])
    text = format_report(result)
    cells = _layer_line(text, "conv2")
    assert cells[2] == conv2["inputs"][0] and cells[3] == "-", cells
    assert _layer_line(text, "fc")[3] != "-"  # it reads spikes
    if spiking_first:
        assert rows["conv1"]["from_spikes"] and _layer_line(text, "conv1")[3] != "-"
        assert result["mac_share"]["analog_current"] == dense and "on analog currents" in text
    else:
        assert _layer_line(text, "conv1")[3] == "-"


@pytest.mark.parametrize("spiking_first", [False, True], ids=["prefix", "after-spikes"])
def test_compile_time_mac_share_matches_the_report(spiking_first: bool) -> None:
    """The MAC share written into the compiled model (and shown by ``inspect``) splits the work
    as the report does: behind spikes, the Conv that reads another Conv's current (no neuron
    between them) is not on spikes but in its own share, ``analog_current``."""
    from ann2snn.analysis.inspection import inspect_model

    x = np.random.default_rng(1).uniform(0, 1, (32, 1, 4, 4)).astype(np.float32)
    ann = _conv_conv_relu(spiking_first)
    snn = ann2snn.compile(ann, {"x": x}, iters=4, batch=16)
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])["macs"]
    dense = 4 * 4 * 9 * 16  # conv2: out channels × in channels × taps × output positions
    fc = 64 * 3
    if spiking_first:
        conv0, conv1 = 4 * 1 * 9 * 16, dense
        assert meta == {"total": conv0 + conv1 + dense + fc, "spiking": conv1 + fc, "prefix": conv0, "tail": 0,
                        "analog_current": dense}
    else:  # both convolutions read the input: the time-constant prefix, nothing reads a current
        assert meta == {"total": 4 * 9 * 16 + dense + fc, "spiking": fc, "prefix": 4 * 9 * 16 + dense, "tail": 0}
    assert meta == report(snn, {"x": x[:4]}, [2])["mac_share"]
    info = inspect_model(ann)
    assert info["macs"] == meta
    row = next(r for r in info["nodes"] if r["node"] == "conv2")
    assert ("current of the weighted op before it" in row["detail"]) == spiking_first


def test_report_counts_the_attention_products_like_the_compiler() -> None:
    """The ViT's MatMuls of two activations (Q·Kᵀ, attention·V): in the time-constant prefix once,
    under expectation compensation at every step; the report's MAC share equals the model's
    metadata, total included (it used to leave them out of both the total and their share)."""
    snn = ann2snn.compile(MODELS / "fashion_vit_dynamo.onnx", MODELS / "data" / "fashion_calib.npz", iters=3,
                          nonlinear="compensate", signed_sites="output")
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    with np.load(MODELS / "data" / "fashion_test.npz") as z:
        x = z["input"][:2]
    r = report(snn, {"input": x}, [2])
    assert r["mac_share"] == meta["macs"] and meta["macs"]["compensated"] > 0
    products = [row for row in r["synaptic_layers"] if row["op"].startswith("ExpectationCompensatedMatMul")]
    assert len(products) == 6 and all("compensated increments" in row["inputs"] for row in products)
