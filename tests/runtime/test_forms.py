"""Differential tests: every execution form of SpikingSession against one reference.

The reference is :mod:`ann2snn.runtime.reference`: the compiled step graph run by plain
onnxruntime one step at a time (no prefix split, no rewriting, no bound buffers, no unit
conversion). Every form must give the same readouts to ``RTOL`` (1e-5) relative, the
invariant stated in runtime/reference.py (max|a - b| / max(max|ref|, 1e-6), per output,
with NaN in the same places):

* ``mode="step"`` with and without bound buffers (``bind``), with threads 1 and 2, and
  device-resident (``resident=True``: states and readout sums in onnxruntime buffers);
* ``mode="layered"`` with the automatic chunk and chunks of 1, 3 and 7 steps (skipped
  for a graph the layered form refuses with a ConfigError), with 2 threads;
* ``unit_thresholds=False`` with step and with layered; ``mode="auto"``;
* the streaming API (``reset(B)``, ``step()`` T times: every step's outputs against the
  reference's, then ``readout()``);
* batch 1, an odd batch (3) and a larger one (17); benchmarks/fuzz_forms.py adds 5.

Graphs: (a) 200 drawn by the hypothesis strategy :func:`graphgen.cases` (deterministic:
``derandomize=True``, no example database): 100 of any kind with every form at batch 3,
100 mostly spiking ones (ReLU networks, mostly on images) with every form at batches 1
and 17; (b) the reference models in models/ at batches 3 and 1; (c) the regression files
in tests/runtime/regressions/forms/ at batches 1, 3 and 17. A graph the compiler refuses cleanly
(an Ann2SnnError) is rejected (``assume``); test_most_generated_graphs_compile checks
that refusals stay rare. A model the reference itself cannot run counts as a failure.

Fast forms are tested as such: ``guard=False`` is passed when SpikingSession accepts it.

Regression files: when a generated graph fails and the environment has
``ANN2SNN_SAVE_REGRESSIONS=1``, the minimal failing ANN (hypothesis replays the shrunk
example last) is written to ``tests/runtime/regressions/forms/<sha>.onnx`` with its calibration and
test inputs in ``<sha>.npz`` (keys ``calib/<input>``, ``input/<input>``, ``recipe``);
:func:`test_regressions_replay` then checks it on every run. Without the variable nothing is
written (rerun with it: the run is deterministic). benchmarks/fuzz_forms.py runs the same
checks on thousands of graphs.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, assume, given, note, settings

import ann2snn
import graphgen
from ann2snn.runtime import SpikingSession
from conftest import MODELS
from ann2snn.runtime.reference import RTOL, reference_run, reference_steps

REGRESSIONS = Path(__file__).resolve().parent / "regressions" / "forms"
#: readouts of one simulation: a single step; windows that start at max(T - 4, 0) or at t0
TS = [1, 5, 9]
COMPILE = {"iters": 4, "batch": 8}

#: every form, by name: SpikingSession keywords (``stream`` is the reset/step/readout API)
FORMS: dict[str, dict[str, Any]] = {
    "step": {"mode": "step"},
    "step/nobind": {"mode": "step", "bind": False},
    "step/nounit": {"mode": "step", "unit_thresholds": False},
    "step/threads1": {"mode": "step", "threads": 1},
    "step/threads2": {"mode": "step", "threads": 2},
    "step/resident": {"mode": "step", "resident": True},
    "layered": {"mode": "layered"},
    "layered/chunk1": {"mode": "layered", "chunk": 1},
    "layered/chunk3": {"mode": "layered", "chunk": 3},
    "layered/chunk7": {"mode": "layered", "chunk": 7},
    "layered/chunk3/nounit": {"mode": "layered", "chunk": 3, "unit_thresholds": False},
    "layered/chunk3/threads2": {"mode": "layered", "chunk": 3, "threads": 2},
    "auto": {"mode": "auto"},
    "stream": {"mode": "step"},
}
#: the batch test draws mostly spiking graphs: ReLU networks, mostly on images
SPIKING_PROFILES = ["relu", "mixed", "relu"]
SPIKING_INPUTS = ["image", "image_int", "vector", "image"]

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_PARAMS = inspect.signature(SpikingSession.__init__).parameters


def make_session(model: onnx.ModelProto | str | os.PathLike[str], **kw: Any) -> SpikingSession:
    """A SpikingSession with ``kw``; ``guard=False`` and ``bind`` where the constructor takes
    them (else ``bind`` is set on the session, as before the keyword existed)."""
    bind = kw.pop("bind", None)
    if "guard" in _PARAMS:
        kw["guard"] = False
    if bind is not None and "bind" in _PARAMS:
        kw["bind"] = bind
    session = SpikingSession(model, **kw)
    if bind is not None and "bind" not in _PARAMS:
        session.bind = bind
    return session


@dataclass
class Disagreement:
    """One form that did not match the reference."""

    form: str
    batch: int
    T: int | str
    output: str
    message: str

    def __str__(self) -> str:
        return f"{self.form} batch {self.batch} T={self.T} {self.output}: {self.message}"


def _as_array(value: Any) -> tuple[np.ndarray, list]:
    """An output as an array, and the keys of its maps: a sequence of maps (e.g. skl2onnx's
    ZipMap) becomes [rows, keys] (rows with other keys than the first: keys None)."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
        keys = sorted(value[0])
        same = all(sorted(row) == keys for row in value)
        rows = [[row.get(k, np.nan) for k in keys] for row in value]
        return np.array(rows, np.float32), keys if same else None
    return np.asarray(value), []


