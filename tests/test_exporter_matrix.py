"""Issue 23: the exporter matrix. The same four reference networks (models/exporters/) exported by
torch (TorchScript and dynamo), tf2onnx, Keras 3, JAX (jax2tf + tf2onnx), paddle2onnx, skl2onnx and
an old zoo-style IR 3 export; every cell compiles with the defaults, ``inspect`` explains every
node, and the SNN converges to its ANN. Plus what the issue lists as bad input, integer inputs,
infinities, empty initializers and symbolic sizes."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ann2snn
from ann2snn.analysis.evaluate import evaluate
from ann2snn.analysis.inspection import ROLES, inspect_model
from ann2snn.runtime import SpikingSession
from conftest import MODELS, ROOT, build

_spec = importlib.util.spec_from_file_location("exporter_matrix_cells", MODELS / "exporters" / "matrix.py")
matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)

CELLS = [pytest.param(n, e, id=f"{n}-{e}") for n, e in matrix.cells()]
#: the activations that stay analog in each network, as inspect names them once recognised
ANALOG = {"mbv3": ("HardSwish",), "transformer": ("LayerNormalization", "Softmax", "Gelu")}


@pytest.fixture(scope="module")
def results() -> dict:
    return {}


def _run(net: str, exporter: str, cache: dict) -> dict:
    if (net, exporter) not in cache:
        path = matrix.cell_path(net, exporter)
        snn = ann2snn.compile(path, matrix.cell_inputs(path, "calib"))
        data = matrix.cell_inputs(path, "test")
        data["label"] = matrix.labels()
        cache[(net, exporter)] = {"snn": snn, "eval": evaluate(path, SpikingSession(snn), data, [8, 32, 64],
                                                                batch_size=matrix.batch_size(path, 300))}
    return cache[(net, exporter)]


def test_every_cell_is_committed() -> None:
    """4 networks x 7 exporters + the 2 scikit-learn cells; the files are small."""
    cells = matrix.cells()
    assert len(cells) == 4 * 7 + 2, cells
    for net, exporter in cells:
        assert matrix.cell_path(net, exporter).stat().st_size < 200_000


@pytest.mark.parametrize("net,exporter", CELLS)
def test_cell_compiles_and_converges(net: str, exporter: str, results: dict) -> None:
    """Defaults, committed calibration data: error falls with T, and at T = 64 the SNN's accuracy
    is within 1 point of the ANN's (agreement within 2 points: the MobileNetV3 block has low margins)."""
    res = _run(net, exporter, results)["eval"]
    rows = {r["T"]: r for r in res["snn"]}
    if rows[8]["relative_error"] is not None:
        assert rows[64]["relative_error"] < rows[8]["relative_error"], rows
    assert rows[64]["agreement"] >= rows[8]["agreement"], rows
    assert rows[64]["accuracy"] >= res["ann_accuracy"] - 0.01, (res["ann_accuracy"], rows)
    assert rows[64]["agreement"] >= 0.98, rows
    assert any(n.op_type.endswith("IFNeuron") for n in _run(net, exporter, results)["snn"].graph.node)


@pytest.mark.parametrize("net,exporter", CELLS)
def test_inspect_explains_every_node(net: str, exporter: str) -> None:
    """Every row has a role and a reason; written-out activations are named as the op they are,
    and the ones that stay analog say why."""
    info = inspect_model(matrix.cell_path(net, exporter))
    assert not info["problems"], info["problems"]
    assert info["neuron_layers"] >= 1
    for row in info["nodes"]:
        assert row["role"] in ROLES and row["role"] != "unsupported" and row["detail"], row
    text = "\n".join(r["op"] + " " + r["detail"] for r in info["nodes"])
    for op in ANALOG.get(net, ()) if exporter not in ("skl2onnx",) else ():
        assert op in text, (op, text)
    if net in ANALOG:
        assert "ends the spiking part: " in text


def test_canonical_ops_reach_the_partition() -> None:
    """Each exporter's spelling of the MobileNetV3 block's HardSwish ends the spiking part as one
    op; the JAX export's ReLUs (written as Max(x, 0)) become neurons."""
    for exporter in ("torch_legacy", "torch_dynamo", "tf2onnx", "keras3", "jax", "paddle"):
        info = inspect_model(matrix.cell_path("mbv3", exporter))
        ends = [r for r in info["nodes"] if r["detail"].startswith(("HardSwish", "Mul recognised as", "Mul recognised"))
                or "ends the spiking part: HardSwish" in r["detail"]]
        assert ends, (exporter, [r["detail"] for r in info["nodes"]])
    jax = inspect_model(matrix.cell_path("cnn", "jax"))
    assert [r["detail"].split(";")[0] for r in jax["nodes"] if r["role"] == "neuron"] == ["Max recognised as Relu"] * 3


