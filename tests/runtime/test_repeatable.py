"""Issue 22: no wrong answer without a warning.

Runs repeat byte for byte; the execution form is a rule, recorded with the outputs; the
guard catches a broken fast form and falls back to the reference; a model with no neuron
reproduces its ANN; NaN / inf outputs are an error naming the output and the step; a model
that mostly stays analog compiles with a warning giving the share of MACs on spikes.
(The differential tests of every form against the reference are in test_forms.py.)
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import ann2snn
from ann2snn.cli import main
from ann2snn.runtime import SpikingSession
from ann2snn.runtime import forms
from ann2snn.runtime.reference import reference_run
from conftest import MODELS, build, residual_net


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("digits")
    snn = d / "digits.snn.onnx"
    ann2snn.compile(MODELS / "digits_cnn.onnx", MODELS / "data" / "digits_calib.npz", snn, iters=20, batch=32)
    test = dict(np.load(MODELS / "data" / "digits_test.npz"))
    np.savez(d / "x.npz", **{k: v[:40] for k, v in test.items() if k != "label"})
    return {"snn": snn, "x": d / "x.npz", "dir": d}


def test_run_is_byte_identical_20_times(digits: dict[str, Path]) -> None:
    """20 calls of the same `ann2snn run` (in-process), and 2 in fresh processes, give the same bytes."""
    outs = []
    for i in range(20):
        out = digits["dir"] / f"y{i}.npz"
        r = invoke("run", digits["snn"], "--input", digits["x"], "-T", "16", "--batch-size", "3", "-o", out)
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    for i in range(2):
        out = digits["dir"] / f"p{i}.npz"
        subprocess.run([sys.executable, "-m", "ann2snn", "-q", "run", str(digits["snn"]), "--input", str(digits["x"]),
                        "-T", "16", "--batch-size", "3", "-o", str(out)], check=True, capture_output=True)
        outs.append(out.read_bytes())
    assert all(o == outs[0] for o in outs)
    saved = np.load(digits["dir"] / "y0.npz")
    info = json.loads(str(saved["ann2snn_run"]))
    # 13 batches of 3 and one of 1: the step form, then the layered one by the rule (batch <= 2), recorded
    assert info["forms"] == ["step", "layered(chunk=16)"] and info["T"] == 16
    ref = reference_run(digits["snn"], {k: v for k, v in np.load(digits["x"]).items()}, 16)
    np.testing.assert_allclose(saved[next(iter(ref))], next(iter(ref.values())), rtol=1e-5, atol=1e-6)


def test_forms_give_the_same_bytes(digits: dict[str, Path]) -> None:
    """--form changes how the time loop runs, not the outputs."""
    data = {}
    for form in ("auto", "step", "layered", "reference", "timed"):
        out = digits["dir"] / f"form_{form}.npz"
        assert invoke("run", digits["snn"], "--input", digits["x"], "-T", "9", "--form", form, "-o", out).exit_code == 0
        data[form] = np.load(out)
    for form, d in data.items():
        np.testing.assert_array_equal(d["logits"] if "logits" in d else d[d.files[0]],
                                      data["reference"][d.files[0]], err_msg=form)
    assert json.loads(str(data["reference"]["ann2snn_run"]))["forms"] == ["reference"]


def test_auto_is_a_rule_not_a_timing(digits: dict[str, Path]) -> None:
    s = SpikingSession(digits["snn"])
    x = dict(np.load(digits["x"]))
    for batch, expect in ((1, "layered(chunk=32)"), (2, "layered(chunk=16)"), (5, "step"), (32, "step"), (40, "step")):
        s.run({k: v[:batch] for k, v in x.items()}, 32)
        assert s.last_form == expect
    assert s.auto_choices == {}  # nothing was timed


def test_guard_catches_a_broken_form(digits: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """A fast form that returns garbage after its first step (the bug of issue 22) is caught by
    the guard, named in a warning, and not used: the run gives the reference's outputs."""
    real = forms._run_bound

    def broken(plan, const, states, T):  # noqa: ANN001
        for t, outs in enumerate(real(plan, const, states, T)):
            yield [np.full_like(o, 1e25) for o in outs] if t else outs

    monkeypatch.setattr(forms, "_run_bound", broken)
    x = {k: v[:32] for k, v in np.load(digits["x"]).items()}
    with caplog.at_level(logging.WARNING):
        s = SpikingSession(digits["snn"], mode="step")
        got = s.run(x, 12)
    assert "the step form disagrees with the reference" in caplog.text
    assert s.last_form == "reference" and s.guard_verdicts == {("step", 32, 0): False}
    ref = reference_run(digits["snn"], x, 12)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6)
    unguarded = SpikingSession(digits["snn"], mode="step", guard=False).run(x, 12)
    assert np.abs(next(iter(unguarded.values()))).max() > 1e20  # what the guard prevented


def test_guard_runs_once_per_batch_size(digits: dict[str, Path]) -> None:
    x = {k: v[:32] for k, v in np.load(digits["x"]).items()}
    s = SpikingSession(digits["snn"], mode="step")
    for _ in range(3):
        s.run(x, 8)
    s.run({k: v[:3] for k, v in x.items()}, 8)
    assert s.guard_verdicts == {("step", 32, 0): True, ("step", 3, 0): True}


