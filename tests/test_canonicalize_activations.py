"""canonicalize_activations: each exporter's spelling of an activation becomes one op.

Per spelling: a tiny graph in ONNX text, the pass, the op it became (standard ONNX where the
opset has it, else an ann2snn.activations function), the same outputs as before in onnxruntime,
and onnx.checker with full_check."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from ann2snn.config import CompileConfig
from ann2snn.passes._graph import export
from ann2snn.passes.canonicalize_activations import DOMAIN, canonicalize_activations
from ann2snn.passes.import_model import import_model
from conftest import build, run_ort

C = {"zero": 0.0, "three": 3.0, "six": 6.0, "sixth": 1.0 / 6.0, "half": 0.5, "one": 1.0, "rt2": float(np.sqrt(2.0)),
     "k": float(np.sqrt(2.0 / np.pi)), "cubic": 0.044715, "p3": 3.0, "two": 2.0, "eps": 1e-5, "c64": 64.0}

#: (name, body with input x [N, 8] and output y, opset, the op it must become)
SPELLINGS = [
    ("relu as Max (jax2tf)", "y = Max (x, zero)", 17, "Relu"),
    ("a clamp Min(Max(x, 0), 64) is a Clip, not a ReLU", "m = Max (x, zero)\n y = Min (m, c64)", 17, "Clip"),
    ("SiLU x*Sigmoid(x) (ultralytics)", "s = Sigmoid (x)\n y = Mul (x, s)", 17, f"{DOMAIN}::SiLU"),
    ("HardSigmoid Clip/Div (torch opset 9)", "a = Add (x, three)\n c = Clip (a, zero, six)\n y = Div (c, six)", 17,
     "HardSigmoid"),
    ("HardSigmoid Min(Max)*(1/6) (jax)", "a = Add (x, three)\n m = Max (a, zero)\n c = Min (m, six)\n y = Mul (c, sixth)",
     17, "HardSigmoid"),
    ("HardSwish x*HardSigmoid(x) (torch opset 9, paddle2onnx)",
     "s = HardSigmoid <alpha=0.16666667, beta=0.5> (x)\n y = Mul (x, s)", 13, f"{DOMAIN}::HardSwish"),
    ("HardSwish x*HardSigmoid(x) at opset 14", "s = HardSigmoid <alpha=0.16666667, beta=0.5> (x)\n y = Mul (x, s)", 14,
     "HardSwish"),
    ("HardSwish Clip/Div/Mul (PP-OCR)", "a = Add (x, three)\n c = Clip (a, zero, six)\n m = Mul (x, c)\n y = Div (m, six)",
     17, "HardSwish"),
    ("HardSwish Add/Clip/Mul/Mul (tf2onnx, Keras 3)",
     "a = Add (x, three)\n c = Clip (a, zero, six)\n d = Mul (c, sixth)\n y = Mul (x, d)", 15, "HardSwish"),
    ("GELU via Erf (torch)", "d = Div (x, rt2)\n e = Erf (d)\n f = Add (e, one)\n g = Mul (x, f)\n y = Mul (g, half)",
     17, f"{DOMAIN}::Gelu"),
    ("GELU via Erf at opset 20", "d = Div (x, rt2)\n e = Erf (d)\n f = Add (e, one)\n g = Mul (x, f)\n y = Mul (g, half)",
     20, "Gelu"),
    ("GELU tanh polynomial (jax2tf, Keras)",
     "p = Pow (x, p3)\n q = Mul (p, cubic)\n r = Add (x, q)\n s = Mul (r, k)\n t = Tanh (s)\n u = Add (t, one)\n"
     " v = Mul (u, half)\n y = Mul (x, v)", 15, f"{DOMAIN}::GeluTanh"),
    ("Softmax written out (jax2tf)",
     "m = ReduceMax <axes=[-1], keepdims=1> (x)\n d = Sub (x, m)\n e = Exp (d)\n"
     " s = ReduceSum <keepdims=1> (e, ax)\n y = Div (e, s)", 13, "Softmax"),
]

LAYER_NORM = """
    m = ReduceMean <axes=[-1]> (x)
    d = Sub (x, m)
    p = Pow (d, two)
    v = ReduceMean <axes=[-1]> (p)
    a = Add (v, eps)
    s = Sqrt (a)
    n = Div (d, s)
    g = Mul (n, gamma)
    y = Add (g, beta)
