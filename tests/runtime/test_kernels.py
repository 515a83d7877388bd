"""The compiled neuron kernels (runtime/kernels, ``make kernels``) against the function form.

With the library built, every form run with the kernels must give the outputs of the same
form run with the model-local neuron functions **bit for bit** (the same float32 operations
in the same order): the kernel ops alone on random currents (IF, signed, burst; one
threshold or one per element; a current per step or one for every step; chunks of 1..T
steps; batch 1 and 3), and whole sessions on reference models and on generated graphs
(tests/runtime/graphgen.py) for the three neurons, in the step form (bound and unbound
states), the layered form with every chunk from 1 to T and ``auto``, at batch 1 and 3.
Without the library those tests skip; the tests of the switch itself always run.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ann2snn
import graphgen
from ann2snn.runtime import SpikingSession
from ann2snn.runtime import kernels as K
from ann2snn.runtime.ops import BURST_OP, DOMAIN, IF_OP, SIGNED_OP, neuron_function
from conftest import MODELS
from test_forms import batch_of, compile_model, quiet

BUILT = K.library() is not None
needs_library = pytest.mark.skipif(not BUILT, reason="the kernel library is not built (make kernels)")

T = 6
#: session keywords of each form compared with and without the kernels
FORMS = {"step": {"mode": "step"}, "step/nobind": {"mode": "step", "bind": False}, "auto": {"mode": "auto"},
         **{f"layered/chunk{c}": {"mode": "layered", "chunk": c} for c in range(1, T + 1)}}
NEURONS = {"if": {"neuron": "if"}, "signed": {"neuron": "signed"}, "burst": {"neuron": "signed", "burst": 3}}


def same_bits(a: np.ndarray, b: np.ndarray, signed_zeros: bool = True) -> bool:
    """Equal bit for bit, NaNs in the same places. ``signed_zeros=False``: -0 equals 0 (the
    burst neuron's Max / Min: onnxruntime's own kernels return either zero of a tie, by the
    element's position in a vector register, so only the value can be matched)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == np.float32:
        nan = np.isnan(a)
        if not np.array_equal(nan, np.isnan(b)):
            return False
        if signed_zeros:
            return bool(np.array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan]))
        return bool(np.array_equal(a[~nan], b[~nan]))
    return bool(np.array_equal(a, b))


# -- the ops alone --------------------------------------------------------------------------------
def _unrolled(op: str, steps: int, batch: int, constant: bool, params: list[str]) -> onnx.ModelProto:
    """``steps`` neuron function nodes chained through their states, as the layered form
    unrolls them: current [steps·batch, ...] (or [batch, ...] when ``constant``) -> spikes, states."""
    counting = op != IF_OP
    n_out = 3 if counting else 2
    nodes = [] if constant else [helper.make_node("Split", ["x"], [f"x{t}" for t in range(steps)], axis=0,
                                                  num_outputs=steps)] if steps > 1 else \
        [helper.make_node("Identity", ["x"], ["x0"])]
    prev = ["v", "c"][:n_out - 1]
    for t in range(steps):
        outs = [f"s{t}", f"v{t}", f"c{t}"][:n_out]
        nodes.append(helper.make_node(op, ["x" if constant else f"x{t}", *prev, *params], outs, domain=DOMAIN))
        prev = outs[1:]
    nodes.append(helper.make_node("Concat", [f"s{t}" for t in range(steps)], ["s"], axis=0))
    nodes += [helper.make_node("Identity", [p], [o]) for p, o in zip(prev, ["vo", "co"])]
    return _model(nodes, n_out, op)


def _kernel(op: str, steps: int, params: list[str]) -> onnx.ModelProto:
    n_out = 3 if op != IF_OP else 2
    ins = ["x", "v", "c"][:n_out] + params
    node = helper.make_node(K.KERNEL_OPS[op], ins, ["s", "vo", "co"][:n_out], domain=K.KERNEL_DOMAIN, steps=steps)
    return _model([node], n_out, None)