def test_integer_front_ends_stay_exact_in_the_prefix() -> None:
    """Token ids through Gather (torch, Keras, paddle), one-hot Expand->Equal->Cast->MatMul (JAX) and
    OneHotEncoder (scikit-learn) run in the time-constant prefix, on the integer input as given."""
    for exporter in ("torch_legacy", "tf2onnx", "jax", "paddle", "skl2onnx"):
        path = matrix.cell_path("embedding", exporter)
        info = inspect_model(path)
        integer_ops = [r for r in info["nodes"] if r["op"].split("::")[1] in ("Gather", "Equal", "OneHotEncoder")]
        assert integer_ops and all(r["role"] in ("prefix", "folded") for r in integer_ops), integer_ops
        snn = ann2snn.compile(path, matrix.cell_inputs(path, "calib"))
        source = onnx.load(str(path))
        assert snn.graph.input[0].type.tensor_type.elem_type == source.graph.input[0].type.tensor_type.elem_type


def test_jax_infinities_compile() -> None:
    """jax2tf's softmax holds Max(-inf, ReduceMax): a legitimate constant, left alone."""
    path = matrix.cell_path("transformer", "jax")
    values = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    assert any(v.dtype.kind == "f" and np.isneginf(v).any() for v in values)
    ann2snn.compile(path, matrix.cell_inputs(path, "calib"), iters=5, batch=32)


def test_infinity_made_by_folding_a_source_infinity_is_left_alone() -> None:
    """A constant subgraph on a source -inf (Neg(inf)) folds to -inf without an overflow error."""
    rng = np.random.default_rng(0)
    text = """g (float[N,4] x) => (float[N,3] y) {
      a = Gemm <transB=1> (x, W1, b1)
      r = Relu (a)
      n = Neg (posinf)
      m = Max (r, n)
      y = Gemm <transB=1> (m, W2, b2)
    }"""
    w = {"W1": rng.normal(0, .5, (8, 4)), "b1": np.zeros(8), "W2": rng.normal(0, .5, (3, 8)), "b2": np.zeros(3),
         "posinf": np.array(np.inf)}
    snn = ann2snn.compile(build(text, w), {"x": rng.normal(size=(32, 4)).astype(np.float32)}, iters=5, batch=8)
    assert any(n.op_type.endswith("IFNeuron") for n in snn.graph.node)


def test_empty_initializer_where_onnx_allows_it() -> None:
    """Resize's unused ``roi`` as an empty initializer (paddle2onnx writes one) compiles."""
    rng = np.random.default_rng(0)
    text = """g (float[N,1,4,4] x) => (float[N,3] y) {
      c = Conv <pads=[1,1,1,1]> (x, W, b)
      r = Relu (c)
      u = Resize <mode="nearest"> (r, roi, scales)
      f = Flatten (u)
      y = Gemm <transB=1> (f, W2, b2)
    }"""
    model = build(text, {"W": rng.normal(0, .5, (2, 1, 3, 3)), "b": np.zeros(2), "roi": np.zeros(0),
                         "scales": np.array([1, 1, 2, 2]), "W2": rng.normal(0, .2, (3, 128)), "b2": np.zeros(3)})
    snn = ann2snn.compile(model, {"x": rng.uniform(size=(16, 1, 4, 4)).astype(np.float32)}, iters=5, batch=8)
    assert any(n.op_type == "Resize" for n in snn.graph.node)


def _symbolic_hw_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    text = """g (float[N,1,H,W] x) => (float[N,3] y) {
      c = Conv <pads=[1,1,1,1]> (x, W1, b1)
      r = Relu (c)
      d = Conv <pads=[1,1,1,1]> (r, W2, b2)
      s = Relu (d)
      p = GlobalAveragePool (s)
      f = Flatten (p)
      y = Gemm <transB=1> (f, W3, b3)
    }"""
    return build(text, {"W1": rng.normal(0, .5, (4, 1, 3, 3)), "b1": np.zeros(4), "W2": rng.normal(0, .3, (4, 4, 3, 3)),
                        "b2": np.zeros(4), "W3": rng.normal(0, .5, (3, 4)), "b3": np.zeros(3)})