def mismatch(ref: Any, got: Any) -> str | None:
    """Why ``got`` is not ``ref`` to RTOL (relative to max|ref|), or None when it is."""
    (ref, ref_keys), (got, got_keys) = _as_array(ref), _as_array(got)
    if ref_keys != got_keys:
        return f"map keys {got_keys} != {ref_keys}"
    if got.shape != ref.shape:
        return f"shape {got.shape} != {ref.shape}"
    if not np.issubdtype(ref.dtype, np.floating):
        return None if np.array_equal(got, ref) else f"{np.sum(got != ref)} of {ref.size} values differ"
    rnan, gnan = np.isnan(ref), np.isnan(got)
    if (rnan != gnan).any():
        return f"NaN in {int(gnan.sum())} values, reference has {int(rnan.sum())}"
    ok = ~rnan
    r, g = ref[ok].astype(np.float64), got[ok].astype(np.float64)
    if r.size == 0:
        return None
    same = r == g  # also equal infinities
    diff = np.where(same, 0.0, np.abs(r - g))
    finite = np.isfinite(r)
    scale = max(float(np.abs(r[finite]).max()) if finite.any() else 0.0, 1e-6)
    err = float(diff.max()) / scale
    if not err <= RTOL:
        i = int(np.argmax(diff))
        return f"relative error {err:.3g} (got {g[i]:.7g}, reference {r[i]:.7g}, scale {scale:.3g})"
    return None


def _compare(into: list[Disagreement], form: str, batch: int, T: int | str, ref: Mapping[str, np.ndarray],
             got: Mapping[str, np.ndarray]) -> None:
    for name, value in ref.items():
        why = mismatch(value, got[name]) if name in got else "missing"
        if why:
            into.append(Disagreement(form, batch, T, name, why))


