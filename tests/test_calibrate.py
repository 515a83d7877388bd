"""calibrate_thresholds: LTB matches a numpy re-implementation; max / percentile baselines."""
from __future__ import annotations

import numpy as np
import pytest

from ann2snn.data.arrays import CalibrationSource, input_specs
from ann2snn.errors import DataError
from ann2snn.passes.calibrate_thresholds import calibrate_thresholds
from ann2snn.passes.find_activations import find_activations
from ann2snn.passes.fold_constants import fold_constants
from ann2snn.passes.partition_graph import partition_graph
from conftest import apply, build

MLP = """
g (float[N,6] x, float[8,6] W1, float[8] b1, float[5,8] W2, float[5] b2, float[3,5] W3) => (float[N,3] y) {
  h1 = Gemm <transB=1> (x, W1, b1)
  a1 = Relu (h1)
  h2 = Gemm <transB=1> (a1, W2, b2)
  a2 = Clip (h2, lo, hi)
  y = Gemm <transB=1> (a2, W3)
}
"""


def mlp(cap: float = 6.0):
    rng = np.random.default_rng(0)
    w = {"W1": rng.normal(0, 1, (8, 6)), "b1": rng.normal(0, 0.5, 8), "W2": rng.normal(0, 0.5, (5, 8)),
         "b2": rng.normal(0, 0.5, 5), "W3": rng.normal(0, 1, (3, 5)), "lo": np.float32(0.0), "hi": np.float32(cap)}
    text = MLP.replace("float[3,5] W3)", "float[3,5] W3, float lo, float hi)")
    return build(text, w), w


def numpy_ltb(w, batches, K, per_channel=True, eta=1.0, cap=None):
    th = [np.zeros(8), np.zeros(5)]
    for x in batches:
        z = x @ w["W1"].T + w["b1"]
        for i, (W, b) in enumerate([(w["W2"], w["b2"]), (w["W3"], None)]):
            axis = 0 if per_channel else None
            th[i] = th[i] + 2 * eta * np.maximum(z - th[i], 0).mean(axis=axis)
            if i == 1 and cap is not None:
                th[i] = np.minimum(th[i], cap)
            a = np.minimum(np.maximum(z, 0), th[i])
            if i == 0:
                z = a @ W.T + b
    return th


@pytest.mark.parametrize("granularity", ["channel", "layer"])
def test_ltb_matches_numpy(granularity: str) -> None:
    model, w = mlp(cap=1.5)
    x = np.random.default_rng(3).normal(0, 1, (100, 6)).astype(np.float32)
    state, _ = apply(model, fold_constants, find_activations, partition_graph, iters=7, batch=16,
                     granularity=granularity)
    state.calib = {"x": x}
    calibrate_thresholds(state)
    batches = [b["x"].astype(np.float64) for b in
               CalibrationSource({"x": x}, input_specs(model)).batches(7, 16, 0)]
    ref = numpy_ltb(w, batches, 7, per_channel=granularity == "channel", cap=1.5)
    for site, r in zip(state.sites, ref):
        np.testing.assert_allclose(np.broadcast_to(site.theta, r.shape), r, rtol=1e-4, atol=1e-5)
    assert state.sites[1].theta.max() <= 1.5 + 1e-6  # ReLU6-style cap kept
    assert state.metadata["t0"] >= 0


def test_ltb_thresholds_grow_with_iterations() -> None:
    model, _ = mlp()
    x = np.random.default_rng(3).normal(0, 1, (256, 6)).astype(np.float32)
    thetas = []
    for k in (1, 10, 100):
        state, _ = apply(model, fold_constants, find_activations, partition_graph, iters=k, batch=32)
        state.calib = {"x": x}
        calibrate_thresholds(state)
        thetas.append(state.sites[0].theta)
    assert np.all(thetas[0] <= thetas[1] + 1e-6) and np.all(thetas[1] <= thetas[2] + 1e-6)
    assert thetas[2].sum() > thetas[0].sum()


@pytest.mark.parametrize("method", ["max", "percentile"])
def test_max_and_percentile_norm(method: str) -> None:
    model, w = mlp(cap=100.0)
    x = np.random.default_rng(4).normal(0, 1, (64, 6)).astype(np.float32)
    state, _ = apply(model, fold_constants, find_activations, partition_graph, method=method, batch=64,
                     percentile=90.0)
    state.calib = {"x": x}
    calibrate_thresholds(state)
    z1 = x.astype(np.float64) @ w["W1"].T + w["b1"]
    ref = z1.max(axis=0) if method == "max" else np.percentile(z1, 90.0, axis=0)
    np.testing.assert_allclose(state.sites[0].theta, np.maximum(ref, 0), rtol=1e-4, atol=1e-5)


def test_nan_overflow_is_reported() -> None:
    model, w = mlp()
    x = np.full((8, 6), 3e38, np.float32)
    state, _ = apply(model, fold_constants, find_activations, partition_graph, iters=2, batch=8)
    state.calib = {"x": x}
    with pytest.raises(DataError, match="calibration overflowed at activation"):
        calibrate_thresholds(state)
