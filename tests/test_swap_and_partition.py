"""swap_maxpool (pre-neuron max pooling) and partition_graph (spiking part vs analog tail)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from ann2snn.errors import UnsupportedModelError
from ann2snn.passes.find_activations import find_activations
from ann2snn.passes.fold_batchnorm import fold_batchnorm
from ann2snn.passes.fold_constants import fold_constants
from ann2snn.passes.partition_graph import partition_graph
from ann2snn.passes.swap_maxpool import swap_maxpool
from conftest import apply, build, ops, run_ort


def test_maxpool_moves_before_the_activation_exactly(cnn) -> None:
    state, out = apply(cnn, fold_constants, fold_batchnorm, find_activations, swap_maxpool)
    assert ops(out)[:3] == ["Conv", "MaxPool", "Relu"]
    site = state.sites[0]
    assert site.shape == (4, 4, 4)
    x = np.random.default_rng(0).normal(0, 1, (3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(cnn, {"x": x})[0], rtol=1e-4, atol=1e-4)


TAIL = """
g (float[N,4] x, float[6,4] W1, float[3,6] W2) => (float[N,3] y, float[N,3] p) {
  h = Gemm <transB=1> (x, W1)
  a = Relu (h)
  o = Gemm <transB=1> (a, W2)
  y = Relu (o)
  p = Softmax <axis=1> (o)
}
"""


def test_output_activation_and_softmax_stay_in_the_tail() -> None:
    rng = np.random.default_rng(0)
    model = build(TAIL, {"W1": rng.normal(0, 1, (6, 4)), "W2": rng.normal(0, 1, (3, 6))})
    state, _ = apply(model, fold_constants, find_activations, swap_maxpool, partition_graph)
    assert len(state.sites) == 1  # the output ReLU is no neuron
    assert state.boundary == ["o"]
    assert len(state.tail) == 2


MIDDLE = """
g (float[N,4] x, float[6,4] W1, float[6,6] W2, float[3,6] W3) => (float[N,3] y) {
  h = Gemm <transB=1> (x, W1)
  a = Relu (h)
  k = Gemm <transB=1> (a, W2)
  s = Sigmoid (k)
  m = Gemm <transB=1> (s, W2)
  b = Relu (m)
  y = Gemm <transB=1> (b, W3)
}
"""


def test_mid_network_sigmoid_warns_or_fails_with_strict(caplog) -> None:
    rng = np.random.default_rng(0)
    model = build(MIDDLE, {"W1": rng.normal(0, 1, (6, 4)), "W2": rng.normal(0, 1, (6, 6)),
                           "W3": rng.normal(0, 1, (3, 6))})
    with caplog.at_level(logging.WARNING):
        state, _ = apply(model, fold_constants, find_activations, swap_maxpool, partition_graph)
    assert len(state.sites) == 1 and "Sigmoid" in caplog.text and "stay analog" in caplog.text
    with pytest.raises(UnsupportedModelError, match=r"node '.*' \(ai.onnx::Sigmoid\) is not spike-compatible"):
        apply(model, fold_constants, find_activations, swap_maxpool, partition_graph, strict=True)


def test_spiking_until_moves_the_boundary_by_hand() -> None:
    rng = np.random.default_rng(0)
    model = build(MIDDLE, {"W1": rng.normal(0, 1, (6, 4)), "W2": rng.normal(0, 1, (6, 6)),
                           "W3": rng.normal(0, 1, (3, 6))})
    state, _ = apply(model, fold_constants, find_activations, swap_maxpool, partition_graph, spiking_until=("a",))
    # the ReLU before the cut has no weight after it: no neuron; it stays in the time-constant
    # prefix, and the tail starts at the cut
    assert state.sites == [] and state.boundary == ["a"] and state.tail[0] != "relu"
    with pytest.raises(UnsupportedModelError, match="--spiking-until names tensor.*'nope'.*ann2snn inspect"):
        apply(model, fold_constants, find_activations, swap_maxpool, partition_graph, spiking_until=("nope",))


def test_leaky_relu_in_the_middle_is_a_clear_error_without_signed_sites() -> None:
    """--signed-sites off: LeakyReLU inside the spiking part is an error naming the remedy; by
    default (auto) it is a signed site of kind 'output' and the spiking part goes through it."""
    rng = np.random.default_rng(0)
    text = MIDDLE.replace("s = Sigmoid (k)", "s = LeakyRelu <alpha=0.1> (k)")
    model = build(text, {"W1": rng.normal(0, 1, (6, 4)), "W2": rng.normal(0, 1, (6, 6)), "W3": rng.normal(0, 1, (3, 6))})
    with pytest.raises(UnsupportedModelError, match=r"\(ai.onnx::LeakyRelu\) has a negative slope.*--spiking-until 'k'"):
        apply(model, fold_constants, find_activations, swap_maxpool, partition_graph, signed_sites="off")
    state, _ = apply(model, fold_constants, find_activations, swap_maxpool, partition_graph, spiking_until=("k",),
                     signed_sites="off")
    assert len(state.sites) == 1 and state.boundary == ["k"]
    state, _ = apply(model, fold_constants, find_activations, swap_maxpool, partition_graph)
    assert [s.kind for s in state.sites] == ["relu", "output", "relu"] and not state.tail
