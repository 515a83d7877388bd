"""fold_batchnorm: BatchNorm disappears into Conv / ConvTranspose / Gemm / MatMul, outputs unchanged."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ann2snn.passes.fold_batchnorm import fold_batchnorm
from ann2snn.passes.fold_constants import fold_constants
from conftest import apply, build, ops, run_ort


def bn_weights(rng: np.random.Generator, c: int, suffix: str = "") -> dict[str, np.ndarray]:
    return {f"g{suffix}": rng.uniform(0.2, 2, c), f"b{suffix}": rng.normal(0, 0.5, c),
            f"m{suffix}": rng.normal(0, 0.5, c), f"v{suffix}": rng.uniform(0.1, 2, c)}


@settings(max_examples=25, deadline=None)
@given(cin=st.integers(1, 4), mult=st.integers(1, 3), group_kind=st.sampled_from(["one", "depthwise"]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_bn_fold_preserves_outputs(cin: int, mult: int, group_kind: str, bias: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = 1 if group_kind == "one" else cin
    cout = cin * mult
    b_in = ", float[C] cb" if bias else ""
    b_arg = ", cb" if bias else ""
    text = f"""
    g (float[N,{cin},6,6] x, float[{cout},{cin // groups},3,3] W{b_in.replace('C', str(cout))},
       float[{cout}] g, float[{cout}] b, float[{cout}] m, float[{cout}] v) => (float[N,{cout},6,6] y) {{
      c = Conv <pads=[1,1,1,1], group={groups}> (x, W{b_arg})
      y = BatchNormalization <epsilon=0.001> (c, g, b, m, v)
    }}"""
    weights = {"W": rng.normal(0, 1, (cout, cin // groups, 3, 3)), **bn_weights(rng, cout)}
    if bias:
        weights["cb"] = rng.normal(0, 1, cout)
    model = build(text, weights)
    _, folded = apply(model, fold_constants, fold_batchnorm)
    assert ops(folded) == ["Conv"]
    x = rng.normal(0, 1, (2, cin, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run_ort(folded, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_gemm_and_matmul_bn_fold() -> None:
    rng = np.random.default_rng(0)
    text = """
    g (float[N,5] x, float[4,5] W, float[4] c, float[4] g, float[4] b, float[4] m, float[4] v,
       float[4,3] M, float[3] g2, float[3] b2, float[3] m2, float[3] v2) => (float[N,3] y) {
      h = Gemm <transB=1, beta=0.5> (x, W, c)
      n = BatchNormalization (h, g, b, m, v)
      k = MatMul (n, M)
      y = BatchNormalization (k, g2, b2, m2, v2)
    }"""
    weights = {"W": rng.normal(0, 1, (4, 5)), "c": rng.normal(0, 1, 4), **bn_weights(rng, 4),
               "M": rng.normal(0, 1, (4, 3)), **bn_weights(rng, 3, "2")}
    model = build(text, weights)
    _, folded = apply(model, fold_constants, fold_batchnorm)
    assert "BatchNormalization" not in ops(folded)
    assert [o for o in ops(folded)] == ["Gemm", "MatMul", "Add"]
    assert folded.graph.output[0].name == "y"
    x = rng.normal(0, 1, (3, 5)).astype(np.float32)
    np.testing.assert_allclose(run_ort(folded, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_no_fold_when_conv_output_has_other_consumers_and_lone_bn() -> None:
    rng = np.random.default_rng(1)
    text = """
    g (float[N,2,4,4] x, float[2,2,1,1] W, float[2] g, float[2] b, float[2] m, float[2] v) => (float[N,2,4,4] y) {
      c = Conv (x, W)
      n = BatchNormalization (c, g, b, m, v)
      y = Add (n, c)
    }"""
    model = build(text, {"W": rng.normal(0, 1, (2, 2, 1, 1)), **bn_weights(rng, 2)})
    _, folded = apply(model, fold_constants, fold_batchnorm)
    assert ops(folded) == ["Conv", "Mul", "Add", "Add"]
    x = rng.normal(0, 1, (2, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_ort(folded, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_conv_transpose_bn_fold() -> None:
    rng = np.random.default_rng(2)
    text = """
    g (float[N,4,3,3] x, float[4,3,2,2] W, float[6] g, float[6] b, float[6] m, float[6] v) => (float[N,6,6,6] y) {
      c = ConvTranspose <strides=[2,2], group=2> (x, W)
      y = BatchNormalization (c, g, b, m, v)
    }"""
    model = build(text, {"W": rng.normal(0, 1, (4, 3, 2, 2)), **bn_weights(rng, 6)})
    _, folded = apply(model, fold_constants, fold_batchnorm)
    assert ops(folded) == ["ConvTranspose"]
    x = rng.normal(0, 1, (2, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(run_ort(folded, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-4)
