"""NIR export: the graph, its values and its metadata, read back with ``nir.read``; a numpy
simulation of the exported graph under ann2snn's neuron rule reproduces the step model.

Skipped when the optional package ``nir`` is not installed.
"""
from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import ann2snn
from ann2snn.errors import ConfigError, UnsupportedModelError
from ann2snn.runtime import SpikingSession
from conftest import CNN_TEXT, MODELS, build, cnn_weights, digits_path

nir = pytest.importorskip("nir")

from ann2snn.export.nir import LOST, NirExportError, export_nir, to_nir  # noqa: E402

PLAIN = """
g (float[N,2,6,6] x, float[4,2,3,3] W1, float[4] b1, float[6,4,3,3] W2, float[6] b2, float[3,6] W3, float[3] b3)
  => (float[N,3] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1, b1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1], strides=[2,2]> (r1, W2, b2)
  r2 = Relu (c2)
  p = GlobalAveragePool (r2)
  f = Flatten (p)
  y = Gemm <transB=1> (f, W3, b3)
}
"""

RESIDUAL = """
g (float[N,2,6,6] x, float[4,2,3,3] W1, float[4,4,3,3] W2, float[4,4,3,3] W3, float[3,4] W4) => (float[N,3] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, W2)
  r2 = Relu (c2)
  c3 = Conv <pads=[1,1,1,1]> (r2, W3)
  a = Add (c3, r1)
  r3 = Relu (a)
  p = GlobalAveragePool (r3)
  f = Flatten (p)
  y = Gemm <transB=1> (f, W4)
}
"""

# input normalisation, grouped / strided / dilated Conv, AveragePool, constant Mul/Add/Sub/Div,
# a Sum of three branches, MatMul + bias
MIXED = """
g (float[N,2,8,8] x, float[1,2,1,1] mu, float[1,2,1,1] sd, float[4,2,3,3] W1, float[4,2,3,3] W2, float[1,4,1,1] k1,
   float[1,4,1,1] k2, float[1] k3, float[1] k4, float[4,4,1,1] W3, float[16,5] M, float[5] bm, float[5,3] Wy)
  => (float[N,3] y) {
  s = Sub (x, mu)
  d = Div (s, sd)
  c1 = Conv <pads=[1,1,1,1]> (d, W1)
  r1 = Relu (c1)
  c2 = Conv <group=2, pads=[2,2,2,2], dilations=[2,2]> (r1, W2)
  r2 = Relu (c2)
  m1 = Mul (r2, k1)
  a1 = Add (m1, k2)
  s1 = Sub (a1, k3)
  e = Div (s1, k4)
  c3 = Conv (e, W3)
  t = Sum (c3, r1, c2)
  r3 = Relu (t)
  q = AveragePool <kernel_shape=[4,4], strides=[4,4]> (r3)
  f = Flatten (q)
  h = MatMul (f, M)
  hb = Add (h, bm)
  r4 = Relu (hb)
  y = MatMul (r4, Wy)
}
"""

TAIL = """
g (float[N,2,6,6] x, float[4,2,3,3] W1, float[3,144] W2) => (float[N,3] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1)
  r1 = Relu (c1)
  f = Flatten (r1)
  z = Gemm <transB=1> (f, W2)
  y = Softmax (z)
}
"""

CONCAT = """
g (float[N,2,6,6] x, float[4,2,3,3] W1, float[4,4,3,3] W2, float[4,8,1,1] W3, float[3,4] W4) => (float[N,3] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, W2)
  r2 = Relu (c2)
  k = Concat <axis=1> (r1, r2)
  c3 = Conv (k, W3)
  r3 = Relu (c3)
  p = GlobalAveragePool (r3)
  f = Flatten (p)
  y = Gemm <transB=1> (f, W4)
}
"""