def _model(nodes: list[onnx.NodeProto], n_out: int, function_op: str | None) -> onnx.ModelProto:
    names = ["x", "v", "c", "th", "m"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
                                           if any(n in node.input for node in nodes)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ["s", "vo", "co"][:n_out]])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1), helper.make_opsetid(K.KERNEL_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    if function_op:
        model.functions.append(neuron_function(function_op, 18))
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    K.register(so, K.LIBRARY)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@needs_library
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from([IF_OP, SIGNED_OP, BURST_OP]), steps=st.integers(1, T), batch=st.sampled_from([1, 3]),
       shape=st.sampled_from([(4, 5, 3), (7,), (2, 9)]), per_element=st.booleans(), constant=st.booleans(),
       seed=st.integers(0, 2 ** 31))
def test_kernel_ops_equal_the_functions_bit_for_bit(op: str, steps: int, batch: int, shape: tuple[int, ...],
                                                     per_element: bool, constant: bool, seed: int) -> None:
    """Random currents on a grid of quarters (so that the membrane hits the threshold and 0
    exactly), states and thresholds: spikes and last states agree to the bit."""
    rng = np.random.default_rng(seed)
    rows = batch if constant else steps * batch
    x = (rng.integers(-6, 8, (rows, *shape)) / 4).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = -0.0  # signed zeros go through every op
    feeds = {"x": x, "v": (rng.integers(-4, 5, (batch, *shape)) / 4).astype(np.float32),
             "c": rng.integers(-1, 3, (batch, *shape)).astype(np.float32)}
    th = (rng.integers(1, 5, shape) / 2).astype(np.float32) if per_element else np.full(1, 0.75, np.float32)
    feeds["th"] = th
    params = ["th"]
    if op == BURST_OP:
        feeds["m"] = np.full(1, 3.0, np.float32) if not per_element else rng.integers(1, 4, shape).astype(np.float32)
        params.append("m")
    if op == IF_OP:
        del feeds["c"]
    want = _session(_unrolled(op, steps, batch, constant, params)).run(None, feeds)
    got = _session(_kernel(op, steps, params)).run(None, feeds)
    for name, w, g in zip(["spikes", "v", "count"], want, got):
        assert same_bits(w, g, signed_zeros=op != BURST_OP), f"{op} steps={steps} batch={batch}: {name} differs"


@needs_library
@pytest.mark.parametrize("op", [IF_OP, SIGNED_OP, BURST_OP])
def test_kernel_ops_propagate_non_finite_values_as_the_functions(op: str) -> None:
    x = np.array([[np.nan, np.inf, -np.inf, 1e38, -1e38, 0.5, -0.0, 3e-39]], np.float32)
    feeds = {"x": np.concatenate([x, x[:, ::-1]]), "v": np.full((1, 8), 0.5, np.float32),
             "c": np.ones((1, 8), np.float32), "th": np.ones(1, np.float32), "m": np.full(1, 2.0, np.float32)}
    params = ["th", "m"] if op == BURST_OP else ["th"]
    if op == IF_OP:
        del feeds["c"]
    if op != BURST_OP:
        del feeds["m"]
    want = _session(_unrolled(op, 2, 1, False, params)).run(None, feeds)
    got = _session(_kernel(op, 2, params)).run(None, feeds)
    for w, g in zip(want, got):
        assert same_bits(w, g, signed_zeros=op != BURST_OP)


@needs_library
def test_kernel_op_rejects_mismatched_shapes() -> None:
    sess = _session(_kernel(IF_OP, 3, ["th"]))
    with pytest.raises(Exception, match="rows"):
        sess.run(None, {"x": np.zeros((4, 2), np.float32), "v": np.zeros((2, 2), np.float32),
                        "th": np.ones(1, np.float32)})
    with pytest.raises(Exception, match="threshold"):
        sess.run(None, {"x": np.zeros((6, 2), np.float32), "v": np.zeros((2, 2), np.float32),
                        "th": np.ones(3, np.float32)})


