"""SpikingSession: runs a compiled ``.snn.onnx`` step model for T timesteps on onnxruntime.

The step graph is run once per timestep with the membrane potentials carried from one
step to the next. The readout is the average of the spiking part's analog outputs over
the steps ``[start, T)`` (delayed evaluation); the analog tail, if any, then runs once on
that average.

``run`` / ``run_many`` use faster forms derived from the step graph at load time
(``runtime/forms.py``): the time-constant prefix (input normalisation, the first layer
under direct coding) runs once per input, IF neurons run in units of their threshold
(``runtime/unitform.py``), and for small batches several timesteps run as one batch layer
by layer; on a GPU (``device="cuda"``) the step form keeps its states and the readout's
running sums on the device (``runtime/resident.py``). ``step`` and probes run the step graph
itself. Every form keeps the invariant
stated in runtime/reference.py (the reference's outputs); the guard checks it before a fast
form is first used.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ann2snn.data.arrays import InputSpec, as_array_dict, check_arrays, input_specs
from ann2snn.device import check_device, on_cuda, open_session, providers_for
from ann2snn.errors import ConfigError, DataError, ModelLoadError, NonFiniteError
from ann2snn.modelio import load_model

from .forms import StepPlan, run_constant, run_layered, run_steps
from .kernels import KERNEL_DOMAIN, kernel_form, library, register
from .resident import ResidentStepper, host
from .reference import (METADATA_KEY, RTOL, initial_states, model_metadata, state_specs, tail_model, value_types,
                        window_start)
from .unitform import exact_unit_ops

log = logging.getLogger(__name__)

__all__ = ["METADATA_KEY", "MODES", "SpikingSession", "check_T"]


def check_T(T: int) -> int:
    """Validate a number of timesteps."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T <= 0:
        raise ConfigError(f"T must be a positive number of timesteps, got {T!r} (-T)")
    return int(T)


