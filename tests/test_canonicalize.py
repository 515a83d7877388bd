"""Exporter spellings that must not cost neurons: CastLike-built biases (dynamo with
optimize=False) and ReduceMean global pooling (dynamo's adaptive average pooling); and the
partition's warnings when activations stay analog."""
from __future__ import annotations

import logging

import numpy as np
import pytest

import ann2snn
from ann2snn.analysis.inspection import inspect_model
from ann2snn.runtime import SpikingSession
from conftest import build, run_ort

# Conv -> ReLU -> Conv -> ReLU -> global pool -> Gemm, spelled three ways
GAP = "g = GlobalAveragePool (r2)\n f = Flatten (g)\n"
REDUCE_KEEP = "g = ReduceMean <keepdims=1> (r2, ax)\n f = Flatten (g)\n"
REDUCE_DROP = "f = ReduceMean <keepdims=0> (r2, ax)\n"


def _model(pool: str, castlike_bias: bool):
    # the dynamo exporter (optimize=False) builds a zero bias from the dtype of the conv's input
    bias = ("z = CastLike (zero, r1)\n b2 = Expand (z, nb)\n" if castlike_bias else "b2 = Identity (b2c)\n")
    text = f"""
g (float[N,1,8,8] x, float[4,1,3,3] W1, float[6] b2c, float zero, int64[1] nb, float[6,4,3,3] W2, int64[2] ax,
   float[3,6] W3) => (float[N,3] y) {{
  c1 = Conv <pads=[1,1,1,1]> (x, W1)
  r1 = Relu (c1)
  {bias} c2 = Conv <pads=[1,1,1,1]> (r1, W2, b2)
  r2 = Relu (c2)
  {pool} y = Gemm <transB=1> (f, W3)
}}"""
    rng = np.random.default_rng(3)
    weights = {"W1": rng.normal(0, 0.6, (4, 1, 3, 3)), "b2c": np.zeros(6), "zero": np.zeros(()),
               "W2": rng.normal(0, 0.4, (6, 4, 3, 3)), "W3": rng.normal(0, 0.5, (3, 6))}
    return build(text, weights, opset=18, ints={"nb": np.array([6], np.int64), "ax": np.array([2, 3], np.int64)})


def _simulate(model, x: np.ndarray, caplog: pytest.LogCaptureFixture) -> tuple[dict, dict]:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        snn = ann2snn.compile(model, {"x": x[:64]}, iters=20, batch=32)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    session = SpikingSession(snn)
    return session.meta, session.run_many({"x": x[64:]}, [16, 256])


@pytest.mark.parametrize("pool", [REDUCE_KEEP, REDUCE_DROP, GAP], ids=["reducemean_keepdims", "reducemean", "gap"])
@pytest.mark.parametrize("castlike", [False, True], ids=["bias", "castlike_bias"])
def test_exporter_spellings_keep_every_neuron(pool: str, castlike: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Each spelling compiles to the same two neuron layers and the same SNN as the plain one."""
    x = np.random.default_rng(0).uniform(0, 1, (96, 1, 8, 8)).astype(np.float32)
    model = _model(pool, castlike)
    meta, out = _simulate(model, x, caplog)
    assert len(meta["neurons"]) == 2
    assert sum(1 for r in inspect_model(model)["nodes"] if r["role"] == "neuron") == 2
    ann = run_ort(model, {"x": x[64:]})[0]
    _, ref = _simulate(_model(GAP, False), x, caplog)
    np.testing.assert_allclose(ann, run_ort(_model(GAP, False), {"x": x[64:]})[0], rtol=1e-5, atol=1e-6)
    for T in (16, 256):
        np.testing.assert_allclose(out[T]["y"], ref[T]["y"], rtol=1e-4, atol=1e-5)
    err = {T: float(np.abs(out[T]["y"] - ann).mean() / np.abs(ann).mean()) for T in (16, 256)}
    assert err[256] < err[16] < 0.05, err


def test_analog_activation_is_named_in_the_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A global pool the compiler cannot take (ReduceMax over space) ends the spiking part right
    after the last ReLU: the warning names the op and the activation that stays analog."""
    model = _model("g = ReduceMax <keepdims=1> (r2, ax)\n f = Flatten (g)\n", castlike_bias=False)
    x = np.random.default_rng(0).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        snn = ann2snn.compile(model, {"x": x}, iters=5, batch=32)
    assert len(SpikingSession(snn).meta["neurons"]) == 1
    text = caplog.text
    assert "ReduceMax" in text and "after activation" in text, text
    with pytest.raises(ann2snn.UnsupportedModelError, match="ReduceMax"):
        ann2snn.compile(model, {"x": x}, iters=5, batch=32, strict=True)
