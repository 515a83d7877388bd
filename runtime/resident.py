"""Device-resident stepping: the step form with everything that lives across steps kept in
onnxruntime's own buffers (OrtValues) on the session's device, the GPU under ``--device cuda``.

The resident step model is the reduced step model of :class:`~ann2snn.runtime.forms.StepPlan`
plus the readout's running sums: for every float step output ``y`` it takes the sum so far
``y@sum`` (float64) and returns ``y@sum + Cast(y, float64)``, the same float64 additions in
the same order as the host readout of ``SpikingSession.run_many``. Sums start at -0.0, the
identity of IEEE addition (+0.0 would turn a first -0.0 into +0.0), so the sums are those of
the host bit for bit. Each step is one ``run_with_iobinding`` on fixed buffers: the membrane
states alternate between two buffer sets (or stay in one where a state may be rewritten in
place, :attr:`StepPlan.inplace`), the sums are updated in place, and the step outputs are
written into bound buffers. A run starts with one call of a small *rest* model that writes
the states at rest (v0·θ, or 0) and the sums' -0.0 into those buffers on the device (Expand
of each per-sample value: no host copy of the states). Nothing is copied to the host between
steps; the sums (and the last step's outputs) are copied at a readout, a step's outputs only
when the caller reads them (the guard's first steps).

With ``cuda_graph`` the session enables onnxruntime's CUDA graphs: onnxruntime captures the
step once per buffer set (a ``gpu_graph_id`` each, one pair per input shape) and replays it,
one launch per step instead of one per kernel. That needs what this form provides: fixed
shapes and fixed buffer addresses per graph, every run through IOBinding, and every node of
the step graph on the CUDA provider (onnxruntime refuses the session otherwise).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ann2snn.device import DeviceError, open_session, ort_device, providers_for
from ann2snn.errors import ConfigError

from .forms import StepPlan, _constant_values, _subgraph_model

log = logging.getLogger(__name__)

#: suffix of the running-sum inputs (and, with ``@next``, outputs) of the resident step model
SUM = "@ann2snn_sum"


def _sum_type(types: dict[str, onnx.TypeProto], name: str) -> onnx.TypeProto:
    """The type of ``name``'s running sum: its shape, float64."""
    t = onnx.TypeProto()
    if name in types:
        t.CopyFrom(types[name])
    t.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    return t


def resident_model(plan: StepPlan, summed: Sequence[str]) -> tuple[onnx.ModelProto, list[str]]:
    """The reduced step model with the running sums of the step outputs ``summed`` added
    (float outputs, varying or constant in time); also the names of its non-state inputs
    that are constant in time (prefix outputs, data inputs)."""
    nodes = list(plan.rest_nodes)
    constant_inputs = [i for i in plan.reduced_inputs if i not in plan.state_in]
    for o in summed:  # a step output constant in time is an input of the resident model
        if o not in plan.varying and o not in constant_inputs:
            constant_inputs.append(o)
    types = dict(plan.types)
    for o in summed:
        nodes += [helper.make_node("Cast", [o], [f"{o}{SUM}@cast"], to=onnx.TensorProto.DOUBLE),
                  helper.make_node("Add", [f"{o}{SUM}", f"{o}{SUM}@cast"], [f"{o}{SUM}@next"])]
        types[f"{o}{SUM}"] = types[f"{o}{SUM}@next"] = _sum_type(plan.types, o)
    inputs = plan.state_order + constant_inputs + [f"{o}{SUM}" for o in summed]
    outputs = plan.reduced_outputs + [f"{o}{SUM}@next" for o in summed]
    return _subgraph_model(plan.proto, nodes, inputs, outputs, types, "ann2snn_step_resident"), constant_inputs


