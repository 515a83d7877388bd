"""Normalisation passes: Identity/Dropout removal, constant folding, flatten chains, opsets."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from ann2snn.errors import ModelLoadError
from ann2snn.passes.fold_constants import fold_constants
from ann2snn.passes.import_model import import_model
from ann2snn.passes.remove_identity import remove_identity
from ann2snn.config import CompileConfig
from conftest import apply, build, ops, run_ort

FLATTEN_CHAIN = """
g (float[N,2,3,3] x, float[18,4] W) => (float[N,4] y) {
  s = Shape (x)
  i0 = Constant <value = int64 {0}> ()
  b = Gather <axis=0> (s, i0)
  ax = Constant <value = int64[1] {0}> ()
  bu = Unsqueeze (b, ax)
  m1 = Constant <value = int64[1] {-1}> ()
  shp = Concat <axis=0> (bu, m1)
  d = Dropout (x)
  r = Reshape (d, shp)
  i = Identity (r)
  y = MatMul (i, W)
}
"""


def test_flatten_chain_and_identity_dropout_resolved() -> None:
    model = build(FLATTEN_CHAIN, {"W": np.random.default_rng(0).normal(0, 1, (18, 4))})
    _, out = apply(model, remove_identity, fold_constants)
    assert ops(out) == ["Reshape", "MatMul"]
    shape = [i for i in out.graph.initializer if i.name == out.graph.node[0].input[1]][0]
    assert list(onnx.numpy_helper.to_array(shape)) == [0, -1]
    for n in (1, 5):  # the batch stays dynamic
        x = np.random.default_rng(n).normal(0, 1, (n, 2, 3, 3)).astype(np.float32)
        np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_identity_on_graph_output_keeps_the_output_name() -> None:
    model = build("g (float[N,3] x) => (float[N,3] y) { r = Relu (x)\n y = Identity (r) }", {})
    _, out = apply(model, remove_identity)
    assert ops(out) == ["Relu"] and out.graph.output[0].name == "y"


def test_old_opset_is_upgraded_and_too_new_refused() -> None:
    model = build("g (float[N,3] x) => (float[N,3] y) { y = Relu (x) }", {}, opset=11)
    state = import_model(model, CompileConfig())
    assert state.opset == 13
    new = build("g (float[N,3] x) => (float[N,3] y) { y = Relu (x) }", {}, opset=17)
    new.opset_import[0].version = 99
    with pytest.raises(ModelLoadError, match="opset 99, newer than the newest ann2snn supports"):
        import_model(new, CompileConfig())
