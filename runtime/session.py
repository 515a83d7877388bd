"""SpikingSession: runs a compiled ``.snn.onnx`` step model for T timesteps on onnxruntime.

The step graph is run once per timestep with the membrane potentials carried from one
step to the next. The readout is the average of the spiking part's analog outputs over
the steps ``[start, T)`` (delayed evaluation); the analog tail, if any, then runs once on
that average.

``run`` / ``run_many`` use faster forms derived from the step graph at load time
(``runtime/fast.py``): the time-constant prefix (input normalisation, the first layer
under direct coding) runs once per input, IF neurons run in units of their threshold
(``runtime/unitform.py``), and for small batches several timesteps run as one batch layer
by layer. ``step`` and probes run the step graph itself.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ann2snn.data import InputSpec, as_array_dict, check_arrays, input_specs
from ann2snn.errors import ConfigError, ModelLoadError
from ann2snn.modelio import load_model

from .fast import StepPlan, run_layered, run_steps, value_types
from .unitform import unit_form

log = logging.getLogger(__name__)

METADATA_KEY = "ann2snn"


def window_start(T: int, t0: int, min_window: int = 4) -> int:
    """First step (0-based) of the readout window for T steps: t0, or the last ``min_window`` steps."""
    if T >= t0 + min_window:
        return t0
    return max(T - min_window, 0)


def check_T(T: int) -> int:
    """Validate a number of timesteps."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T <= 0:
        raise ConfigError(f"T must be a positive number of timesteps, got {T!r} (-T)")
    return int(T)


MODES = ("auto", "step", "layered")
#: in auto mode, the layered form runs chunks of about this many samples (timesteps × batch);
#: it is used only for batches smaller than this, where one step alone is a small GEMM
LAYERED_ROWS = 32
#: and only while a chunk's membrane states (a proxy for its activations) stay below this, so
#: that memory stays near the ANN's: large models at batch 1 already run big GEMMs per step
LAYERED_STATE_BYTES = 16 * 2 ** 20


def _session_options(threads: int | None) -> ort.SessionOptions:
    """Options of every runtime session. Nodes run in graph order (PRIORITY_BASED): each
    neuron's reset follows its spikes, so one layer's temporaries are freed before the next
    layer runs (onnxruntime's default order leaves every reset to the end of the step and
    keeps every layer's charged potential and spikes alive at once: 1.7x the memory).
    Intra-op threads do not spin between runs: a simulation alternates its sessions (prefix,
    step or chunk, tail) with the readout's own work, and a spinning worker takes a core from
    them (measured on 2 cores: 1.03-2.8x faster SNN runs; benchmarks/runtime_options.py)."""
    so = ort.SessionOptions()
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