def _weights(text: str, seed: int) -> dict[str, np.ndarray]:
    """Random weights for every float parameter of ``text`` except the input x."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + text)
    out = {}
    for vi in model.graph.input[1:]:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = (rng.uniform(0.5, 1.5, shape) if vi.name in ("sd", "k4") else rng.normal(0.3, 0.5, shape))
    return out


def compiled(text: str, seed: int = 0, **options) -> tuple[onnx.ModelProto, np.ndarray]:
    model = build(text, _weights(text, seed))
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(seed + 1).uniform(0, 1, [64] + shape).astype(np.float32)
    return ann2snn.compile(model, {"x": x}, iters=8, batch=32, progress=False, **options), x


def meta_of(snn: onnx.ModelProto) -> dict:
    return json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])


def inits(snn: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in snn.graph.initializer}


def written(snn: onnx.ModelProto, tmp_path, **kw) -> nir.NIRGraph:
    kw.setdefault("allow_approximation", True)  # every IF neuron is an approximation in NIR
    path = tmp_path / "model.nir"
    export_nir(snn, path, **kw)
    return nir.read(path)


def by_onnx(graph: nir.NIRGraph) -> dict[str, tuple[str, object]]:
    return {n.metadata["ann2snn.onnx_node"]: (k, n) for k, n in graph.nodes.items()}


# -- a numpy simulator of the NIR graph under ann2snn's rules (from the metadata) ------------------
def _conv2d(x, n):
    w, b = np.asarray(n.weight, np.float64), np.asarray(n.bias, np.float64)
    (sh, sw), (ph, pw), (dh, dw), g = n.stride, n.padding, n.dilation, int(n.groups)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    o, cg, kh, kw = w.shape
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], o, ho, wo))
    og = o // g
    for gi in range(g):
        xs = xp[:, gi * cg:(gi + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
                out[:, gi * og:(gi + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[gi * og:(gi + 1) * og, :, i, j])
    return out + b[None, :, None, None]


def _avgpool(x, n):
    (kh, kw), (sh, sw), (ph, pw) = (tuple(int(v) for v in a) for a in (n.kernel_size, n.stride, n.padding))
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho, wo = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    out = np.zeros(x.shape[:2] + (ho, wo))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
    return out / (kh * kw)


def simulate(graph: nir.NIRGraph, x: np.ndarray, T: int) -> list[dict[str, np.ndarray]]:
    """Step the graph T times; IF neurons follow the metadata (v >= θ, reset by subtraction, v(0) = v_init)."""
    preds = {k: [a for a, b in graph.edges if b == k] for k in graph.nodes}
    order, done = [], set()
    while len(order) < len(graph.nodes):
        for k in graph.nodes:
            if k not in done and all(p in done for p in preds[k]):
                order.append(k)
                done.add(k)
    v = {k: np.broadcast_to(n.metadata["ann2snn.v_init"], (len(x),) + n.v_threshold.shape).astype(np.float64)
         for k, n in graph.nodes.items() if isinstance(n, nir.IF)}
    steps = []
    for _ in range(T):
        out, res = {}, {}
        for k in order:
            n = graph.nodes[k]
            if isinstance(n, nir.Input):
                out[k] = x.astype(np.float64)
                continue
            z = sum(out[p] for p in preds[k])
            if isinstance(n, nir.Conv2d):
                out[k] = _conv2d(z, n)
            elif isinstance(n, nir.AvgPool2d):
                out[k] = _avgpool(z, n)
            elif isinstance(n, nir.Affine):
                out[k] = z @ n.weight.T + n.bias
            elif isinstance(n, nir.Linear):
                out[k] = z @ n.weight.T
            elif isinstance(n, nir.Scale):
                out[k] = z * n.scale
            elif isinstance(n, nir.Flatten):
                out[k] = z.reshape(len(z), -1)
            elif isinstance(n, nir.IF):
                v[k] = v[k] + n.r * z
                spikes = (v[k] >= n.v_threshold).astype(np.float64)
                v[k] = v[k] - n.v_threshold * spikes
                out[k] = spikes
            elif isinstance(n, nir.Output):
                res[n.metadata["ann2snn.onnx_output"]] = z
            else:
                raise AssertionError(type(n))
        steps.append(res)
    return steps


def assert_same_run(snn: onnx.ModelProto, graph: nir.NIRGraph, x: np.ndarray, T: int = 12) -> None:
    session = SpikingSession(snn)
    session.reset(len(x))
    ref = [session.step({"x": x}) for _ in range(T)]
    got = simulate(graph, x, T)
    for name in ref[0]:
        a = np.stack([r[name] for r in ref])
        b = np.stack([g[name] for g in got])
        scale = np.abs(a).mean() + 1e-6
        # a spike can flip where v lands exactly on θ (summation order): allow a tiny share of mismatches
        close = np.isclose(a, b, atol=1e-4 * scale, rtol=1e-4)
        assert close.mean() > 0.99, (name, close.mean())
        assert np.abs(a.mean(0) - b.mean(0)).mean() < 1e-2 * scale


# -- tests -------------------------------------------------------------------------------------------
def test_plain_cnn_round_trip_and_simulation(tmp_path) -> None:
    snn, x = compiled(PLAIN)
    g = written(snn, tmp_path)
    kinds = Counter(type(n).__name__ for n in g.nodes.values())
    assert kinds == {"Input": 1, "Conv2d": 2, "IF": 2, "AvgPool2d": 1, "Flatten": 1, "Affine": 1, "Output": 1}
    assert len(g.edges) == len(g.nodes) - 1  # a chain
    notes = json.loads(g.metadata["ann2snn.approximations"])  # only the neuron model is approximated here
    assert len(notes) == 2 and all("/IF: resets by subtraction" in a for a in notes)
    assert int(g.metadata["ann2snn.readout_t0"]) == meta_of(snn)["readout"]["t0"]
    assert_same_run(snn, g, x[:16])


def test_if_thresholds_and_weights_equal_the_onnx_model(tmp_path) -> None:
    snn, _ = compiled(PLAIN)
    g, values, nodes = written(snn, tmp_path), inits(snn), {n.name: n for n in snn.graph.node}
    found = by_onnx(g)
    for neuron in meta_of(snn)["neurons"]:
        _, n = found[neuron["node"]]
        theta = values[neuron["threshold"]]
        assert n.v_threshold.shape == tuple(neuron["shape"])
        np.testing.assert_array_equal(n.v_threshold, np.broadcast_to(theta, (1,) + n.v_threshold.shape)[0])
        per_channel = n.v_threshold.reshape(n.v_threshold.shape[0], -1)
        assert np.all(per_channel == per_channel[:, :1])  # one θ per channel
        np.testing.assert_array_equal(n.r, 1.0)
        np.testing.assert_array_equal(n.v_reset, 0.0)
        np.testing.assert_allclose(n.metadata["ann2snn.v_init"], neuron["v0"] * n.v_threshold)
        assert n.metadata["ann2snn.reset"].startswith("subtraction")
        assert n.metadata["ann2snn.threshold_initializer"] == neuron["threshold"]
    for name, node in nodes.items():
        if node.op_type == "Conv":
            _, n = found[name]
            np.testing.assert_array_equal(n.weight, values[node.input[1]])  # θ folded as in the ONNX model
            np.testing.assert_array_equal(n.bias, values[node.input[2]])
        if node.op_type == "Gemm":
            _, n = found[name]
            np.testing.assert_array_equal(n.weight, values[node.input[1]])  # transB = 1: already [out, in]
            np.testing.assert_array_equal(n.bias, values[node.input[2]])


def test_residual_add_becomes_two_edges_into_the_neuron(tmp_path) -> None:
    snn, x = compiled(RESIDUAL, seed=3)
    g = written(snn, tmp_path)
    found = by_onnx(g)
    merge = [k for k in g.nodes if sum(b == k for _, b in g.edges) == 2]
    assert len(merge) == 1 and isinstance(g.nodes[merge[0]], nir.IF)
    into = sorted(a for a, b in g.edges if b == merge[0])
    kinds = sorted(type(g.nodes[a]).__name__ for a in into)
    assert kinds == ["Conv2d", "Scale"]  # the conv branch and the skip branch's spike value
    scale_key = next(a for a in into if isinstance(g.nodes[a], nir.Scale))
    mul = next(n for n in snn.graph.node if n.op_type == "Mul" and n.name.endswith("/scale"))
    assert found[mul.name][0] == scale_key
    np.testing.assert_array_equal(g.nodes[scale_key].scale,
                                  np.broadcast_to(inits(snn)[mul.input[1]], (1,) + tuple(g.nodes[scale_key].scale.shape))[0])
    assert_same_run(snn, g, x[:16])


def test_mixed_ops_simulate_like_the_step_model(tmp_path) -> None:
    snn, x = compiled(MIXED, seed=5)
    g = written(snn, tmp_path)
    kinds = Counter(type(n).__name__ for n in g.nodes.values())
    assert kinds["IF"] == 4 and kinds["AvgPool2d"] == 1 and kinds["Affine"] >= 1
    assert sum(b == k for k in g.nodes for _, b in g.edges) == len(g.edges)
    assert max(Counter(b for _, b in g.edges).values()) == 3  # the Sum of three branches
    prefix = [n for n in g.nodes.values() if n.metadata.get("ann2snn.region", "").startswith("analog prefix")]
    assert sorted(n.metadata["ann2snn.onnx_op"] for n in prefix) == ["Conv", "Div", "Sub"]
    grouped = [n for n in g.nodes.values() if "ann2snn.groups" in n.metadata]
    assert len(grouped) == 1 and int(grouped[0].metadata["ann2snn.groups"]) == 2
    assert grouped[0].groups == 1 and grouped[0].weight.shape == (4, 4, 3, 3)  # dense block-diagonal
    assert not grouped[0].weight[:2, 2:].any() and not grouped[0].weight[2:, :2].any()
    assert_same_run(snn, g, x[:16])


def test_maxpool_is_refused_without_the_flag_and_marked_with_it(tmp_path, caplog) -> None:
    model = build(CNN_TEXT, cnn_weights())
    x = np.random.default_rng(1).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)
    snn = ann2snn.compile(model, {"x": x}, iters=8, batch=32, progress=False)
    pool = next(n.name for n in snn.graph.node if n.op_type == "MaxPool")
    with pytest.raises(NirExportError, match=rf"node '{pool}' \(ai.onnx::MaxPool\) is a max pooling.*--allow-approximation"):
        to_nir(snn)
    assert not (tmp_path / "model.nir").exists()
    g = written(snn, tmp_path, allow_approximation=True)
    _, placeholder = by_onnx(g)[pool]
    assert isinstance(placeholder, nir.AvgPool2d)
    assert placeholder.metadata["ann2snn.placeholder_for"] == "MaxPool"
    assert "exact max" in placeholder.metadata["ann2snn.maxpool_mode"]  # on the conv output: the analog prefix
    assert pool in g.metadata["ann2snn.approximations"]


def test_cumulative_maxpool_deeper_in_the_network(tmp_path) -> None:
    snn = ann2snn.compile(str(MODELS / "mnist_cnn.onnx") if (MODELS / "mnist_cnn.onnx").exists()
                          else pytest.skip("mnist model not built"),
                          str(MODELS / "data" / "mnist_calib.npz"), iters=4, batch=32, progress=False)
    with pytest.raises(NirExportError, match="5 part"):  # 2 MaxPools and 3 IF layers
        to_nir(snn)
    g = written(snn, tmp_path, allow_approximation=True)
    modes = [n.metadata["ann2snn.maxpool_mode"] for n in g.nodes.values() if "ann2snn.maxpool_mode" in n.metadata]
    assert sorted(m.split(":")[0] for m in modes) == ["cumulative", "on a current constant in time (analog prefix)"]
    # the cumulative pool's running sum and increment leave no node: conv -> pool -> IF
    conv = next(k for k, n in g.nodes.items() if n.metadata["ann2snn.onnx_node"] == "/net/features/features.3/Conv")
    pool = next(b for a, b in g.edges if a == conv)
    assert isinstance(g.nodes[pool], nir.AvgPool2d)
    assert isinstance(g.nodes[next(b for a, b in g.edges if a == pool)], nir.IF)


def test_digits_reference_model(tmp_path) -> None:
    path = digits_path()
    snn = ann2snn.compile(str(path), str(MODELS / "data" / "digits_calib.npz"), iters=4, batch=32, progress=False)
    g = written(snn, tmp_path, allow_approximation=True)
    kinds = Counter(type(n).__name__ for n in g.nodes.values())
    assert kinds["IF"] == 3 and kinds["Conv2d"] == 2 and kinds["Affine"] == 2 and kinds["Flatten"] == 1
    values = inits(snn)
    for neuron in meta_of(snn)["neurons"]:
        n = by_onnx(g)[neuron["node"]][1]
        np.testing.assert_array_equal(n.v_threshold, np.broadcast_to(values[neuron["threshold"]],
                                                                     (1,) + n.v_threshold.shape)[0])


def test_tail_is_refused_without_the_flag_and_left_out_with_it(tmp_path) -> None:
    snn, _ = compiled(TAIL)
    tail = meta_of(snn)["tail"]
    assert tail is not None
    with pytest.raises(NirExportError, match=r"analog tail.*--allow-approximation"):
        to_nir(snn)
    g = written(snn, tmp_path, allow_approximation=True)
    outs = [n for n in g.nodes.values() if isinstance(n, nir.Output)]
    assert [o.metadata["ann2snn.onnx_output"] for o in outs] == tail["inputs"]
    assert json.loads(g.metadata["ann2snn.tail"])["nodes"] == tail["nodes"]


def test_unsupported_ops_are_listed_once_without_cascade() -> None:
    snn, _ = compiled(CONCAT)
    with pytest.raises(UnsupportedModelError, match=r"(?s)1 node\(s\).*\(ai.onnx::Concat\) has no NIR equivalent; keep") as exc:
        to_nir(snn, allow_approximation=True)
    assert not isinstance(exc.value, NirExportError)  # no flag makes it exportable


def test_metadata_documents_what_nir_cannot_express(tmp_path) -> None:
    snn, _ = compiled(PLAIN)
    g = written(snn, tmp_path)
    assert json.loads(g.metadata["ann2snn.lost"]) == LOST
    assert float(g.metadata["ann2snn.dt"]) == 1.0
    for n in g.nodes.values():
        if isinstance(n, nir.IF):
            assert {"ann2snn.reset", "ann2snn.fire", "ann2snn.v_init", "ann2snn.v_init_fraction"} <= set(n.metadata)
    assert all("/" not in k for k in g.nodes)  # HDF5 would nest them


def test_export_is_deterministic(tmp_path) -> None:
    snn, _ = compiled(RESIDUAL, seed=3)
    export_nir(snn, tmp_path / "a.nir", allow_approximation=True)
    export_nir(snn, tmp_path / "b.nir", allow_approximation=True)
    assert (tmp_path / "a.nir").read_bytes() == (tmp_path / "b.nir").read_bytes()


def test_not_a_compiled_model(tmp_path) -> None:
    with pytest.raises(ann2snn.ModelLoadError, match="not a compiled spiking model"):
        to_nir(build(PLAIN, _weights(PLAIN, 0)))


def test_cli_export(tmp_path) -> None:
    from ann2snn.cli import main
    from ann2snn.modelio import save_model

    snn, _ = compiled(PLAIN)
    save_model(snn, tmp_path / "m.snn.onnx")
    out = tmp_path / "m.nir"
    args = ["export", str(tmp_path / "m.snn.onnx"), "--to", "nir", "-o", str(out)]
    res = CliRunner().invoke(main, args)  # IF neurons reset by subtraction: NIR can only approximate them
    assert res.exit_code == 3 and "ann2snn::IFNeuron) resets by subtraction" in res.output and not out.exists()
    res = CliRunner().invoke(main, args + ["--allow-approximation"])
    assert res.exit_code == 0, res.output
    assert "IF 2" in res.output and out.exists()
    assert len(nir.read(out).nodes) == 9


def test_cli_refusal_exit_code_and_no_file(tmp_path) -> None:
    from ann2snn.cli import main
    from ann2snn.modelio import save_model

    snn, _ = compiled(TAIL)
    save_model(snn, tmp_path / "m.snn.onnx")
    out = tmp_path / "m.nir"
    args = ["export", str(tmp_path / "m.snn.onnx"), "--to", "nir", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 3 and "--allow-approximation" in res.output and not out.exists()
    res = CliRunner().invoke(main, args + ["--allow-approximation"])
    assert res.exit_code == 0 and out.exists()


def test_missing_nir_package_is_a_clear_error(monkeypatch) -> None:
    snn, _ = compiled(PLAIN)
    monkeypatch.setitem(sys.modules, "nir", None)
    with pytest.raises(ConfigError, match="pip install nir"):
        to_nir(snn)