# -- whole sessions -------------------------------------------------------------------------------
def _session_pair(snn: onnx.ModelProto, form: str) -> tuple[SpikingSession, SpikingSession]:
    kw = {**FORMS[form], "guard": False}
    with_k, without = SpikingSession(snn, kernels=True, **kw), SpikingSession(snn, kernels=False, **kw)
    assert with_k.kernels and not without.kernels
    return with_k, without


def check_bit_for_bit(snn: onnx.ModelProto, inputs: dict[str, np.ndarray], Ts: list[int],
                      signed_zeros: bool = True) -> list[str]:
    """Every form with the kernels against the same form without them: readouts at each T
    and the states after the run, bit for bit (see :func:`same_bits`). Returns what differs."""
    problems = []
    for form in FORMS:
        try:
            with_k, without = _session_pair(snn, form)
        except ann2snn.ConfigError:  # layered refused for this graph
            continue
        a, b = with_k.run_many(inputs, Ts), without.run_many(inputs, Ts)
        for t in Ts:
            problems += [f"{form} T={t} {k}" for k in b[t]
                         if not same_bits(np.asarray(a[t][k]), np.asarray(b[t][k]), signed_zeros)]
        problems += [f"{form} state {k}" for k in without._states
                     if not same_bits(with_k._states[k], without._states[k], signed_zeros)]
        if form.startswith("layered") and with_k.last_form == "step":
            problems.append(f"{form}: fell back to the step form")
    return problems


REFERENCE = [("mnist_cnn.onnx", "mnist"), ("fashion_resnet.onnx", "fashion"), ("fashion_vgg.onnx", "fashion")]


@needs_library
@pytest.mark.parametrize("neuron", sorted(NEURONS))
@pytest.mark.parametrize("name,data", REFERENCE, ids=[m[0].removesuffix(".onnx") for m in REFERENCE])
def test_sessions_equal_without_kernels_on_reference_models(tmp_path, name: str, data: str, neuron: str) -> None:
    with np.load(MODELS / "data" / f"{data}_calib.npz") as z:
        calib = {"input": z["input"][:16]}
    with np.load(MODELS / "data" / f"{data}_test.npz") as z:
        test = {"input": np.ascontiguousarray(z["input"][:3])}
    with quiet():
        snn = ann2snn.compile(MODELS / name, calib, iters=8, batch=16, **NEURONS[neuron])
    assert not any(n.domain == K.KERNEL_DOMAIN for n in snn.graph.node)  # the artifact keeps its functions
    for batch in (1, 3):
        assert not check_bit_for_bit(snn, batch_of(test, batch), [1, 4, T], signed_zeros=neuron != "burst")


@needs_library
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(graphgen.cases(profiles=["relu", "mixed"], input_kinds=["image", "vector"]), st.sampled_from(sorted(NEURONS)))
def test_sessions_equal_without_kernels_on_generated_graphs(case: graphgen.Case, neuron: str) -> None:
    note(repr(case))
    try:
        snn = compile_model(case.model, case.calib, **NEURONS[neuron])
    except ann2snn.Ann2SnnError:
        snn = None
    assume(snn is not None)
    for batch in (1, 3):
        problems = check_bit_for_bit(snn, batch_of(case.inputs, batch), [1, 5, T], signed_zeros=neuron != "burst")
        assert not problems, problems[:8]


# -- the switch (always run) ----------------------------------------------------------------------
def _small_snn() -> onnx.ModelProto:
    with np.load(MODELS / "data" / "mnist_calib.npz") as z:
        calib = {"input": z["input"][:8]}
    with quiet():
        return ann2snn.compile(MODELS / "mnist_cnn.onnx", calib, iters=2, batch=8)


def test_kernels_required_but_missing_is_a_clean_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(K, "LIBRARY", tmp_path / "libann2snn_kernels.so")
    with pytest.raises(ann2snn.ConfigError, match="make kernels"):
        SpikingSession(_small_snn(), kernels=True)
    assert not SpikingSession(_small_snn()).kernels  # the default runs without them