# -- no neuron, mostly analog -------------------------------------------------------------------

def _vit_like(seed: int = 0) -> onnx.ModelProto:
    """Patch Conv, LayerNormalization, single-head softmax attention, Erf-GELU MLP, mean pool, head:
    a transformer with no ReLU, so no neuron."""
    rng = np.random.default_rng(seed)
    d, p = 8, 4  # width, patches per side (input 8x8, patch 2)
    w = {
        "Wp": rng.normal(0, 0.5, (d, 1, 2, 2)), "bp": rng.normal(0, 0.1, d),
        "g": np.ones(d), "b": np.zeros(d),
        "Wq": rng.normal(0, 0.4, (d, d)), "Wk": rng.normal(0, 0.4, (d, d)), "Wv": rng.normal(0, 0.4, (d, d)),
        "W1": rng.normal(0, 0.4, (d, 2 * d)), "W2": rng.normal(0, 0.4, (2 * d, d)), "Wh": rng.normal(0, 0.4, (d, 3)),
        "scale": np.array(1 / np.sqrt(d)), "half": np.array(0.5), "one": np.array(1.0), "rsqrt2": np.array(2 ** -0.5),
    }
    text = f"""
    g (float[N,1,8,8] x) => (float[N,3] y) {{
      c = Conv <strides=[2,2]> (x, Wp, bp)
      f = Reshape (c, shape)
      t = Transpose <perm=[0,2,1]> (f)
      n = LayerNormalization <axis=-1> (t, g, b)
      q = MatMul (n, Wq)
      k = MatMul (n, Wk)
      v = MatMul (n, Wv)
      kt = Transpose <perm=[0,2,1]> (k)
      s = MatMul (q, kt)
      ss = Mul (s, scale)
      a = Softmax <axis=-1> (ss)
      o = MatMul (a, v)
      r = Add (t, o)
      h = MatMul (r, W1)
      e = Mul (h, rsqrt2)
      er = Erf (e)
      e1 = Add (er, one)
      hm = Mul (h, e1)
      gl = Mul (hm, half)
      m = MatMul (gl, W2)
      r2 = Add (r, m)
      pooled = ReduceMean <axes=[1], keepdims=0> (r2)
      y = MatMul (pooled, Wh)
    }}
    """
    model = build(text, w, opset=17, ints={"shape": np.array([0, d, p * p], np.int64)})
    return model


def test_a_model_without_neurons_reproduces_its_ann(caplog: pytest.LogCaptureFixture) -> None:
    ann = _vit_like()
    x = np.random.default_rng(1).normal(0, 1, (16, 1, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        snn = ann2snn.compile(ann, {"x": x}, iters=5, batch=8)
    assert "no neuron" in caplog.text and "0.0% of the network's weighted work" in caplog.text
    expect = ort.InferenceSession(ann.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x[:5]})[0]
    for mode in ("auto", "step", "layered", "reference"):
        for T in (1, 16, 33):
            got = SpikingSession(snn, mode=mode).run({"x": x[:5]}, T)["y"]
            np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6, err_msg=f"{mode} T={T}")
    s = SpikingSession(snn)
    s.run({"x": x[:5]}, 16)
    assert s.last_form == "constant"