"""


def _model(body: str, opset: int, extra: dict | None = None) -> onnx.ModelProto:
    consts = {k: np.array(v, np.float32) for k, v in C.items() if k in body.replace("(", " ").replace(",", " ").replace(")", " ").split()}
    consts.update(extra or {})
    decl = ", ".join(f"float {k}" if np.ndim(v) == 0 else f"float[{','.join(map(str, np.shape(v)))}] {k}"
                     for k, v in consts.items())
    ints = {"ax": np.array([-1], np.int64)} if " ax)" in body else {}
    text = f"g (float[N, 8] x{', ' + decl if decl else ''}{', int64[1] ax' if ints else ''}) => (float[N, 8] y) {{\n{body}\n}}"
    return build(text, consts, opset=opset, ints=ints)


def _canonical(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    state = canonicalize_activations(import_model(model, CompileConfig()))
    out = export(state.graph.copy().cleanup().toposort(), state.opset)
    if state.graph.functions:
        out.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    onnx.checker.check_model(out, full_check=True)
    ops = [f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in out.graph.node]
    return out, ops


@pytest.mark.parametrize("name,body,opset,target", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_spelling_becomes_one_op(name: str, body: str, opset: int, target: str) -> None:
    model = _model(body, opset)
    out, ops = _canonical(model)
    assert ops == [target], ops
    x = {"x": (np.random.default_rng(1).normal(size=(16, 8)) * 4).astype(np.float32)}
    np.testing.assert_allclose(run_ort(out, x)[0], run_ort(model, x)[0], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("opset,target", [(13, f"{DOMAIN}::LayerNormalization"), (17, "LayerNormalization")])
def test_layer_norm_written_out_becomes_one_op(opset: int, target: str) -> None:
    rng = np.random.default_rng(0)
    model = _model(LAYER_NORM, opset, {"gamma": rng.normal(1, .2, 8).astype(np.float32),
                                       "beta": rng.normal(0, .2, 8).astype(np.float32)})
    out, ops = _canonical(model)
    assert ops == [target], ops
    x = {"x": (rng.normal(size=(16, 8)) * 3 + 1).astype(np.float32)}
    np.testing.assert_allclose(run_ort(out, x)[0], run_ort(model, x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("body", [
    "s = Sigmoid (x)\n t = Mul (s, two)\n y = Mul (x, t)",  # 2·x·sigmoid(x): no known activation
    "a = Add (x, three)\n c = Clip (a, zero, six)\n d = Mul (c, sixth)\n y = Mul (x, d)\n",  # fine alone ...
])
def test_near_misses_and_shared_inner_tensors_are_left_alone(body: str) -> None:
    if "Clip" in body:  # ... but not when an inner tensor is also a graph output
        text = ("g (float[N, 8] x, float three, float zero, float six, float sixth) => (float[N, 8] y, float[N, 8] c) {\n"
                + body + "}")
        model = build(text, {k: np.array(C[k], np.float32) for k in ("three", "zero", "six", "sixth")}, opset=15)
    else:
        model = _model(body, 17)
    _, ops = _canonical(model)
    assert "HardSwish" not in ops and not any(o.startswith(DOMAIN) for o in ops), ops


def test_relu_written_as_max_becomes_a_neuron() -> None:
    """jax2tf writes ReLU as Max(x, 0): without the pass the network has no neuron at all."""
    import ann2snn

    rng = np.random.default_rng(0)
    text = """g (float[N, 8] x, float[16, 8] W1, float[16] b1, float zero, float[4, 16] W2, float[4] b2) => (float[N, 4] y) {
      a = Gemm <transB=1> (x, W1, b1)
      r = Max (a, zero)
      y = Gemm <transB=1> (r, W2, b2)
    }"""
    model = build(text, {"W1": rng.normal(0, .5, (16, 8)), "b1": np.zeros(16), "zero": np.array(0.0),
                         "W2": rng.normal(0, .5, (4, 16)), "b2": np.zeros(4)})
    snn = ann2snn.compile(model, {"x": rng.normal(size=(64, 8)).astype(np.float32)}, iters=5, batch=16)
    assert [n.op_type for n in snn.graph.node].count("IFNeuron") == 1


def test_functions_are_carried_into_the_compiled_model_and_its_tail() -> None:
    """A GELU below the opset that has Gelu is a model-local function; the compiled model and
    the runtime's tail model both carry it, and the SNN runs on stock onnxruntime."""
    import ann2snn
    from ann2snn.runtime import SpikingSession

    rng = np.random.default_rng(0)
    gelu = "d = Div (h, rt2)\n e = Erf (d)\n f = Add (e, one)\n g = Mul (h, f)\n z = Mul (g, half)"
    text = f"""g (float[N, 8] x, float[16, 8] W1, float[16] b1, float[16, 16] W2, float[16] b2, float rt2, float one,
               float half, float[4, 16] W3, float[4] b3) => (float[N, 4] y) {{
      a = Gemm <transB=1> (x, W1, b1)
      r = Relu (a)
      h = Gemm <transB=1> (r, W2, b2)
      {gelu}
      y = Gemm <transB=1> (z, W3, b3)
    }}"""
    w = {"W1": rng.normal(0, .5, (16, 8)), "b1": np.zeros(16), "W2": rng.normal(0, .3, (16, 16)), "b2": np.zeros(16),
         "rt2": np.array(np.sqrt(2.0)), "one": np.array(1.0), "half": np.array(0.5), "W3": rng.normal(0, .5, (4, 16)),
         "b3": np.zeros(4)}
    model = build(text, w)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    snn = ann2snn.compile(model, {"x": x})
    assert any(f.domain == DOMAIN and f.name == "Gelu" for f in snn.functions)
    ref = run_ort(model, {"x": x[:16]})[0]
    session = SpikingSession(snn)
    err = {T: float(np.abs(session.run({"x": x[:16]}, T)["y"] - ref).mean() / np.abs(ref).mean()) for T in (16, 256)}
    assert err[256] < err[16] and err[256] < 0.1, err