def test_environment_turns_the_kernels_off(monkeypatch) -> None:
    monkeypatch.setenv("ANN2SNN_KERNELS", "0")
    assert K.library() is None
    assert not SpikingSession(_small_snn()).kernels


def test_kernel_form_rewrites_neurons_with_constant_thresholds_only() -> None:
    th = numpy_helper.from_array(np.array([1.0, 2.0], np.float32).reshape(2, 1), "th")
    nodes = [helper.make_node(IF_OP, ["x", "v", "th"], ["s", "vn"], domain=DOMAIN, name="a"),
             helper.make_node(IF_OP, ["x", "w", "s"], ["s2", "wn"], domain=DOMAIN, name="b"),  # computed threshold
             helper.make_node("Relu", ["th"], ["c"]),
             helper.make_node(IF_OP, ["c", "u", "th"], ["s3", "un"], domain=DOMAIN, name="c")]  # constant current
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 3])
                                           for n in ("x", "v", "w", "u")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                               for n in ("s2", "vn", "wn", "s3", "un")], [th])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    new = K.kernel_form(model, {"v": (2, 3), "w": (2, 3), "u": (2, 3)})
    assert [(n.domain, n.op_type) for n in new.graph.node if n.op_type != "Relu"] == [
        (K.KERNEL_DOMAIN, "IFChunk"), (DOMAIN, IF_OP), (DOMAIN, IF_OP)]
    expanded = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}[new.graph.node[0].input[2]]
    assert np.array_equal(expanded, np.array([[1, 1, 1], [2, 2, 2]], np.float32))
    assert [n.op_type for n in model.graph.node] == [IF_OP, IF_OP, "Relu", IF_OP]  # the input is unchanged


def test_a_model_holding_kernel_ops_is_refused() -> None:
    """The kernel domain is the runtime's own: a .snn.onnx that holds it is not run (with or
    without the library), so nothing in a model selects compiled code."""
    snn = _small_snn()
    neuron = next(n for n in snn.graph.node if n.domain == DOMAIN)
    neuron.domain, neuron.op_type = K.KERNEL_DOMAIN, "IFChunk"
    neuron.attribute.append(helper.make_attribute("steps", 1))
    snn.opset_import.append(helper.make_opsetid(K.KERNEL_DOMAIN, 1))
    with pytest.raises(ann2snn.ModelLoadError, match="compiled-kernel domain"):
        SpikingSession(snn)


def test_a_library_built_elsewhere_is_found_through_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(K, "LIBRARY", tmp_path / "missing.so")
    monkeypatch.delenv("ANN2SNN_KERNELS", raising=False)
    monkeypatch.setenv("ANN2SNN_KERNELS_LIB", str(tmp_path / "elsewhere.so"))
    with pytest.raises(ann2snn.ConfigError, match="elsewhere.so is not built"):
        K.library(True)
    (tmp_path / "elsewhere.so").write_bytes(b"")
    if K._ort_api() >= K.API_VERSION:
        assert K.library() == tmp_path / "elsewhere.so"


def test_cli_kernels_flag_reaches_the_session(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """`run --no-kernels` / `--kernels` pass kernels=False / True to the session (None without the flag)."""
    from click.testing import CliRunner

    from ann2snn.cli import main
    from ann2snn.runtime import batches

    seen: list[object] = []

    class Stop(Exception):
        pass

    def fake_session(*args: object, **kwargs: object) -> None:
        seen.append(kwargs.get("kernels"))
        raise Stop

    monkeypatch.setattr(batches, "SpikingSession", fake_session)
    for flag, expect in (([], None), (["--no-kernels"], False), (["--kernels"], True)):
        CliRunner().invoke(main, ["run", "m.onnx", "--input", "x.npz", "-T", "4", "-o", str(tmp_path / "o.npz"), *flag])
        assert seen[-1] is expect