def test_symbolic_sizes_inspect_report_and_run(tmp_path) -> None:
    """Symbolic H x W: inspect counts MACs given the sizes (or the compiled model), and report and
    run work on the compiled model."""
    from ann2snn.analysis.report import report

    model = _symbolic_hw_cnn()
    assert inspect_model(model)["macs"]["total"] == 12  # without sizes only the Gemm can be counted
    x = np.random.default_rng(1).uniform(size=(32, 1, 8, 8)).astype(np.float32)
    snn = ann2snn.compile(model, {"x": x}, iters=5, batch=16)
    by_shape = inspect_model(model, input_shapes={"x": [1, 1, 8, 8]})
    by_compiled = inspect_model(model, compiled=snn)
    macs = 4 * 9 * 64 + 4 * 4 * 9 * 64 + 4 * 3
    assert by_shape["macs"]["total"] == by_compiled["macs"]["total"] == macs
    path = tmp_path / "snn.onnx"
    onnx.save(snn, str(path))
    out = SpikingSession(snn).run({"x": x[:4]}, 16)
    assert out["y"].shape == (4, 3)
    rep = report(path, {"x": x[:8]}, [16])
    assert rep["ann"]["macs"] == macs and rep["samples"] == 8  # the calibration data's size, not 0 MACs
    # the CLI takes the sizes too
    from click.testing import CliRunner

    from ann2snn.cli import main
    src = tmp_path / "src.onnx"
    onnx.save(model, str(src))
    for extra in (["--input-shape", "x=1x1x8x8"], ["--compiled", str(path)]):
        result = CliRunner().invoke(main, ["inspect", str(src), "--json", *extra])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["macs"]["total"] == macs
    bad = CliRunner().invoke(main, ["inspect", str(src), "--input-shape", "x=1x1x8"[:-1] + "y"])
    assert bad.exit_code == 2 and "--input-shape takes NAME=D0xD1x..." in bad.output
    typo = CliRunner().invoke(main, ["inspect", str(src), "--input-shape", "images=1x1x8x8"])
    assert typo.exit_code == 2 and "--input-shape names 'images', which is not an input of the model; " \
                                   "its inputs are 'x'" in typo.output


LOOP_BODY = helper.make_graph(
    [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Relu", ["v_in"], ["v_out"])],
    "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 4])],
    [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
     helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 4])])


def _bad_model(kind: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    inits = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc")]
    if kind == "loop":
        inits += [numpy_helper.from_array(np.array(8, np.int64), "steps"), numpy_helper.from_array(np.array(True), "go")]
        nodes.append(helper.make_node("Loop", ["steps", "go", "h"], ["y"], name="over_time", body=LOOP_BODY))
    elif kind == "random":
        nodes += [helper.make_node("RandomNormalLike", ["h"], ["noise"], name="noise", dtype=TensorProto.FLOAT),
                  helper.make_node("Add", ["h", "noise"], ["y"], name="add_noise")]
    elif kind == "dropout":
        inits += [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                  numpy_helper.from_array(np.array(True), "training")]
        nodes += [helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("Dropout", ["r", "ratio", "training"], ["y"], name="drop")]
    elif kind == "batchnorm":
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 1])
        inits += [numpy_helper.from_array(np.array([-1, 4, 1, 1], np.int64), "shape")] + \
                 [numpy_helper.from_array(np.full(4, v, np.float32), n) for n, v in
                  (("g", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0))]
        nodes += [helper.make_node("Reshape", ["h", "shape"], ["h4"], name="to4d"),
                  helper.make_node("BatchNormalization", ["h4", "g", "b", "m", "v"], ["y", "rm", "rv"],
                                   name="bn", training_mode=1)]
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                 opset_imports=[helper.make_opsetid("", 17)])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind,match", [
    ("loop", r"node 'over_time' \(ai.onnx::Loop\) is control flow"),
    ("random", r"node 'noise' \(ai.onnx::RandomNormalLike\) draws random numbers"),
    ("dropout", r"node 'drop' \(ai.onnx::Dropout\) is in training mode \(drops random units\).*eval mode"),
    ("batchnorm", r"node 'bn' \(ai.onnx::BatchNormalization\) is in training mode.*eval mode"),
])
def test_bad_input_is_refused_by_node_op_and_reason(kind: str, match: str) -> None:
    model = _bad_model(kind)
    with pytest.raises(ann2snn.UnsupportedModelError, match=match):
        ann2snn.compile(model, {"x": np.ones((4, 4), np.float32)})


def test_benchmark_script_lists_every_cell() -> None:
    spec = importlib.util.spec_from_file_location("exporter_matrix_bench", ROOT / "benchmarks" / "exporter_matrix.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.load_matrix().cells() == matrix.cells()