def test_gs_function_round_trip_keeps_the_body() -> None:
    """The function the pass adds to the graph is exported with its body intact."""
    model = _model("s = Sigmoid (x)\n y = Mul (x, s)", 17)
    state = canonicalize_activations(import_model(model, CompileConfig()))
    assert [f.name for f in state.graph.functions] == ["SiLU"]
    assert isinstance(state.graph.functions[0], gs.Function)
    assert [n.op for n in state.graph.functions[0].nodes] == ["Sigmoid", "Mul"]


def test_function_in_the_time_constant_prefix_runs() -> None:
    """A canonical function op before the first neuron (the prefix, in the step graph itself)."""
    import ann2snn
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.reference import reference_run

    rng = np.random.default_rng(0)
    text = """g (float[N, 8] x, float[16, 8] W1, float[16] b1, float[4, 16] W2, float[4] b2) => (float[N, 4] y) {
      s = Sigmoid (x)
      u = Mul (x, s)
      a = Gemm <transB=1> (u, W1, b1)
      r = Relu (a)
      y = Gemm <transB=1> (r, W2, b2)
    }"""
    model = build(text, {"W1": rng.normal(0, .5, (16, 8)), "b1": np.zeros(16), "W2": rng.normal(0, .5, (4, 16)),
                         "b2": np.zeros(4)})
    x = rng.normal(size=(64, 8)).astype(np.float32)
    snn = ann2snn.compile(model, {"x": x}, iters=10, batch=16)
    assert any(n.domain == DOMAIN and n.op_type == "SiLU" for n in snn.graph.node)
    np.testing.assert_array_equal(SpikingSession(snn).run({"x": x[:4]}, 16)["y"], reference_run(snn, {"x": x[:4]}, 16)["y"])
