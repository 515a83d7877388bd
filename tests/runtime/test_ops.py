"""The IFNeuron function: matches the numpy reference; its rate approaches clip(x/θ, 0, 1)."""
from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st

from ann2snn.runtime.ops import if_neuron_function, if_neuron_reference
from conftest import neuron_op_model, run_ort


def if_model(shape: list[int], opset: int = 17) -> onnx.ModelProto:
    return neuron_op_model(if_neuron_function(opset), {n: shape for n in ("i", "v", "th")}, ["s", "v2"], shape, opset)


def test_if_op_matches_reference_on_random_inputs() -> None:
    rng = np.random.default_rng(0)
    shape = [3, 5]
    model = if_model(shape)
    for _ in range(20):
        i, v = rng.normal(0, 1, shape).astype(np.float32), rng.normal(0, 1, shape).astype(np.float32)
        th = rng.uniform(0.1, 2, shape).astype(np.float32)
        s, v2 = run_ort(model, {"i": i, "v": v, "th": th})
        rs, rv = if_neuron_reference(i, v, th)
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_allclose(v2, rv, rtol=0, atol=1e-6)
        assert set(np.unique(s)) <= {0.0, 1.0}


def test_if_op_reset_by_subtraction_keeps_the_surplus() -> None:
    model = if_model([1])
    s, v2 = run_ort(model, {"i": np.array([0.7], np.float32), "v": np.array([0.5], np.float32),
                            "th": np.array([1.0], np.float32)})
    assert s[0] == 1.0 and abs(v2[0] - 0.2) < 1e-6


@settings(max_examples=60, deadline=None)
@given(x=st.floats(-1.0, 3.0), theta=st.floats(0.05, 2.0), T=st.integers(1, 400))
def test_if_rate_approaches_clip(x: float, theta: float, T: int) -> None:
    """With v(0) = θ/2 the spike count over T steps is within 1/2 spike of T·clip(x/θ, 0, 1)."""
    v = np.float32(theta / 2)
    count = 0
    cur, th = np.float32(x), np.float32(theta)
    for _ in range(T):
        s, v = if_neuron_reference(cur, v, th)
        count += int(s)
    target = min(max(x / theta, 0.0), 1.0)
    assert abs(count / T - target) <= 0.5 / T + 1e-4