def test_mostly_analog_warns_with_the_share(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """One ReLU at the end of a Sigmoid network: the warning names where spiking ends and the share."""
    rng = np.random.default_rng(0)
    text = """
    g (float[N,16] x) => (float[N,3] y) {
      a = Gemm <transB=1> (x, W1, b1)
      s = Sigmoid (a)
      b = Gemm <transB=1> (s, W2, b2)
      r = Relu (b)
      y = Gemm <transB=1> (r, W3, b3)
    }
    """
    w = {"W1": rng.normal(0, 0.3, (64, 16)), "b1": np.zeros(64), "W2": rng.normal(0, 0.3, (32, 64)),
         "b2": np.zeros(32), "W3": rng.normal(0, 0.3, (3, 32)), "b3": np.zeros(3)}
    model = build(text, w)
    x = rng.normal(0, 1, (64, 16)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        snn = ann2snn.compile(model, {"x": x}, iters=5, batch=16)
    # on spikes: only the last Gemm (32x3 of 16x64 + 64x32 + 32x3 MACs)
    assert ("only 3.0% of the network's weighted work (96 of 3168 MACs per sample) takes spikes as input: spiking "
            "starts at 'Relu_3' (ai.onnx::Relu)") in caplog.text
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    assert meta["macs"] == {"total": 3168, "spiking": 96, "prefix": 3072, "tail": 0}
    path = tmp_path / "m.snn.onnx"
    onnx.save(snn, path)
    np.savez(tmp_path / "d.npz", x=x[:8])
    r = invoke("report", path, "--data", tmp_path / "d.npz", "-T", "4", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "weighted work of the ANN: 3.0% on spikes, 97.0% in the time-constant analog prefix" in r.stdout


# -- non-finite outputs ---------------------------------------------------------------------------

def test_nonfinite_output_is_an_error_naming_output_and_step(tmp_path: Path) -> None:
    """Spikes are bounded, so an overflow shows in an analog output: here the second output,
    computed once per input by the time-constant prefix."""
    rng = np.random.default_rng(0)
    text = """
    g (float[N,4] x) => (float[N,3] y, float[N,4] z) {
      a = Gemm <transB=1> (x, W1, b1)
      r = Relu (a)
      y = Gemm <transB=1> (r, W2, b2)
      z = Mul (x, x)
    }
    """
    w = {"W1": rng.normal(0, 0.5, (8, 4)), "b1": np.zeros(8), "W2": rng.normal(0, 0.5, (3, 8)), "b2": np.zeros(3)}
    path = tmp_path / "m.snn.onnx"
    ann2snn.compile(build(text, w), {"x": rng.normal(0, 1, (32, 4)).astype(np.float32)}, path, iters=5, batch=16)
    x = np.full((2, 4), 1e20, np.float32)  # x·x overflows
    with pytest.raises(ann2snn.NonFiniteError, match=r"output 'z' holds inf at step 0 \(0-based\).*"
                                                     r"--allow-nonfinite"):
        SpikingSession(path).run({"x": x}, 8)
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "y.npz"
    r = CliRunner().invoke(main, ["run", str(path), "--input", str(tmp_path / "x.npz"), "-T", "8", "-o", str(out)])
    assert r.exit_code == 4 and "output 'z' holds inf at step 0" in r.stderr and not out.exists()
    r = CliRunner().invoke(main, ["run", str(path), "--input", str(tmp_path / "x.npz"), "-T", "8", "-o", str(out),
                                  "--allow-nonfinite"])
    assert r.exit_code == 0, r.output
    assert not np.isfinite(np.load(out)["z"]).any() and np.isfinite(np.load(out)["y"]).all()


def test_boundary_spikes_keep_their_name() -> None:
    """A neuron whose spikes leave the spiking part directly (here: a ReLU whose consumer, a
    Sigmoid-gated product, stays analog) compiles into a model the runtime loads and runs
    like the reference (it failed with a KeyError on '<tensor>/scaled')."""
    rng = np.random.default_rng(0)
    text = """
    g (float[N,1,8,8] x) => (float[N,4,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, W1, b1)
      r = Relu (c)
      p = GlobalAveragePool (r)
      q = Conv (p, W2, b2)
      s = Sigmoid (q)
      y = Mul (r, s)
    }
    """
    w = {"W1": rng.normal(0, 0.5, (4, 1, 3, 3)), "b1": rng.normal(0, 0.1, 4),
         "W2": rng.normal(0, 0.5, (4, 4, 1, 1)), "b2": np.zeros(4)}
    x = rng.uniform(0, 1, (32, 1, 8, 8)).astype(np.float32)
    snn = ann2snn.compile(build(text, w), {"x": x}, iters=5, batch=16)
    for mode in ("step", "layered"):
        got = SpikingSession(snn, mode=mode, guard=False).run({"x": x[:3]}, 16)["y"]
        np.testing.assert_allclose(got, reference_run(snn, {"x": x[:3]}, 16)["y"], rtol=1e-5, atol=1e-7)


def test_residual_network_forms_agree_bit_for_bit() -> None:
    """Neurons in units of their thresholds: every form runs the artifact's arithmetic."""
    model = residual_net()
    x = np.random.default_rng(0).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)
    snn = ann2snn.compile(model, {"x": x}, iters=20, batch=32)
    thresholds = [numpy_helper.to_array(i) for i in snn.graph.initializer if i.name.endswith("/threshold")]
    assert thresholds and all(np.all(t == 1) for t in thresholds)
    ref = reference_run(snn, {"x": x[:5]}, 20)["y"]
    for kw in ({"mode": "step"}, {"mode": "layered", "chunk": 3}, {"mode": "step", "unit_thresholds": False},
               {"mode": "layered", "bind": False}, {"threads": 1}):
        np.testing.assert_array_equal(SpikingSession(snn, guard=False, **kw).run({"x": x[:5]}, 20)["y"], ref,
                                      err_msg=str(kw))


def test_run_writes_a_zipmap_model_repeatably(tmp_path: Path) -> None:
    """skl2onnx's ZipMap output (a list of dicts) is written (pickled, as np.savez does) and
    repeats byte for byte."""
    snn = tmp_path / "mlp.snn.onnx"
    ann2snn.compile(MODELS / "sklearn_mlp.onnx", MODELS / "data" / "sklearn_calib.npz", snn, iters=5)
    with np.load(MODELS / "data" / "sklearn_test.npz") as z:
        np.savez(tmp_path / "x.npz", **{k: z[k][:20] for k in z.files if k != "label"})
    outs = []
    for i in range(2):
        out = tmp_path / f"y{i}.npz"
        r = invoke("run", snn, "--input", tmp_path / "x.npz", "-T", "8", "--batch-size", "8", "-o", out)
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    with np.load(tmp_path / "y0.npz", allow_pickle=True) as z:
        assert z["output_label"].shape == (20,) and isinstance(z["output_probability"][0], dict)