def check_forms(snn: onnx.ModelProto, inputs: Mapping[str, np.ndarray], Ts: Iterable[int] = TS,
                forms: Iterable[str] = FORMS, unavailable: dict[str, str] | None = None) -> list[Disagreement]:
    """Every form in ``forms`` against the reference on ``inputs`` (one batch), read out at
    each T in ``Ts``. A form the runtime refuses for this model with a ConfigError (layered
    on a graph it cannot batch over time) is skipped and recorded in ``unavailable`` (form ->
    message)."""
    Ts = sorted(set(Ts))
    batch = int(next(iter(inputs.values())).shape[0])
    out: list[Disagreement] = []
    try:
        refs = {T: reference_run(snn, inputs, T) for T in Ts}
    except Exception as exc:  # noqa: BLE001 - a model the reference cannot run is a failure of its own
        return [Disagreement("reference", batch, "-", "-", f"raised {type(exc).__name__}: {exc}")]
    for form in forms:
        try:
            session = make_session(snn, **FORMS[form])
        except ann2snn.ConfigError as exc:
            if unavailable is not None:
                unavailable[form] = str(exc)
            continue
        try:
            if form.startswith("stream"):
                _check_stream(session, snn, inputs, Ts, refs, out, form, batch)
            else:
                got = session.run_many(inputs, Ts)
                for T in Ts:
                    _compare(out, form, batch, T, refs[T], got[T])
        except Exception as exc:  # noqa: BLE001 - a crash of a form is a disagreement too
            out.append(Disagreement(form, batch, "-", "-", f"raised {type(exc).__name__}: {exc}"))
    return out


def _check_stream(session: SpikingSession, snn: onnx.ModelProto, inputs: Mapping[str, np.ndarray], Ts: list[int],
                  refs: Mapping[int, Mapping[str, np.ndarray]], out: list[Disagreement], form: str, batch: int) -> None:
    """reset / step / readout: each step's outputs, and the readout at every T in Ts."""
    session.reset(batch)
    steps = reference_steps(snn, inputs, Ts[-1])
    for t in range(Ts[-1]):
        got = session.step(dict(inputs))
        want = next(steps)
        _compare(out, form, batch, f"step {t}", {k: want[k] for k in got}, got)
        if t + 1 in Ts:
            _compare(out, form, batch, t + 1, refs[t + 1], session.readout())


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Compile without the warnings every mostly-analog graph earns (they are expected here)."""
    logger = logging.getLogger("ann2snn")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def compile_model(model: onnx.ModelProto, calib: Mapping[str, np.ndarray], **options: Any) -> onnx.ModelProto:
    with quiet():
        return ann2snn.compile(model, dict(calib), **{**COMPILE, **options})


def compile_case(case: graphgen.Case) -> onnx.ModelProto | None:
    """The compiled model, or None for a clean refusal (an Ann2SnnError)."""
    try:
        return compile_model(case.model, case.calib)
    except ann2snn.Ann2SnnError:
        return None


def batch_of(inputs: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[:n]) for k, v in inputs.items()}


# -- regression files ----------------------------------------------------------------------
def save_regression(case: graphgen.Case, folder: Path = REGRESSIONS) -> Path:
    """Write ``case`` as <sha>.onnx and <sha>.npz in ``folder``; returns the .onnx path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case.sha}.onnx"
    onnx.save(case.model, path)
    arrays = {f"calib/{k}": v for k, v in case.calib.items()}
    arrays.update({f"input/{k}": v for k, v in case.inputs.items()})
    np.savez(path.with_suffix(".npz"), recipe=np.array(case.recipe), **arrays)
    return path


def load_regression(path: Path) -> graphgen.Case:
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
        calib = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("calib/")}
        inputs = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("input/")}
        recipe = [str(r) for r in z["recipe"]] if "recipe" in z.files else []
    return graphgen.Case(onnx.load(path), calib, inputs, recipe)