#: how ``run`` executes the time loop; every form gives the reference's outputs (see
#: runtime/reference.py): "auto" picks step or layered by a fixed rule of the batch and
#: state sizes, "timed" by timing both once per batch size, "reference" runs the whole step
#: graph as written, one step per call
MODES = ("auto", "step", "layered", "reference", "timed")
#: steps on which the guard compares a fast form with the reference before first using it
GUARD_STEPS = 2
#: relative tolerance of that comparison: the invariant's (runtime/reference.py; the forms
#: agree bit for bit in practice)
GUARD_RTOL = RTOL
#: the layered form runs chunks of about this many samples (timesteps × batch)
LAYERED_ROWS = 32
#: in auto mode, the layered form is used only up to this batch: on the reference models it
#: took 0.36-0.72x the step form's time at batch 1 and 2, 0.55-0.97x at 4, 0.77-1.42x at 8 and
#: 0.98-1.28x at 16 (benchmarks/results/cli_profile.md, "auto rule", measured with the compiled
#: kernels, which speed the layered form up most: 2 keeps a margin without them)
LAYERED_MAX_BATCH = 2
#: graphs with expectation-compensated ops (signed activation sites, --nonlinear compensate)
#: only up to this batch: layered / step time at T = 32 was 0.63 (ViT), 0.94 (GELU CNN), 0.81
#: (SiLU CNN), 0.97 (LeakyReLU CNN) at batch 1, but 0.75, 1.18, 0.96, 1.05 at batch 2 and
#: 1.16-1.76 at 8 (benchmarks/results/layered_forms.md): their symmetric neurons, unrolled
#: over the chunk on whole feature maps, cost the CNNs more than the batched layers save
LAYERED_MAX_BATCH_COMPENSATED = 1
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
                 unit_thresholds: bool = True, bind: bool = True, guard: bool = True,
                 allow_nonfinite: bool = False, kernels: bool | None = None, device: str = "cpu",
                 providers: Sequence[Any] | None = None, resident: bool | None = None,
                 cuda_graph: bool = False) -> None:
        """Load a compiled model. ``probes`` names extra tensors (e.g. ``spike_tensors``) to
        fetch at every step; their latest values are in ``probe_values``.

        ``mode`` picks how ``run`` / ``run_many`` execute the time loop. Every form gives the
        outputs of the reference (the step graph as written, runtime/reference.py), so the
        choice changes the speed, not the answer: ``"step"`` runs the step graph once per
        timestep, with the time-constant prefix (e.g. the first convolution under direct
        coding) computed once and the states in bound buffers (``bind``); ``"layered"`` runs
        each layer on ``chunk`` timesteps at once (a batch of chunk × B) with each neuron layer
        unrolled over the chunk; ``"auto"`` (default) uses layered for batches up to
        ``LAYERED_MAX_BATCH`` (``LAYERED_MAX_BATCH_COMPENSATED`` for graphs with
        expectation-compensated ops) when the graph allows it and the chunk's states stay under
        ``LAYERED_STATE_BYTES``, else step: a rule of shapes only, so a command gives the same
        bytes every time; ``"timed"`` times both once per batch size and keeps the faster;
        ``"reference"`` runs the whole step graph per step. The form used last is in
        ``last_form``. Probes and ``on_step`` always use the reference form.

        ``unit_thresholds``: IF neurons whose thresholds are ones (every IF neuron the compiler
        emits: it folds 1/θ into the weights) run as three elementwise kernels instead of five,
        with the same arithmetic bit for bit. ``guard``: before a fast form is first used for
        a batch size, its first ``GUARD_STEPS`` steps are compared with the reference; a form
        that disagrees is not used (a warning names it) and the run falls back to the
        reference. ``allow_nonfinite``: NaN or inf in an output is a warning instead of an
        error (:class:`~ann2snn.errors.NonFiniteError`). ``kernels``: run the neurons of the
        fast forms with the compiled kernel library (``make kernels``; runtime/kernels), the
        same arithmetic bit for bit: None (default) when it is built and the environment
        variable ``ANN2SNN_KERNELS`` is not ``0``, False never, True or a ConfigError. The
        kernels run on the CPU only: with ``device="cuda"`` None means without them.

        ``device``: ``"cpu"`` or ``"cuda"`` (the first GPU, through onnxruntime-gpu: the extra
        ``ann2snn[gpu]``; a :class:`~ann2snn.device.DeviceError` says what is missing where it
        cannot work). ``providers``: an onnxruntime provider list used as given instead of
        the device's. ``resident``: run the step form device-resident (runtime/resident.py:
        the states, the readout's running sums and the step outputs stay in onnxruntime
        buffers on the device, one ``run_with_iobinding`` per step, copies to the host only
        at a readout; the same outputs bit for bit); None (default): on a GPU only. On a GPU,
        ``auto`` mode uses this step form at every batch (the layered rule was measured on
        CPUs). After a resident run the states stay on the device: a following ``step()``
        starts from rest. ``cuda_graph``: capture the resident step as CUDA graphs
        (onnxruntime's ``enable_cuda_graph``) and replay it, one launch per step; needs
        ``device="cuda"`` and every node of the step graph on the GPU.
        """
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r} (--form)")
        if chunk is not None and (isinstance(chunk, bool) or int(chunk) <= 0):
            raise ConfigError(f"chunk must be a positive number of timesteps, got {chunk!r}")
        check_device(device)
        if providers is not None and isinstance(providers, (str, bytes)):
            raise ConfigError(f"providers is a list of onnxruntime execution providers, got {providers!r}")
        if cuda_graph and (device != "cuda" if providers is None else not on_cuda(providers)):
            raise ConfigError("CUDA graphs run on a GPU only: cuda_graph=True (--cuda-graph) needs device='cuda' "
                              "(--device cuda)")
        if cuda_graph and resident is False:
            raise ConfigError("CUDA graphs replay the device-resident step: cuda_graph=True needs resident=True "
                              "(or None)")
        #: the onnxruntime providers of every session of this model
        self.providers: list[Any] = providers_for(device, providers)
        self.device = "cuda" if on_cuda(self.providers) else "cpu"
        if self.device == "cuda" and kernels:
            raise ConfigError("the compiled neuron kernels run on the CPU only: drop kernels=True (--kernels) "
                              "with device='cuda' (--device cuda)")
        self.cuda_graph = bool(cuda_graph)
        #: whether the step form runs device-resident (runtime/resident.py)
        self.resident = self.device == "cuda" if resident is None else bool(resident)
        self.mode, self.chunk = mode, (int(chunk) if chunk is not None else None)
        self.unit_thresholds = bool(unit_thresholds)
        self.bind = bool(bind)  # IOBinding of the states in the step form (False: through numpy)
        self.guard = bool(guard)
        self.allow_nonfinite = bool(allow_nonfinite)
        proto = load_model(model)
        runtime_only = [n.name or n.op_type for n in proto.graph.node if n.domain == KERNEL_DOMAIN]
        if runtime_only:  # the runtime derives them itself; a model that holds them was not written by ann2snn
            raise ModelLoadError(f"node '{runtime_only[0]}' ({KERNEL_DOMAIN}) belongs to the runtime's compiled-kernel "
                                 "domain, which a compiled model never holds; compile the model with ann2snn")
        self.model: onnx.ModelProto = proto  # the compiled model as loaded (for memory estimates, reports)
        self.meta: dict[str, Any] = model_metadata(proto)
        self.t0: int = int(self.meta["readout"]["t0"])
        self.min_window: int = int(self.meta["readout"].get("min_window", 4))
        # (state input, state output, initial value broadcastable to a sample, sample shape)
        self._state_specs = state_specs(proto, self.meta)
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
        fast_proto = exact_unit_ops(proto) if unit_thresholds else proto
        types = value_types(fast_proto)  # the kernels' outputs keep the names (and types) of the neurons'
        lib = library(False if self.device == "cuda" else kernels)
        plan_options = _session_options(threads)
        if lib is not None:
            register(plan_options, lib)
            fast_proto = kernel_form(fast_proto, {s[0]: tuple(s[3]) for s in self._state_specs}, types)
        #: whether the fast forms run the compiled neuron kernels
        self.kernels = lib is not None
        self._plan = StepPlan(fast_proto, [(s[0], s[1], s[3]) for s in self._state_specs], self.step_outputs,
                              plan_options, types, self.providers)
        if self.guard or self.probes:  # the reference session: the guard's yardstick, built with the others
            self._sess  # noqa: B018
        if mode == "layered" and self._plan.cuts is None:
            raise ConfigError(f"mode='layered' is not available for this model: {self._plan.refusal}; "
                              "use mode='step' or 'auto'")
        self._fetch = self.step_outputs + [n[1] for n in self._state_specs] + self.probes
        tail = tail_model(proto, self.meta)
        self._tail = (open_session(tail.SerializeToString(), _session_options(threads), self.providers,
                                   "the analog tail") if tail is not None else None)
        self._float = [self.meta["types"][o]["elem_type"] == onnx.TensorProto.FLOAT for o in self.step_outputs]
        self._resident: ResidentStepper | None = None
        if self.resident and self._plan.reduced is not None:
            self._resident = ResidentStepper(self._plan, self._float, [(s[0], s[2]) for s in self._state_specs],
                                             self.providers, plan_options, self.cuda_graph)
        self._states: dict[str, np.ndarray] = {}
        self._sums: list[np.ndarray] | None = None
        self._last: list[np.ndarray] | None = None
        self._t = 0
        self._counted = 0
        self._recent = []
        self._nonfinite_warned = False
        #: the form ``timed`` mode measured fastest, by (batch, timesteps per chunk): "layered" / "step"
        self.auto_choices: dict[tuple[int, int], str] = {}
        #: the guard's verdicts, by (form, batch, chunk): True if the form agreed with the reference
        self.guard_verdicts: dict[tuple[str, int, int], bool] = {}
        #: seconds spent in the guard's reference steps and comparisons (benchmarks/guard_cost.py)
        self.guard_seconds = 0.0
        #: the form the last ``run`` / ``run_many`` used, e.g. "layered(chunk=8)", "step", "reference"
        self.last_form: str | None = None

    @property
    def _sess(self) -> ort.InferenceSession:
        """The session of the whole step graph as written (with the probes as extra outputs):
        the reference form, used by ``step()``, by probes, and by the guard."""
        if self._full is None:
            proto = onnx.ModelProto()
            proto.CopyFrom(self.model)
            proto.graph.output.extend(helper.make_tensor_value_info(p, onnx.TensorProto.FLOAT, None)
                                      for p in self._extra_outputs)
            self._full = open_session(proto.SerializeToString(), _session_options(self._threads), self.providers,
                                      "the step graph")
        return self._full

    # -- streaming interface -------------------------------------------------------------
    def reset(self, batch_size: int, with_states: bool = True) -> None:
        """Set every membrane potential to v(0) = v0·θ (other states to 0) for a batch of ``batch_size``.
        (``with_states=False``: the counters only, for a run whose states are set on the device.)"""
        self._states = initial_states(self._state_specs, batch_size) if with_states else {}
        self._sums, self._last, self._t, self._counted = None, None, 0, 0
        self._recent: list[list[np.ndarray]] = []  # the last min_window step outputs (readout window)
        self._nonfinite_warned = False

    def _feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        arrays = as_array_dict(inputs, self.input_specs, "input")
        check_arrays(arrays, self.input_specs, "input")
        for s in self.input_specs:
            fixed = s.shape[0] if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 else None
            if fixed is not None and arrays[s.name].shape[0] != fixed:
                raise DataError(f"input '{s.name}' has {arrays[s.name].shape[0]} samples but the model was compiled "
                                f"for a batch of {fixed} (its export fixes the batch and the compiler could not make it "
                                f"dynamic; see the compile warning): feed {fixed} at a time (--batch-size {fixed})")
        return {s.name: arrays[s.name] for s in self.input_specs}

    def _advance(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One step on checked feeds: update the membrane potentials, return the step outputs."""
        results = self._sess.run(self._fetch, {**feeds, **self._states})
        k, m = len(self.step_outputs), len(self._state_specs)
        for (name, _, _, _), value in zip(self._state_specs, results[k:k + m]):
            self._states[name] = value
        if self.probes:
            self.probe_values = dict(zip(self.probes, results[k + m:]))
        return results[:k]

    def step(self, inputs: Any) -> dict[str, np.ndarray]:
        """Advance one timestep; returns the spiking part's analog outputs at this step."""
        feeds = self._feeds(inputs)
        batch = next(iter(feeds.values())).shape[0]
        if not self._states or next(iter(self._states.values())).shape[0] != batch:
            self.reset(batch)
        t = self._t
        outs = self._advance(feeds)
        self._t += 1
        self._check_finite(outs, t)
        if t >= self.t0:
            if self._sums is None:
                self._sums = [np.asarray(o, np.float64) if f else o for o, f in zip(outs, self._float)]
            else:
                self._sums = [acc + o if f else o for acc, o, f in zip(self._sums, outs, self._float)]
            self._counted += 1
        self._recent = (self._recent + [[np.array(o) for o in outs]])[-self.min_window:]
        self._last = outs
        return dict(zip(self.step_outputs, outs))

    def readout(self) -> dict[str, np.ndarray]:
        """The readout after the steps seen so far, with the window ``run`` uses for that many
        steps (``window_start``): the average from ``t0`` on, or of the last ``min_window``
        steps while fewer than ``t0 + min_window`` steps have run; through the analog tail."""
        if self._last is None:
            raise ConfigError("readout() before any step(); call step(inputs) at least once")
        start = window_start(self._t, self.t0, self.min_window)
        if start == self.t0 and self._sums is not None and self._counted == self._t - start:
            values = [(acc / self._counted).astype(np.float32) if f else acc for acc, f in zip(self._sums, self._float)]
        else:  # the last t - start steps, summed in order as run() does
            window = self._recent[-(self._t - start):]
            values = []
            for j, f in enumerate(self._float):
                if not f:
                    values.append(window[-1][j])
                    continue
                acc = np.asarray(window[0][j], np.float64)
                for step in window[1:]:
                    acc = acc + step[j]
                values.append((acc / len(window)).astype(np.float32))
        return self.finish(values)

    def finish(self, values: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs from read-out step outputs (``values`` in ``step_outputs`` order,
        e.g. window means computed by the caller): runs the analog tail once, if there is one."""
        by_name = dict(zip(self.step_outputs, values))
        if self._tail is not None:
            tail_in = {i.name: by_name[i.name] for i in self._tail.get_inputs()}
            names = [o.name for o in self._tail.get_outputs()]
            results = self._tail.run(None, tail_in)
            self._check_finite(results, None, names)
            by_name.update(zip(names, results))
        return {name: by_name[name] for name in self.output_names}

    def _report_nonfinite(self, feeds: dict[str, np.ndarray], T: int) -> None:
        """A readout after T steps holds NaN or inf: rerun those steps by the reference form on a
        scratch state to name the output and the first step (NonFiniteError, or one warning with
        ``allow_nonfinite``)."""
        if self.allow_nonfinite and self._nonfinite_warned:
            return
        saved = (self._states, self._t)
        self._states = initial_states(self._state_specs, len(next(iter(feeds.values()))))
        try:
            for t in range(T):
                self._check_finite(self._advance(feeds), t)
                if self._nonfinite_warned:
                    return
        finally:
            self._states, self._t = saved
        self._check_finite([np.array(np.nan, np.float32)], T - 1, ["(a readout sum)"])

    def _check_finite(self, outs: Sequence[np.ndarray], t: int | None, names: Sequence[str] | None = None) -> None:
        """NaN or inf in a float output: NonFiniteError naming the output and step ``t`` (None:
        the analog tail), or a warning with ``allow_nonfinite``."""
        if self.allow_nonfinite and self._nonfinite_warned:
            return
        names = self.step_outputs if names is None else names
        for name, o in zip(names, outs):
            if not isinstance(o, np.ndarray) or o.dtype.kind != "f" or np.isfinite(o).all():
                continue
            what = "NaN" if np.isnan(o).any() else "inf"
            where = f"at step {t} (0-based)" if t is not None else "in the analog tail, after the readout"
            msg = (f"output '{name}' holds {what} {where}: the model's arithmetic overflowed (check the input's scale "
                   f"against the calibration data, or the compiled model)")
            if not self.allow_nonfinite:
                raise NonFiniteError(msg + "; pass --allow-nonfinite (allow_nonfinite=True) to keep such outputs")
            log.warning("%s; kept because non-finite outputs are allowed", msg)
            self._nonfinite_warned = True
            return

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
        form = self.choose_form(batch, Ts[-1], on_step is not None, feeds)
        # the resident form sets its states at rest on the device: no host copy of them to make
        self.reset(batch, with_states=form[0] != "resident")
        starts = {T: window_start(T, t0, self.min_window) for T in Ts}
        steps = self._steps(feeds, batch, Ts[-1], with_probes=on_step is not None, form=form)
        running: list[np.ndarray] | None = None  # sums of the float outputs over steps [0, t)
        at_start: dict[int, list[np.ndarray] | None] = {}
        results: dict[int, dict[str, np.ndarray]] = {}
        resident = None  # the resident form keeps the sums on the device: read at window starts and readouts
        for t in range(Ts[-1]):
            if t in starts.values():
                if resident is not None:
                    running = self._resident_sums(outs)
                at_start[t] = None if running is None else [r.copy() for r in running]
            outs = next(steps)
            if t == 0 and self.last_form == "resident":
                resident = self._resident
            if on_step is not None:
                on_step(t, self.probe_values)
            if resident is not None:
                running = []  # not None: the sums exist (on the device) from the first step on
            elif running is None:
                running = [np.asarray(o, np.float64) if f else o for o, f in zip(outs, self._float)]
            else:
                with np.errstate(invalid="ignore", over="ignore"):
                    running = [r + o if f else o for r, o, f in zip(running, outs, self._float)]
            T = t + 1
            if T in starts:
                if resident is not None:
                    running = self._resident_sums(outs)
                    outs = running
                # NaN / inf stay in a running sum once they enter it: one check per readout instead of
                # one per step; the first step is looked for only when there is one
                if not all(np.isfinite(r).all() for r, f in zip(running, self._float) if f):
                    self._report_nonfinite(feeds, T)
                s, base = starts[T], at_start[starts[T]]
                with np.errstate(invalid="ignore", over="ignore"):  # non-finite outputs were reported above
                    values = [((r - base[j] if base is not None else r) / (T - s)).astype(np.float32) if f else o
                              for j, (r, o, f) in enumerate(zip(running, outs, self._float))]
                results[T] = self.finish(values)
        steps.close()
        if resident is not None:
            self._states = {}  # the states stayed on the device: a following step() starts from rest
        return results

    def _resident_sums(self, outs: list[Any]) -> list[np.ndarray]:
        """The resident form's readout after the current step, as ``run_many`` keeps it: the
        float64 running sum of each float step output, the last value of the others (host copies)."""
        assert self._resident is not None
        sums = self._resident.sums()
        return [sums[o] if f else host(v) for o, v, f in zip(self.step_outputs, outs, self._float)]

    def _layered_chunk(self, batch: int, T: int) -> int | None:
        """Timesteps per chunk for the layered form, or None to step: a fixed rule of the batch,
        T and the state sizes (``auto``), or ``chunk`` / the rows rule (``layered``, ``timed``)."""
        if self._plan.cuts is None or self.mode in ("step", "reference"):
            return None
        if self.mode == "auto" and self.device == "cuda":  # the rule below was measured on CPUs
            return None
        if self.chunk is not None:
            return min(self.chunk, T)
        chunk = max(1, min(T, -(-LAYERED_ROWS // batch)))
        if self.mode == "auto" and batch > LAYERED_MAX_BATCH_COMPENSATED \
                and any(c.kind == "chain" for c in self._plan.cuts.values()):
            return None
        if self.mode in ("auto", "timed"):
            per_sample = sum(4 * int(np.prod(shape)) for _, _, _, shape in self._state_specs)
            chunk = min(chunk, LAYERED_STATE_BYTES // max(per_sample * batch, 1))
            if batch > LAYERED_MAX_BATCH or chunk < 2:
                return None
        return chunk

    def _measured_choice(self, feeds: dict[str, np.ndarray], batch: int, chunk: int) -> int | None:
        """``timed`` mode: ``chunk`` if the layered form runs ``chunk`` steps faster than the step
        form on these inputs, else None. Timed once per (batch, chunk) on states at rest
        (a warm-up and two alternated rounds of each, best of each) and remembered in
        ``auto_choices``. The forms give the same outputs, so this changes only the speed."""
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
                    scratch = initial_states(self._state_specs, batch)  # runs start at rest
                    start = time.perf_counter()
                    form(scratch)
                    if rnd:  # round 0 warms up: the first call of a session plans its memory
                        best[name] = min(best[name], time.perf_counter() - start)
            self.auto_choices[key] = "layered" if best["layered"] < best["step"] else "step"
            log.debug("timed mode, batch %d, %d steps per chunk: layered %.1f ms, step %.1f ms: %s", batch, chunk,
                      best["layered"] * 1e3, best["step"] * 1e3, self.auto_choices[key])
        return chunk if self.auto_choices[key] == "layered" else None

    def choose_form(self, batch: int, T: int, with_probes: bool = False,
                    feeds: dict[str, np.ndarray] | None = None) -> tuple[str, int | None]:
        """The form a run of T steps at this batch uses: ("reference" | "constant" | "step" |
        "layered", chunk). "constant": nothing in the step graph varies in time (no neuron),
        so the prefix runs once and its outputs are every step's."""
        if self.probes or with_probes or self.mode == "reference":
            return "reference", None
        if self._plan.reduced is None:
            return ("constant", None) if self._plan.prefix is not None else ("reference", None)
        chunk = self._layered_chunk(batch, T)
        if chunk is not None and self.mode == "timed" and self.chunk is None and feeds is not None:
            chunk = self._measured_choice(feeds, batch, chunk)
        if chunk is not None:
            return "layered", chunk
        return ("resident", None) if self._resident is not None else ("step", None)

    def _form_steps(self, form: str, chunk: int | None, feeds: dict[str, np.ndarray],
                    T: int) -> Iterator[list[np.ndarray]]:
        """Step outputs of ``form`` for T steps from the current states (which it updates)."""
        if form == "layered":
            yield from run_layered(self._plan, feeds, self._states, T, chunk or 1)
        elif form == "step":
            for outs in run_steps(self._plan, feeds, self._states, T, bind=self.bind):
                yield [o.copy() for o in outs]  # bound output buffers are rewritten by the next step
        elif form == "resident":
            assert self._resident is not None
            yield from self._resident.steps(feeds, T)
        elif form == "constant":
            yield from run_constant(self._plan, feeds, T)
        else:
            for _ in range(T):
                yield self._advance(feeds)

    def _guarded(self, form: str, chunk: int | None, feeds: dict[str, np.ndarray], batch: int,
                 T: int) -> tuple[str, list[list[np.ndarray]], Iterator[list[np.ndarray]]]:
        """The guard: the first steps of a fast form compared with the reference (on the first
        and the last sample) before the form is used for this batch size. Returns the form to
        use, the step outputs already computed and the generator of the rest. Called at rest
        (after ``reset``): a fallback restarts the reference from rest."""
        key = (form, batch, chunk or 0)
        n = min(GUARD_STEPS, T)
        if not self.guard or form == "reference" or self.guard_verdicts.get(key) is True:
            return form, [], self._form_steps(form, chunk, feeds, T)
        if self.guard_verdicts.get(key) is None:
            # the reference on the first and last sample of the batch only (samples are independent):
            # a wrong buffer, row or step shows there, at a fraction of a step's cost
            began = time.perf_counter()  # the guard's own cost: these copies, the reference steps, the comparison
            rows = sorted({0, batch - 1})
            ref_states = (initial_states(self._state_specs, len(rows)) if form == "resident"  # at rest on the device
                          else {name: v[rows] for name, v in self._states.items()})  # fancy indexing copies
            spent = time.perf_counter() - began
            gen = self._form_steps(form, chunk, feeds, T)
            head = [[host(o) for o in next(gen)] for _ in range(n)]
            began = time.perf_counter()
            if form == "resident":
                assert self._resident is not None
                fast_states = self._resident.states(rows)
            else:
                fast_states = {k: np.array(v[rows]) for k, v in self._states.items()}
            k, m = len(self.step_outputs), len(self._state_specs)
            ref_feeds = {name: v[rows] for name, v in feeds.items()}
            ref = []
            for _ in range(n):  # the reference: the step graph as written, states through numpy
                results = self._sess.run(self._fetch[:k + m], {**ref_feeds, **ref_states})
                ref.append(results[:k])
                ref_states = {spec[0]: r for spec, r in zip(self._state_specs, results[k:])}
            head_rows = [[o[rows] if o.ndim and o.shape[0] == batch else o for o in step] for step in head]
            problem = _disagreement(head_rows, ref, self.step_outputs)
            if problem is None and form in ("step", "resident"):  # the layered form's: after its whole chunk
                names = [spec[0] for spec in self._state_specs]
                problem = _disagreement([[fast_states[x] for x in names]], [[ref_states[x] for x in names]], names)
            self.guard_verdicts[key] = problem is None
            self.guard_seconds += spent + time.perf_counter() - began
            if problem is None:
                log.debug("guard: form %s (batch %d, chunk %s) agrees with the reference", form, batch, chunk)
                if form == "resident":  # its sums on the device hold the head's steps: run again from rest
                    gen.close()
                    return form, [], self._form_steps(form, chunk, feeds, T)
                return form, head, gen
            gen.close()
            log.warning("the %s form disagrees with the reference on its first %d step(s) at batch %d (%s); it is not "
                        "used for this model and batch size: running the reference form instead (slower, correct). "
                        "Please report this with the model", _describe(form, chunk), n, batch, problem)
        # runs start from rest (run_many resets first), so the reference restarts from rest too
        self._states = initial_states(self._state_specs, batch)
        return "reference", [], self._form_steps("reference", None, feeds, T)

    def _steps(self, feeds: dict[str, np.ndarray], batch: int, T: int, with_probes: bool,
               form: tuple[str, int | None] | None = None):
        """Generator of the step outputs for steps 0..T-1 from the current state, by ``form``
        (``choose_form``'s answer) or the form ``choose_form`` picks."""
        form, chunk = form if form is not None else self.choose_form(batch, T, with_probes, feeds)
        form, head, rest = self._guarded(form, chunk, feeds, batch, T)
        self.last_form = _describe(form, chunk)
        for outs in head:
            self._t += 1
            yield outs
        for outs in rest:
            self._t += 1
            yield outs


def _describe(form: str, chunk: int | None) -> str:
    return f"layered(chunk={chunk})" if form == "layered" else form


def _disagreement(got: list[list[np.ndarray]], ref: list[list[np.ndarray]], names: Sequence[str]) -> str | None:
    """None if every array of ``got`` equals ``ref``'s to GUARD_RTOL of its scale, else what differs."""
    for t, (g_step, r_step) in enumerate(zip(got, ref)):
        for name, g, r in zip(names, g_step, r_step):
            g, r = np.asarray(g), np.asarray(r)
            if g.shape != r.shape:
                return f"'{name}' at step {t}: shape {g.shape} instead of {r.shape}"
            if np.array_equal(g, r):  # the forms agree bit for bit in practice: the one cheap check
                continue
            if g.dtype.kind != "f":
                if not np.array_equal(g, r):
                    return f"'{name}' at step {t} differs"
                continue
            if not np.array_equal(np.isfinite(g), np.isfinite(r)) or not np.array_equal(np.isnan(g), np.isnan(r)):
                return f"'{name}' at step {t}: non-finite values differ"
            fin = np.isfinite(r)
            scale = float(np.abs(r[fin]).max()) if fin.any() else 0.0
            err = float(np.abs(g[fin].astype(np.float64) - r[fin]).max()) if fin.any() else 0.0
            if err > GUARD_RTOL * max(scale, 1e-6):
                return f"'{name}' at step {t}: max difference {err:.3g} against a scale of {scale:.3g}"
    return None
