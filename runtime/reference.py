"""The reference semantics of a compiled model: its step graph, run as written.

Every execution form of :class:`~ann2snn.runtime.SpikingSession` (step, bound buffers,
layered chunks, unit-threshold neurons, the streaming ``step()`` API) is derived from the
compiled step graph and must give the same outputs as this module, which does nothing
clever: one stock onnxruntime session of the whole step graph, run once per timestep with
the states passed through numpy, no prefix split, no rewriting, no bound buffers. The
readout window (:func:`window_start`) is part of these semantics. The differential tests
(tests/runtime/test_forms.py) and the runtime's guard compare against it.

The invariant every form keeps: the same step outputs and states as :func:`reference_steps`
to ``RTOL`` (1e-5) relative (in practice bit for bit: the compiled neurons already work in
units of their thresholds, so no form changes the arithmetic, only how it is scheduled).
This is the one place that states it; runtime/forms.py, runtime/unitform.py and
runtime/session.py derive the faster forms, and the tests in tests/runtime/ check it.
"""
from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ann2snn.errors import ModelLoadError
from ann2snn.modelio import load_model

METADATA_KEY = "ann2snn"
#: the invariant's tolerance: every form's outputs and states equal the reference's to this
#: relative to their scale (the guard of SpikingSession and the differential tests use it)
RTOL = 1e-5


def window_start(T: int, t0: int, min_window: int = 4) -> int:
    """First step (0-based) of the readout window for T steps: t0, or the last ``min_window`` steps."""
    if T >= t0 + min_window:
        return t0
    return max(T - min_window, 0)


def ai_onnx_opset(proto: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version (13 if it names none)."""
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)


def value_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The types of ``proto``'s tensors, from onnx shape inference where it succeeds."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - types are a hint; symbolic float is the fallback
        inferred = proto
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = onnx.TypeProto()
        types[vi.name].CopyFrom(vi.type)  # a copy: a reference would keep the inferred model (weights) alive
    return types


def model_metadata(proto: onnx.ModelProto) -> dict[str, Any]:
    """The ann2snn metadata of a compiled model (ModelLoadError if it has none)."""
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ModelLoadError("the model has no ann2snn metadata: it is not a compiled spiking model; "
                             "compile it first with `ann2snn compile model.onnx -o model.snn.onnx`")
    return json.loads(props[METADATA_KEY])


def state_specs(proto: onnx.ModelProto, meta: Mapping[str, Any]) -> list[tuple[str, str, np.ndarray, tuple[int, ...]]]:
    """(state input, state output, initial value broadcastable to a sample, sample shape) per state."""
    inits = {i.name: i for i in proto.graph.initializer}
    specs = []
    for st in meta["states"]:
        if st["init"] == "zeros":
            init = np.zeros((), np.float32)
        elif "value" in st["init"]:  # a membrane in units of its threshold: v(0) = v0
            init = np.asarray(st["init"]["value"], np.float32)
        else:
            theta = numpy_helper.to_array(inits[st["init"]["threshold"]]).astype(np.float32)
            init = (theta * np.float32(st["init"]["fraction"])).astype(np.float32)
        specs.append((st["input"], st["output"], init, tuple(st["shape"])))
    return specs


def initial_states(specs: list[tuple[str, str, np.ndarray, tuple[int, ...]]], batch: int) -> dict[str, np.ndarray]:
    """Every state at rest for a batch of ``batch``: v(0) = v0·θ for membranes, 0 otherwise."""
    return {name: np.ascontiguousarray(np.broadcast_to(init, (batch,) + shape), dtype=np.float32)
            for name, _, init, shape in specs}


def tail_model(proto: onnx.ModelProto, meta: Mapping[str, Any]) -> onnx.ModelProto | None:
    """The analog tail of a compiled model as a model of its own, or None if it has none."""
    tail = meta.get("tail")
    if not tail:
        return None
    fn = next(f for f in proto.functions if f.domain == tail["domain"] and f.name == tail["function"])
    types = meta["types"]

    def vi(name: str) -> onnx.ValueInfoProto:
        info = onnx.ValueInfoProto(name=name)
        encoded = types.get(name, {}).get("onnx_type")
        if encoded:
            info.type.ParseFromString(base64.b64decode(encoded))
        else:
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        return info

    graph = helper.make_graph(list(fn.node), "ann2snn_tail", [vi(i) for i in fn.input], [vi(o) for o in fn.output])
    model = helper.make_model(graph, opset_imports=list(fn.opset_import), ir_version=proto.ir_version)
    # the tail may call other model-local functions (canonical activations such as Gelu)
    called = {(n.domain, n.op_type) for n in fn.node}
    model.functions.extend(f for f in proto.functions if (f.domain, f.name) in called)
    return model


def reference_steps(model: str | os.PathLike[str] | onnx.ModelProto, inputs: Mapping[str, np.ndarray],
                    T: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield the step outputs (``meta["step_outputs"]``) and the states after each of T steps
    from rest, by the whole step graph in one plain onnxruntime session."""
    proto = load_model(model)
    meta = model_metadata(proto)
    specs = state_specs(proto, meta)
    batch = int(next(iter(inputs.values())).shape[0])
    states = initial_states(specs, batch)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    fetch = list(meta["step_outputs"]) + [s[1] for s in specs]
    k = len(meta["step_outputs"])
    for _ in range(T):
        results = sess.run(fetch, {**inputs, **states})
        states = {s[0]: r for s, r in zip(specs, results[k:])}
        yield {**dict(zip(fetch[:k], results[:k])), **{s[1]: r for s, r in zip(specs, results[k:])}}


def reference_run(model: str | os.PathLike[str] | onnx.ModelProto, inputs: Mapping[str, np.ndarray], T: int,
                  t0: int | None = None) -> dict[str, np.ndarray]:
    """The model's outputs after T steps by the reference semantics: the float step outputs
    averaged (in float64) over the readout window, non-float ones taken from the last step,
    then the analog tail run once."""
    proto = load_model(model)
    meta = model_metadata(proto)
    start = window_start(T, int(meta["readout"]["t0"]) if t0 is None else int(t0),
                         int(meta["readout"].get("min_window", 4)))
    names = list(meta["step_outputs"])
    floats = {o: meta["types"][o]["elem_type"] == onnx.TensorProto.FLOAT for o in names}
    sums: dict[str, np.ndarray] = {}
    last: dict[str, np.ndarray] = {}
    for t, outs in enumerate(reference_steps(proto, inputs, T)):
        for o in names:
            last[o] = outs[o]
            if t >= start and floats[o]:
                sums[o] = sums[o] + outs[o] if o in sums else np.asarray(outs[o], np.float64)
    values = {o: (sums[o] / (T - start)).astype(np.float32) if floats[o] else last[o] for o in names}
    tail = tail_model(proto, meta)
    if tail is not None:
        sess = ort.InferenceSession(tail.SerializeToString(), providers=["CPUExecutionProvider"])
        values.update(zip([o.name for o in sess.get_outputs()],
                          sess.run(None, {i.name: values[i.name] for i in sess.get_inputs()})))
    return {o: values[o] for o in meta["outputs"]}
