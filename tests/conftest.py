"""Shared helpers: tiny models written in ONNX text, run with onnxruntime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, with the reason, where onnxruntime has no CUDA provider."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return
    skip = pytest.mark.skip(reason="needs onnxruntime-gpu and a CUDA GPU (README 'One GPU')")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def build(text: str, weights: dict[str, np.ndarray], opset: int = 17,
          ints: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A model from ONNX text whose graph inputs listed in ``weights`` (float32) or ``ints``
    (kept as given) become initializers."""
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + text)
    ints = ints or {}
    keep = [i for i in model.graph.input if i.name not in weights and i.name not in ints]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name, value in weights.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    for name, value in ints.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model with onnxruntime (basic optimisations only, for stable last bits)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


CNN_TEXT = """
g (float[N,1,8,8] x, float[4,1,3,3] W1, float[4] b1, float[4] g1, float[4] be1, float[4] mu1, float[4] var1,
   float[16,64] W2, float[16] b2, float[3,16] W3, float[3] b3) => (float[N,3] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1, b1)
  n1 = BatchNormalization (c1, g1, be1, mu1, var1)
  r1 = Relu (n1)
  p1 = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r1)
  f = Flatten <axis=1> (p1)
  h = Gemm <transB=1> (f, W2, b2)
  r2 = Relu (h)
  y = Gemm <transB=1> (r2, W3, b3)
}
"""


def cnn_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights for CNN_TEXT."""
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.normal(0, 0.5, (4, 1, 3, 3)), "b1": rng.normal(0, 0.1, 4),
        "g1": rng.uniform(0.5, 1.5, 4), "be1": rng.normal(0, 0.1, 4), "mu1": rng.normal(0, 0.1, 4),
        "var1": rng.uniform(0.5, 1.5, 4),
        "W2": rng.normal(0, 0.3, (16, 64)), "b2": rng.normal(0, 0.1, 16),
        "W3": rng.normal(0, 0.3, (3, 16)), "b3": np.zeros(3),
    }


#: a residual block, a max pool on spikes (a cumulative max pool in the SNN), a hidden Gemm layer
RESIDUAL_TEXT = """
g (float[N,1,8,8] x, float[4,1,3,3] W1, float[4] b1, float[4,4,3,3] W2, float[4] b2, float[4,4,3,3] W3, float[4] b3,
   float[6,64] W4, float[6] b4, float[3,6] W5, float[3] b5) => (float[N,3] y) {
  s = Sub (x, half)
  c1 = Conv <pads=[1,1,1,1]> (s, W1, b1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, W2, b2)
  r2 = Relu (c2)
  c3 = Conv <pads=[1,1,1,1]> (r2, W3, b3)
  a = Add (c3, r1)
  r3 = Relu (a)
  p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r3)
  f = Flatten <axis=1> (p)
  h = Gemm <transB=1> (f, W4, b4)
  r4 = Relu (h)
  y = Gemm <transB=1> (r4, W5, b5)
}
"""


def residual_net(seed: int = 0) -> onnx.ModelProto:
    """RESIDUAL_TEXT with random weights."""
    rng = np.random.default_rng(seed)
    return build(RESIDUAL_TEXT, {
        "W1": rng.normal(0, 0.6, (4, 1, 3, 3)), "b1": rng.normal(0, 0.1, 4),
        "W2": rng.normal(0, 0.4, (4, 4, 3, 3)), "b2": rng.normal(0, 0.1, 4),
        "W3": rng.normal(0, 0.4, (4, 4, 3, 3)), "b3": rng.normal(0, 0.1, 4),
        "W4": rng.normal(0, 0.3, (6, 64)), "b4": rng.normal(0, 0.1, 6),
        "W5": rng.normal(0, 0.3, (3, 6)), "b5": np.zeros(3), "half": np.full((1, 1, 1, 1), 0.5)})


@pytest.fixture
def cnn() -> onnx.ModelProto:
    """A tiny Conv-BN-ReLU-MaxPool-Flatten-Gemm-ReLU-Gemm network."""
    return build(CNN_TEXT, cnn_weights())


@pytest.fixture
def cnn_calib() -> dict[str, np.ndarray]:
    """Calibration inputs for the tiny CNN."""
    return {"x": np.random.default_rng(1).uniform(0, 1, (256, 1, 8, 8)).astype(np.float32)}


def digits_path(name: str = "digits_cnn.onnx") -> Path:
    """A committed reference model; skips the test if it is missing."""
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"{path} is not built")
    return path


def apply(model: onnx.ModelProto, *passes, **options):
    """Import ``model``, run ``passes`` in order; returns (state, exported model)."""
    from ann2snn.config import CompileConfig
    from ann2snn.passes._graph import export
    from ann2snn.passes.import_model import import_model

    state = import_model(model, CompileConfig(**options))
    for p in passes:
        p(state)
    out = export(state.graph.copy().cleanup().toposort(), state.opset)
    onnx.checker.check_model(out, full_check=True)
    return state, out


def ops(model: onnx.ModelProto) -> list[str]:
    """The op types of a model's nodes, in order."""
    return [n.op_type for n in model.graph.node]


def neuron_op_model(function: "onnx.FunctionProto", inputs: dict[str, list[int]], outputs: list[str],
                    shape: list[int], opset: int = 17) -> onnx.ModelProto:
    """A model of one node of ``function`` (an ann2snn neuron op): float inputs with the given
    shapes, float outputs of ``shape``; checked with full_check."""
    from onnx import TensorProto, helper

    node = helper.make_node(function.name, list(inputs), outputs, domain=function.domain, name="neuron")
    vi = lambda n, sh: helper.make_tensor_value_info(n, TensorProto.FLOAT, sh)  # noqa: E731
    graph = helper.make_graph([node], "neuron", [vi(n, sh) for n, sh in inputs.items()], [vi(o, shape) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(function.domain, 1)],
                              functions=[function])
    onnx.checker.check_model(model, full_check=True)
    return model