class SpikingSession:
    """A compiled spiking model, ready to run.

    ``run(inputs, T)`` gives the readout after T steps; ``reset(batch)`` and ``step(inputs)``
    drive it one timestep at a time (online use); ``readout()`` gives the current readout.
    """

    def __init__(self, model: str | os.PathLike[str] | onnx.ModelProto, *, threads: int | None = None,
                 probes: Sequence[str] = (), mode: str = "auto", chunk: int | None = None,
                 unit_thresholds: bool = True) -> None:
        """Load a compiled model. ``probes`` names extra tensors (e.g. ``spike_tensors``) to
        fetch at every step; their latest values are in ``probe_values``.

        ``mode`` picks how ``run`` / ``run_many`` execute the time loop (results agree up to
        float rounding): ``"step"`` runs the step graph once per timestep, with the
        time-constant prefix (e.g. the first convolution under direct coding) computed once;
        ``"layered"`` runs each layer on ``chunk`` timesteps at once (a batch of chunk × B)
        with each neuron layer unrolled over the chunk; ``"auto"`` uses layered for batches
        below ``LAYERED_ROWS`` when the graph allows it, the chunk's states stay under
        ``LAYERED_STATE_BYTES`` and, timed once per batch size on the first run (a few chunks'
        worth of extra steps), it is faster than step on this machine; else step. Probes and ``on_step`` always use the step form.

        ``unit_thresholds``: the fast forms run each IF neuron in units of its threshold, with
        1/θ folded into the weights that produce its input (three elementwise kernels a step
        instead of five; runtime/unitform.py). Spikes agree with the step graph's up to float
        rounding (exactly when θ is a power of two); False keeps the step graph's arithmetic.
        """
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if chunk is not None and (isinstance(chunk, bool) or int(chunk) <= 0):
            raise ConfigError(f"chunk must be a positive number of timesteps, got {chunk!r}")
        self.mode, self.chunk = mode, (int(chunk) if chunk is not None else None)
        self.unit_thresholds = bool(unit_thresholds)
        self.bind = True  # IOBinding of the states in the step form (False: through numpy, for comparison)
        proto = load_model(model)
        self.model: onnx.ModelProto = proto  # the compiled model as loaded (for memory estimates, reports)
        props = {p.key: p.value for p in proto.metadata_props}
        if METADATA_KEY not in props:
            raise ModelLoadError("the model has no ann2snn metadata: it is not a compiled spiking model; "
                                 "compile it first with `ann2snn compile model.onnx -o model.snn.onnx`")
        self.meta: dict[str, Any] = json.loads(props[METADATA_KEY])
        self.t0: int = int(self.meta["readout"]["t0"])
        self.min_window: int = int(self.meta["readout"].get("min_window", 4))
        inits = {i.name: i for i in proto.graph.initializer}
        self._state_specs = []  # (state input, state output, initial value broadcastable to a sample, sample shape)
        for st in self.meta["states"]:
            if st["init"] == "zeros":
                init = np.zeros((), np.float32)
            else:
                theta = numpy_helper.to_array(inits[st["init"]["threshold"]]).astype(np.float32)
                init = theta * np.float32(st["init"]["fraction"])
            self._state_specs.append((st["input"], st["output"], init, tuple(st["shape"])))
        state_inputs = {n[0] for n in self._state_specs}
        self.input_specs: list[InputSpec] = [s for s in input_specs(proto) if s.name not in state_inputs]
        self.step_outputs: list[str] = list(self.meta["step_outputs"])
        self.output_names: list[str] = list(self.meta["outputs"])
        known = {n["spikes"] for n in self.meta["neurons"]} | {vi.name for vi in proto.graph.value_info}
        unknown = [p for p in probes if p not in known and p not in {o.name for o in proto.graph.output}]
        if unknown:
            raise ConfigError(f"probe tensor(s) {', '.join(unknown)} are not in the model; "
                              f"spike tensors are {', '.join(sorted(known)[:5])}...")
        self.probes: list[str] = list(probes)
        self.probe_values: dict[str, np.ndarray] = {}
        graph_outputs = {o.name for o in proto.graph.output}
        self._extra_outputs = [p for p in self.probes if p not in graph_outputs]
        self._threads = threads
        self._full: ort.InferenceSession | None = None  # the whole step graph, built on first use
        types = value_types(proto)  # one shape inference, shared by the unit form and the plan
        fast_proto, factors = (unit_form(proto, {s[0]: s[1] for s in self._state_specs}, types) if unit_thresholds
                               else (proto, {}))
        self._plan = StepPlan(fast_proto, [(s[0], s[1], s[3]) for s in self._state_specs], self.step_outputs,
                              _session_options(threads), factors, types)
        if self.probes or self._plan.reduced is None:
            self._sess  # noqa: B018 - build it now: every step uses it
        if mode == "layered" and self._plan.cuts is None:
            raise ConfigError(f"mode='layered' is not available for this model: {self._plan.refusal}; "
                              "use mode='step' or 'auto'")
        self._fetch = self.step_outputs + [n[1] for n in self._state_specs] + self.probes
        self._tail = self._tail_session(proto, threads)
        self._float = [self.meta["types"][o]["elem_type"] == onnx.TensorProto.FLOAT for o in self.step_outputs]
        self._states: dict[str, np.ndarray] = {}
        self._sums: list[np.ndarray] | None = None
        self._last: list[np.ndarray] | None = None
        self._t = 0
        self._counted = 0
        #: the form ``auto`` mode measured fastest, by (batch, timesteps per chunk): "layered" / "step"
        self.auto_choices: dict[tuple[int, int], str] = {}

    @property
    def _sess(self) -> ort.InferenceSession:
        """The session of the whole step graph (with the probes as extra outputs): used by
        ``step()``, by probes and when the graph has no time-constant prefix to split off."""
        if self._full is None:
            proto = onnx.ModelProto()
            proto.CopyFrom(self.model)
            proto.graph.output.extend(helper.make_tensor_value_info(p, onnx.TensorProto.FLOAT, None)
                                      for p in self._extra_outputs)
            self._full = ort.InferenceSession(proto.SerializeToString(), _session_options(self._threads),
                                              providers=["CPUExecutionProvider"])
        return self._full

    def _tail_session(self, proto: onnx.ModelProto, threads: int | None) -> ort.InferenceSession | None:
        tail = self.meta.get("tail")
        if not tail:
            return None
        fn = next(f for f in proto.functions if f.domain == tail["domain"] and f.name == tail["function"])
        types = self.meta["types"]

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
        return ort.InferenceSession(model.SerializeToString(), _session_options(threads), providers=["CPUExecutionProvider"])

    # -- streaming interface -------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        """Set every membrane potential to v(0) = v0·θ (other states to 0) for a batch of ``batch_size``."""
        self._states = {name: np.ascontiguousarray(np.broadcast_to(init, (batch_size,) + shape), dtype=np.float32)
                        for name, _, init, shape in self._state_specs}
        self._sums, self._last, self._t, self._counted = None, None, 0, 0

    def _feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        arrays = as_array_dict(inputs, self.input_specs, "input")
        check_arrays(arrays, self.input_specs, "input")
        return {s.name: arrays[s.name] for s in self.input_specs}

    def _advance(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One step on checked feeds: update the membrane potentials, return the step outputs."""
        results = self._sess.run(self._fetch, {**feeds, **self._states})
        k, m = len(self.step_outputs), len(self._state_specs)
        for (name, _, _, _), value in zip(self._state_specs, results[k:k + m]):
            self._states[name] = value
        if self.probes:
            self.probe_values = dict(zip(self.probes, results[k + m:]))
        self._t += 1
        return results[:k]

    def step(self, inputs: Any) -> dict[str, np.ndarray]:
        """Advance one timestep; returns the spiking part's analog outputs at this step."""
        feeds = self._feeds(inputs)
        batch = next(iter(feeds.values())).shape[0]
        if not self._states or next(iter(self._states.values())).shape[0] != batch:
            self.reset(batch)
        t = self._t
        outs = self._advance(feeds)
        if t >= self.t0:
            if self._sums is None:
                self._sums = [np.asarray(o, np.float64) if f else o for o, f in zip(outs, self._float)]
            else:
                self._sums = [acc + o if f else o for acc, o, f in zip(self._sums, outs, self._float)]
            self._counted += 1
        self._last = outs
        return dict(zip(self.step_outputs, outs))

    def readout(self) -> dict[str, np.ndarray]:
        """The average of the outputs over the steps seen since ``t0``, through the analog tail."""
        if self._last is None:
            raise ConfigError("readout() before any step(); call step(inputs) at least once")
        if self._sums is None:  # still inside the delay: read out the last step
            values = self._last
        else:
            values = [(s / self._counted).astype(np.float32) if f else s for s, f in zip(self._sums, self._float)]
        return self.finish(values)

    def finish(self, values: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs from read-out step outputs (``values`` in ``step_outputs`` order,
        e.g. window means computed by the caller): runs the analog tail once, if there is one."""
        by_name = dict(zip(self.step_outputs, values))
        if self._tail is not None:
            tail_in = {i.name: by_name[i.name] for i in self._tail.get_inputs()}
            by_name.update(zip([o.name for o in self._tail.get_outputs()], self._tail.run(None, tail_in)))
        return {name: by_name[name] for name in self.output_names}

    # -- whole runs --------------------------------------------------------------------------
    def run(self, inputs: Any, T: int, t0: int | None = None) -> dict[str, np.ndarray]:
        """Run T timesteps from rest and return the readout (delayed average over ``[start, T)``)."""
        return self.run_many(inputs, [T], t0)[check_T(T)]

    @property
    def spike_tensors(self) -> list[str]:
        """Names of the spike tensors of every neuron layer (usable as ``probes``)."""
        return [n["spikes"] for n in self.meta["neurons"]]

    def run_many(self, inputs: Any, Ts: Sequence[int], t0: int | None = None,
                 on_step: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> dict[int, dict[str, np.ndarray]]:
        """One simulation of max(Ts) steps, read out at every T in ``Ts`` (the SNN is causal).

        ``on_step(t, probe_values)`` is called after every step (t from 0).
        """
        Ts = sorted({check_T(T) for T in Ts})
        t0 = self.t0 if t0 is None else int(t0)
        if t0 < 0:
            raise ConfigError(f"t0 must be >= 0, got {t0} (--t0)")
        feeds = self._feeds(inputs)
        batch = next(iter(feeds.values())).shape[0]
        self.reset(batch)
        starts = {T: window_start(T, t0, self.min_window) for T in Ts}
        steps = self._steps(feeds, batch, Ts[-1], with_probes=on_step is not None)
        running: list[np.ndarray] | None = None  # sums of the float outputs over steps [0, t)
        at_start: dict[int, list[np.ndarray] | None] = {}
        results: dict[int, dict[str, np.ndarray]] = {}
        for t in range(Ts[-1]):
            if t in starts.values():
                at_start[t] = None if running is None else [r.copy() for r in running]
            outs = next(steps)
            if on_step is not None:
                on_step(t, self.probe_values)
            if running is None:
                running = [np.asarray(o, np.float64) if f else o for o, f in zip(outs, self._float)]
            else:
                running = [r + o if f else o for r, o, f in zip(running, outs, self._float)]
            T = t + 1
            if T in starts:
                s, base = starts[T], at_start[starts[T]]
                values = [((r - base[j] if base is not None else r) / (T - s)).astype(np.float32) if f else o
                          for j, (r, o, f) in enumerate(zip(running, outs, self._float))]
                results[T] = self.finish(values)
        steps.close()
        return results

    def _layered_chunk(self, batch: int, T: int) -> int | None:
        """Timesteps per chunk for the layered form, or None to step."""
        if self._plan.cuts is None or self.mode == "step":
            return None
        if self.chunk is not None:
            return min(self.chunk, T)
        chunk = max(1, min(T, -(-LAYERED_ROWS // batch)))
        if self.mode == "auto":
            per_sample = sum(4 * int(np.prod(shape)) for _, _, _, shape in self._state_specs)
            chunk = min(chunk, LAYERED_STATE_BYTES // max(per_sample * batch, 1))
            if batch >= LAYERED_ROWS or chunk < 2:
                return None
        return chunk

    def _measured_choice(self, feeds: dict[str, np.ndarray], batch: int, chunk: int) -> int | None:
        """``chunk`` if the layered form runs ``chunk`` steps faster than the step form on these
        inputs, else None. Timed once per (batch, chunk) on copies of the states (a warm-up and
        two alternated rounds of each, best of each) and remembered in ``auto_choices``."""
        key = (batch, chunk)
        if key not in self.auto_choices:
            def layered(states: dict[str, np.ndarray]) -> None:
                for _ in run_layered(self._plan, feeds, states, chunk, chunk):
                    pass

            def stepped(states: dict[str, np.ndarray]) -> None:
                for _ in run_steps(self._plan, feeds, states, chunk, bind=self.bind):
                    pass

            best = {"layered": float("inf"), "step": float("inf")}
            for rnd in range(3):
                for name, form in (("layered", layered), ("step", stepped)):
                    scratch = {k: v.copy() for k, v in self._states.items()}
                    start = time.perf_counter()
                    form(scratch)
                    if rnd:  # round 0 warms up: the first call of a session plans its memory
                        best[name] = min(best[name], time.perf_counter() - start)
            self.auto_choices[key] = "layered" if best["layered"] < best["step"] else "step"
            log.debug("auto mode, batch %d, %d steps per chunk: layered %.1f ms, step %.1f ms: %s", batch, chunk,
                      best["layered"] * 1e3, best["step"] * 1e3, self.auto_choices[key])
        return chunk if self.auto_choices[key] == "layered" else None

    def _steps(self, feeds: dict[str, np.ndarray], batch: int, T: int, with_probes: bool):
        """Generator of the step outputs for steps 0..T-1 from the current state."""
        chunk = None if (self.probes or with_probes) else self._layered_chunk(batch, T)
        if chunk is not None and self.mode == "auto" and self.chunk is None and self._plan.reduced is not None:
            chunk = self._measured_choice(feeds, batch, chunk)
        if chunk is not None:
            for outs in run_layered(self._plan, feeds, self._states, T, chunk):
                self._t += 1
                yield outs
            return
        if self.probes or self._plan.reduced is None:
            for _ in range(T):
                yield self._advance(feeds)
            return
        for outs in run_steps(self._plan, feeds, self._states, T, bind=self.bind):
            self._t += 1
            # bound output buffers are rewritten by the next step: hand out copies
            yield [o.copy() for o in outs]