def rest_model(values: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """A model that writes ``values[name]`` broadcast to the shape given in its input
    ``name@shape`` (int64) as its output ``name``: the states at rest and the sums' start,
    set on the device."""
    nodes, inits, inputs, outputs = [], [], [], []
    for name, value in values.items():
        inits.append(onnx.numpy_helper.from_array(np.asarray(value), f"{name}@rest"))
        nodes.append(helper.make_node("Expand", [f"{name}@rest", f"{name}@shape"], [name]))
        inputs.append(helper.make_tensor_value_info(f"{name}@shape", onnx.TensorProto.INT64, [None]))
        outputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype),
                                                     None))
    graph = helper.make_graph(nodes, "ann2snn_rest", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@dataclass
class _Buffers:
    """The device buffers (and bindings) of one input shape."""

    const: dict[str, ort.OrtValue]
    sides: list[dict[str, ort.OrtValue]]  # the states' two buffer sets (the same OrtValue for in-place states)
    sums: dict[str, ort.OrtValue]
    outs: dict[str, ort.OrtValue]
    rest: ort.IOBinding  # the rest model's, writing into sides[0] and the sums
    shapes: list[np.ndarray]  # the shapes it reads (kept alive: bound as views on the CPU)
    bindings: list[ort.IOBinding] = field(default_factory=list)
    run_options: list[ort.RunOptions] = field(default_factory=list)
    prefix_binding: ort.IOBinding | None = None
    latest: int = 0  # which side holds the latest states


class ResidentStepper:
    """Runs the step form of ``plan`` with the states, the readout's running sums and the step
    outputs resident on the device of ``providers``."""

    def __init__(self, plan: StepPlan, floats: Sequence[bool], rest: Sequence[tuple[str, np.ndarray]],
                 providers: Sequence[Any], options: ort.SessionOptions, cuda_graph: bool = False) -> None:
        """``floats``: per step output (in ``plan.step_outputs`` order), whether it is summed
        (float) or read out as its last value. ``rest``: (state input, value at rest
        broadcastable to a sample) per state. ``cuda_graph``: ``providers`` enable CUDA
        graphs: the step session gets onnxruntime's ``enable_cuda_graph`` on ``providers``'s
        CUDA provider, and every run of it goes through fixed buffers."""
        assert plan.reduced is not None and plan.prefix is not None
        self.plan = plan
        self.summed = [o for o, f in zip(plan.step_outputs, floats) if f]
        model, self.constant_inputs = resident_model(plan, self.summed)
        self.device = ort_device(providers)
        self.cuda_graph = bool(cuda_graph)
        what = "the step graph" + (" with CUDA graphs" if cuda_graph else "")
        try:
            self.session = open_session(model.SerializeToString(), options,
                                        providers_for(self.device[0], providers, cuda_graph=self.cuda_graph), what)
        except DeviceError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's refusal (e.g. a node off the GPU with CUDA graphs)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ("; CUDA graphs need every node of the step graph on the CUDA provider: run without --cuda-graph"
                    if cuda_graph else "")
            raise ConfigError(f"onnxruntime cannot run {what}: {first}{hint}") from None
        self._rest_values = dict(rest)
        values = {s: np.asarray(v, np.float32) for s, v in rest}
        values.update((f"{o}{SUM}", np.array(-0.0)) for o in self.summed)
        self._rest = open_session(rest_model(values).SerializeToString(), None, providers, "the states at rest")
        self._buffers: dict[tuple, _Buffers] = {}
        self._graph_ids = itertools.count(1)  # 0 is onnxruntime's own, -1 means no capture

    # -- buffers ------------------------------------------------------------------------------
    def _empty(self, shape: Sequence[int], dtype: np.dtype) -> ort.OrtValue:
        kind, index = self.device
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, kind, index)

    def _buffers_for(self, feeds: dict[str, np.ndarray],
                     const: dict[str, np.ndarray] | None) -> tuple[_Buffers, dict[str, np.ndarray] | None]:
        """The buffers of this input shape, made on first use (one step of the plain reduced
        session on the new state buffers, whatever they hold, gives the outputs' shapes).
        Returns them and ``const`` (the constant values, computed here if they were needed)."""
        key = tuple((n, v.shape, v.dtype.str) for n, v in feeds.items())
        if key in self._buffers:
            return self._buffers[key], const
        plan = self.plan
        if const is None:
            const = _constant_values(plan, feeds)
        batch = next(iter(feeds.values())).shape[0]
        here = {s: self._empty((batch, *plan.state_shape[s]), np.float32) for s in plan.state_order}
        there = {s: here[s] if s in plan.inplace else self._empty((batch, *plan.state_shape[s]), np.float32)
                 for s in plan.state_order}
        probe = plan.reduced.io_binding()  # no host copy of the states, even once
        kept = {n: np.ascontiguousarray(const[n]) for n in plan.reduced_inputs if n not in plan.state_in}
        for n, v in kept.items():
            probe.bind_cpu_input(n, v)
        for s, v in here.items():
            probe.bind_ortvalue_input(s, v)
        for o in plan.varying_outputs:
            probe.bind_output(o, *self.device)
        plan.reduced.run_with_iobinding(probe)
        shaped = {o: (tuple(v.shape()), helper.tensor_dtype_to_np_dtype(v.element_type()))
                  for o, v in zip(plan.varying_outputs, probe.get_outputs())}
        del probe, kept
        shaped.update((n, (np.shape(const[n]), np.asarray(const[n]).dtype)) for n in plan.constant_outputs)
        sums = {o: self._empty(shaped[o][0], np.float64) for o in self.summed}
        rest = self._rest.io_binding()
        shapes = []
        for name, target in [*here.items(), *((f"{o}{SUM}", v) for o, v in sums.items())]:
            shapes.append(np.array(target.shape(), np.int64))
            rest.bind_cpu_input(f"{name}@shape", shapes[-1])
            rest.bind_ortvalue_output(name, target)
        b = _Buffers(const={n: self._empty(np.shape(const[n]), np.asarray(const[n]).dtype) for n in self.constant_inputs},
                     sides=[here, there], sums=sums,
                     outs={o: self._empty(*shaped[o]) for o in plan.varying_outputs},
                     rest=rest, shapes=shapes)
        for src, dst in ((0, 1), (1, 0)):
            binding = self.session.io_binding()
            for n, v in b.const.items():
                binding.bind_ortvalue_input(n, v)
            for s in plan.state_order:
                binding.bind_ortvalue_input(s, b.sides[src][s])
                binding.bind_ortvalue_output(plan.state_out_of[s], b.sides[dst][s])
            for o in plan.varying_outputs:
                binding.bind_ortvalue_output(o, b.outs[o])
            for o, v in sums.items():  # read once, elementwise, by the Add that writes them: in place
                binding.bind_ortvalue_input(f"{o}{SUM}", v)
                binding.bind_ortvalue_output(f"{o}{SUM}@next", v)
            options = ort.RunOptions()
            options.log_severity_level = 4
            if self.cuda_graph:  # one captured graph per buffer set and shape
                options.add_run_config_entry("gpu_graph_id", str(next(self._graph_ids)))
            b.bindings.append(binding)
            b.run_options.append(options)
        prefix_outputs = [n for n in plan.prefix_outputs if n in b.const]
        if prefix_outputs:  # the prefix writes its outputs straight into the step's input buffers
            pb = plan.prefix.io_binding()
            for n in prefix_outputs:
                pb.bind_ortvalue_output(n, b.const[n])
            b.prefix_binding = pb
        self._buffers[key] = b
        return b, const

    # -- running ------------------------------------------------------------------------------
    def steps(self, feeds: dict[str, np.ndarray], T: int) -> Iterator[list[Any]]:
        """Yield the step outputs of steps 0..T-1 from rest:
        OrtValues on the device for the outputs that vary in time (valid until the next step;
        read them with :func:`host`), host arrays for those constant in time. The running sums
        and the states stay on the device (:meth:`sums`, :meth:`states`)."""
        plan = self.plan
        const = None if not plan.constant_outputs else _constant_values(plan, feeds)
        b, const = self._buffers_for(feeds, const)
        self._current = b
        if b.prefix_binding is not None:
            # bind_cpu_input views the array on the CPU: keep each alive until the prefix has run
            kept = {n: np.ascontiguousarray(feeds[n]) for n in plan.data_inputs if n in feeds}
            for n, v in kept.items():
                b.prefix_binding.bind_cpu_input(n, v)
            plan.prefix.run_with_iobinding(b.prefix_binding)
            del kept
        for n, v in b.const.items():
            if n not in plan.prefix_outputs:  # data inputs read by the step itself
                v.update_inplace(np.ascontiguousarray(feeds[n] if n in feeds else const[n]))
        self._rest.run_with_iobinding(b.rest)  # the states at rest into sides[0], -0.0 into the sums
        b.latest = 0
        constants = {n: const[n] for n in plan.constant_outputs} if const is not None else {}
        for t in range(T):
            side = t % 2
            self.session.run_with_iobinding(b.bindings[side], b.run_options[side])
            b.latest = 1 - side
            yield [b.outs[o] if o in b.outs else constants[o] for o in plan.step_outputs]

    def sums(self) -> dict[str, np.ndarray]:
        """Host copies of the running sums (float64) of the summed step outputs, by name."""
        return {o: host(v) for o, v in self._current.sums.items()}

    def states(self, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Host copies of the latest states (of the batch rows ``rows`` only, if given)."""
        side = self._current.sides[self._current.latest]
        return {s: host(v) if rows is None else host(v)[list(rows)] for s, v in side.items()}


def host(value: Any) -> np.ndarray:
    """A host copy of an OrtValue (on any device) or an array (an OrtValue on the CPU views
    the buffer that the next step rewrites: always a copy)."""
    if isinstance(value, ort.OrtValue):
        return np.array(value.numpy(), copy=True)
    return np.array(value, copy=True)