def _saving(run) -> None:
    """Run a hypothesis test; on failure, save its last failing cases (the shrunk ones,
    which hypothesis replays last) when ANN2SNN_SAVE_REGRESSIONS=1."""
    _failed.clear()
    try:
        run()
    except BaseException as exc:
        if os.environ.get("ANN2SNN_SAVE_REGRESSIONS") == "1" and _failed:
            n = len(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else 1
            for case in _failed[-n:]:
                print(f"saved {save_regression(case, REGRESSIONS)}: {case!r}", file=sys.stderr)
        raise


_failed: list[graphgen.Case] = []


def _assert_agree(case: graphgen.Case, problems: list[Disagreement]) -> None:
    if problems:
        _failed.append(case)
        lines = "\n  ".join(str(p) for p in problems[:12])
        raise AssertionError(f"{len(problems)} disagreement(s) with the reference on {case!r}\n  {lines}")


# -- generated graphs ------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, derandomize=True, database=None, phases=[Phase.generate])
@given(graphgen.cases())
def test_generator_builds_valid_runnable_models(case: graphgen.Case) -> None:
    import onnxruntime as ort

    onnx.checker.check_model(case.model, full_check=True)
    sess = ort.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for value in sess.run(None, case.inputs):
        assert value.shape[0] == graphgen.TEST_SAMPLES
        assert np.isfinite(value).all()
    dims = [d.dim_param for vi in list(case.model.graph.input) + list(case.model.graph.output)
            for d in vi.type.tensor_type.shape.dim[:1]]
    assert set(dims) == {"N"}
    names = [n.name for n in case.model.graph.node]
    assert all(names) and len(set(names)) == len(names)


def test_most_generated_graphs_compile() -> None:
    """Clean refusals (Ann2SnnError) are a small minority of the generated graphs."""
    outcomes: list[str] = []

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(graphgen.cases())
    def draw(case: graphgen.Case) -> None:
        try:
            compile_model(case.model, case.calib)
            outcomes.append("ok")
        except ann2snn.Ann2SnnError as exc:
            outcomes.append(f"{case!r}: {str(exc).splitlines()[0]}")

    draw()
    refused = [o for o in outcomes if o != "ok"]
    assert len(outcomes) >= 50
    assert len(refused) <= 0.2 * len(outcomes), refused


@SETTINGS
@given(graphgen.cases())
def _forms_property(case: graphgen.Case) -> None:
    note(repr(case))
    snn = compile_case(case)
    assume(snn is not None)
    _assert_agree(case, check_forms(snn, batch_of(case.inputs, 3)))


def test_forms_agree_on_generated_graphs() -> None:
    """100 generated graphs: every form at batch 3, read out at T = 1, 5, 9."""
    _saving(_forms_property)


@SETTINGS
@given(graphgen.cases(profiles=SPIKING_PROFILES, input_kinds=SPIKING_INPUTS))
def _batches_property(case: graphgen.Case) -> None:
    note(repr(case))
    snn = compile_case(case)
    assume(snn is not None)
    problems: list[Disagreement] = []
    for n in (1, graphgen.TEST_SAMPLES):
        problems += check_forms(snn, batch_of(case.inputs, n))
    _assert_agree(case, problems)


def test_batches_agree_on_generated_graphs() -> None:
    """100 more generated graphs, mostly spiking ones (ReLU networks, mostly on images: neurons,
    cumulative max pools), every form at batch 1 and at batch 17."""
    _saving(_batches_property)


def _regression_files() -> list[Path | None]:
    files = sorted(REGRESSIONS.glob("*.onnx"))
    return files or [None]


@pytest.mark.parametrize("path", _regression_files(), ids=lambda p: p.stem if p else "none")
def test_regressions_replay(path: Path | None) -> None:
    """Every saved minimal failing graph, every form, batches 1, 3 and 17."""
    if path is None:
        return
    case = load_regression(path)
    snn = compile_model(case.model, case.calib)
    problems = []
    for n in (1, 3, graphgen.TEST_SAMPLES):
        problems += check_forms(snn, batch_of(case.inputs, n))
    assert not problems, f"{path.name} ({' | '.join(case.recipe)}):\n  " + "\n  ".join(map(str, problems[:12]))


# -- reference models ------------------------------------------------------------------------
#: (model, data set: models/data/<set>_calib.npz and <set>_test.npz)
REFERENCE_MODELS = [
    ("mnist_cnn.onnx", "mnist"),
    ("fashion_vgg.onnx", "fashion"),
    ("fashion_resnet.onnx", "fashion"),
    ("digits_cnn.onnx", "digits"),
    ("digits_cnn_dynamo.onnx", "digits"),
    ("digits_cnn_opset11.onnx", "digits"),
    ("keras_cnn.onnx", "keras"),
    ("sklearn_mlp.onnx", "sklearn"),
    ("seg_fcn.onnx", "scenes"),
    ("seg_deeplab.onnx", "scenes"),
    ("det_fcos.onnx", "scenes"),
]
MODEL_BATCH = 3


def _model_inputs(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays that are model inputs (the data files also hold labels, masks, boxes)."""
    names = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    return {k: v for k, v in arrays.items() if k in names}


@pytest.fixture(scope="module")
def compiled_model(tmp_path_factory):
    """``get(name, data_set) -> (compiled model, test inputs)``: each reference model compiled
    once per module (iters=8, batch=16), with its first test inputs."""
    folder = tmp_path_factory.mktemp("forms_models")
    cache: dict[str, tuple[Path, dict[str, np.ndarray]]] = {}

    def get(name: str, data: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        if name not in cache:
            ann = onnx.load(str(MODELS / name), load_external_data=False)
            with np.load(MODELS / "data" / f"{data}_calib.npz") as z:
                calib = _model_inputs(ann, {k: z[k] for k in z.files})
            with np.load(MODELS / "data" / f"{data}_test.npz") as z:
                test = _model_inputs(ann, {k: z[k][:MODEL_BATCH] for k in z.files})
            path = folder / (name.removesuffix(".onnx") + ".snn.onnx")
            with quiet():
                ann2snn.compile(MODELS / name, calib, path, iters=8, batch=16)
            cache[name] = (path, test)
        path, test = cache[name]
        return onnx.load(str(path)), test

    return get


@pytest.mark.parametrize("name,data", REFERENCE_MODELS, ids=[m[0].removesuffix(".onnx") for m in REFERENCE_MODELS])
def test_forms_agree_on_reference_models(compiled_model, name: str, data: str) -> None:
    """Every form at batches 3 and 1, read out at T = 4 and 9, on each model in models/."""
    if not (MODELS / name).exists():
        pytest.skip(f"{name} is not built")
    snn, test = compiled_model(name, data)
    problems = check_forms(snn, test, Ts=[4, 9]) + check_forms(snn, batch_of(test, 1), Ts=[4, 9])
    assert not problems, f"{name}:\n  " + "\n  ".join(map(str, problems[:12]))


@pytest.mark.parametrize("net", ["transformer", "mbv3"])
def test_forms_agree_on_compensated_models(net: str) -> None:
    """Expectation-compensated ops (--nonlinear compensate) in the step graph: every form,
    the layered ones included, equals the reference at batches 3 and 1."""
    path = MODELS / "exporters" / f"torch_legacy_{net}.onnx"
    import importlib.util

    spec = importlib.util.spec_from_file_location("exporter_matrix_cells", MODELS / "exporters" / "matrix.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    with quiet():
        snn = ann2snn.compile(path, matrix.cell_inputs(path, "calib", limit=64), nonlinear="compensate", **COMPILE)
    test = matrix.cell_inputs(path, "test", limit=3)
    unavailable: dict[str, str] = {}
    problems = check_forms(snn, test, Ts=[4, 9], unavailable=unavailable) + check_forms(snn, batch_of(test, 1),
                                                                                        Ts=[4, 9])
    assert not problems, "\n  ".join(map(str, problems[:12]))
    assert not unavailable, unavailable


#: the modern-activation reference models with the compile options of issue 16 whose step
#: graphs hold symmetric neurons and compensated ops (runtime/forms.py runs them layered)
BEYOND_RELU = [
    ("fashion_vit.onnx", {"nonlinear": "compensate", "signed_sites": "output"}),
    *((f"fashion_{act}.onnx", {"signed_sites": sites}) for act in ("gelu", "silu", "lrelu", "hswish")
      for sites in ("output", "input")),
    ("fashion_lrelu.onnx", {}),  # LeakyReLU sites are signed by default
]


@pytest.mark.parametrize("name,options", BEYOND_RELU,
                         ids=[f"{n.removesuffix('.onnx')}-{o.get('signed_sites', 'default')}" for n, o in BEYOND_RELU])
def test_layered_runs_signed_sites_and_compensated_ops(name: str, options: dict[str, str]) -> None:
    """Symmetric neurons and compensated ops (with re-spiked outputs) run in the layered form,
    each unrolled over the chunk through its states, and every form equals the reference at
    batches 2 and 1 (compiled on 16 calibration images, 2 iterations)."""
    if not (MODELS / name).exists():
        pytest.skip(f"{name} is not built")
    ann = onnx.load(str(MODELS / name))
    x = ann.graph.input[0].name
    with np.load(MODELS / "data" / "fashion_calib.npz") as z:
        calib = {x: z["input"][:16]}
    with np.load(MODELS / "data" / "fashion_test.npz") as z:
        test = {x: z["input"][:2]}
    snn = compile_model(ann, calib, iters=2, **options)
    ops = {n.op_type for n in snn.graph.node}
    assert ops & {"SymmetricIFNeuron", "UnitSymmetricIFNeuron", "UnitSymmetricTotalIFNeuron"} and any(op.startswith("ExpectationCompensated")
                                                                        for op in ops), ops
    forms = ["step", "layered", "layered/chunk1", "layered/chunk3", "layered/chunk3/nounit", "auto", "stream"]
    unavailable: dict[str, str] = {}
    problems = check_forms(snn, test, Ts=[4, 7], forms=forms, unavailable=unavailable) \
        + check_forms(snn, batch_of(test, 1), Ts=[5], forms=["layered", "layered/chunk3"], unavailable=unavailable)
    assert not unavailable, unavailable
    assert not problems, f"{name}:\n  " + "\n  ".join(map(str, problems[:12]))
    session = make_session(snn, mode="layered", chunk=3)
    kinds = {c.kind for c in session._plan.cuts.values()}
    assert {"if", "chain"} <= kinds, kinds
    assert all(c.body is not None for c in session._plan.cuts.values() if c.kind == "chain")  # chunks at once
    # auto: layered at batch 1 only (runtime/session.py, LAYERED_MAX_BATCH_COMPENSATED)
    auto = make_session(snn, mode="auto")
    assert auto.choose_form(1, 32)[0] == "layered" and auto.choose_form(2, 32)[0] == "step"
    # the runtime's unit-threshold form is for IF neurons: the symmetric ones stay as compiled in every form
    for op in ("SymmetricIFNeuron", "UnitSymmetricIFNeuron", "UnitSymmetricTotalIFNeuron"):
        symmetric = {n.name for n in snn.graph.node if n.op_type == op}
        assert {n.name for n in session._plan.proto.graph.node if n.op_type == op} == symmetric


def test_layered_unrolls_compensated_ops_on_the_vit(monkeypatch) -> None:
    """With OVER_TIME off every compensated op of the ViT is unrolled, one copy per step
    chained through its states: the same outputs as the reference."""
    from ann2snn.runtime import forms

    monkeypatch.setattr(forms, "OVER_TIME", False)
    ann = onnx.load(str(MODELS / "fashion_vit.onnx"))
    x = ann.graph.input[0].name
    with np.load(MODELS / "data" / "fashion_calib.npz") as z:
        calib = {x: z["input"][:16]}
    with np.load(MODELS / "data" / "fashion_test.npz") as z:
        test = {x: z["input"][:2]}
    snn = compile_model(ann, calib, iters=2, nonlinear="compensate", signed_sites="output")
    session = make_session(snn, mode="layered", chunk=3)
    assert all(c.body is None for c in session._plan.cuts.values() if c.kind == "chain")
    problems = check_forms(snn, test, Ts=[4, 7], forms=["layered/chunk3", "layered/chunk7"])
    assert not problems, "\n  ".join(map(str, problems[:12]))
