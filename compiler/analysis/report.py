"""What a compiled SNN costs: firing rates, synaptic operations (SOPs), MACs and energy, per layer.

``report(snn, data, Ts)`` runs the SNN once on ``data`` for ``max(Ts)`` steps, counts the
spikes of every neuron layer at every position, and turns them into operations with fan-out
maps computed once from the compiled graph's weights and geometry (:mod:`.cost`, the static
part); :mod:`.report_format` prints the result as tables and plots it.

Counting conventions (the README repeats them):

- **SOP** (synaptic operation, one accumulate): a spike of a neuron costs one SOP per synapse
  it drives. Following the spike forward, every path ends at an accumulator:
  - a weighted layer (Conv, ConvTranspose, Gemm, MatMul with constant weights): one SOP per
    weight tap that connects the spiking element to an output element that exists. For Conv
    this depends on the position (padding edges, strides, dilations, groups); for Gemm /
    MatMul it is the number of outputs. By default every weight counts (the dense structure, as hardware that
    stores the layer would execute it); ``nonzero_weights=True`` counts only nonzero weights.
  - otherwise the element the spike reaches, at one SOP per element: the next neuron's
    membrane (a residual Add: the spike, scaled by θ, is added into the next neuron's input),
    the readout (a graph output), or any other op that consumes it (e.g. a MaxPool on spikes).
  Weight-free linear ops on the way route the spike without costing anything themselves:
  Flatten, Reshape, Transpose, Squeeze/Unsqueeze, Identity, Concat, constant Pad, Add/Sub, and the Mul/Div
  by a constant that applies θ (it is part of the synaptic weight, as in the folded case).
  AveragePool / GlobalAveragePool count as folded into the consumer's weights (as the compiler
  folds θ through them): an element's fan-out is the sum, over the pool windows that contain
  it, of the fan-out of that window's output. For non-overlapping windows (kernel = stride,
  global pooling) this is exactly the number of synapses of the composed layer; for
  overlapping windows it counts one accumulate per path. A pool read by a neuron directly
  costs one SOP per window a spike falls in.
- Biases, the membrane update, the cumulative max-pool state and the readout average are not
  counted (as in the paper's SOP count).
- **MAC**: a weighted layer whose input is analog performs multiply-accumulates: by default
  the conventional dense count (every kernel tap of every output position, padding included,
  as ``ann2snn inspect`` and published FLOP counts); ``mac_count="valid"`` counts one per
  synapse exactly like SOPs (taps that fall on padding excluded). Under
  direct coding this is every weighted layer before the first neuron. Its input is the same
  at every step, so by default it is counted once per input (``E_MAC x MACs_1 + E_AC x SOPs``,
  the usual direct-coding estimate); ``analog_once=False`` counts it at every step, as the
  plain step graph executes it (``T x`` its MACs). The analog tail runs once per input. The
  ANN's MACs are those of the same weighted layers, all analog, counted the same way, from
  the compiled graph (BatchNorm is folded, so it costs nothing).
- SOPs and spikes at T count every step in ``[0, T)``: the steps before the readout window
  (t0) are spent too.
- **Energy**: ``SOPs x E_sop + MACs x E_mac`` per input, under each ``EnergyModel``: the paper's
  (77 fJ per SOP, 12.5 pJ per FLOP, 1 FLOP per MAC: the paper's ResNet-34 figures, 22 frames/s/W
  for the ANN, match 3.6 G MACs at 12.5 pJ each) and the 45 nm one (0.9 pJ per accumulate,
  4.6 pJ per multiply-accumulate). Firing rate = spikes / (neurons x steps), over all T steps.
- **SOPs90 / SOPs95**: SOPs per input at the smallest T whose accuracy reaches 90% / 95% of the
  ANN's (needs labels and the ANN).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from ann2snn.runtime.ops import SIGNED_SPIKE_OPS

from ..errors import ConfigError, DataError
from ..modelio import load_model
from .cost import METADATA_KEY, NetworkCost, analyse


# -- energy -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EnergyModel:
    """Energy per synaptic operation (accumulate) and per multiply-accumulate, in joules."""

    name: str
    sop_j: float
    mac_j: float
    note: str = ""


def paper_energy(sop_fj: float = 77.0, flop_pj: float = 12.5, flops_per_mac: float = 1.0) -> EnergyModel:
    """Bu, Li & Yu's constants (ROLLS chip): 77 fJ per SOP, 12.5 pJ per ANN FLOP, 1 FLOP per MAC."""
    return EnergyModel("paper", sop_fj * 1e-15, flop_pj * 1e-12 * flops_per_mac,
                       f"{sop_fj:g} fJ/SOP, {flop_pj:g} pJ/FLOP, {flops_per_mac:g} FLOP/MAC")


def cmos45_energy(ac_pj: float = 0.9, mac_pj: float = 4.6) -> EnergyModel:
    """The common 45 nm CMOS figures: 0.9 pJ per 32-bit float accumulate, 4.6 pJ per multiply-accumulate."""
    return EnergyModel("45nm", ac_pj * 1e-12, mac_pj * 1e-12, f"{ac_pj:g} pJ/AC, {mac_pj:g} pJ/MAC")


DEFAULT_ENERGY: tuple[EnergyModel, ...] = (paper_energy(), cmos45_energy())


# -- counting spikes during a run -------------------------------------------------------------------

class SpikeCounter:
    """Per-position spike counts of every neuron layer, summed over samples, at every T in ``Ts``.

    Pass ``on_step`` to ``SpikingSession.run_many`` (with the spike tensors as probes); call
    ``start()`` before each batch.
    """

    def __init__(self, shapes: dict[str, Sequence[int]], Ts: Sequence[int], signed: bool = False) -> None:
        self.Ts = sorted(set(Ts))
        self.signed = signed  # spikes may be -1: count |spikes|
        self._Tset = set(self.Ts)
        self.names = list(shapes)
        self.totals = {T: {s: np.zeros(tuple(sh), np.float64) for s, sh in shapes.items()} for T in self.Ts}
        self.samples = 0
        self._cur: dict[str, np.ndarray] = {}

    def start(self) -> None:
        self._cur = {}

    def on_step(self, t: int, values: dict[str, np.ndarray]) -> None:
        cur = self._cur
        if t == 0:
            self.samples += next(iter(values.values())).shape[0] if values else 0
        for s in self.names:
            # float32 sums of 0/1 are exact below 2**24 samples; a signed neuron's -1 is a spike too,
            # and a burst of k spikes is k spikes
            v = np.add.reduce(np.abs(values[s]) if self.signed else values[s], axis=0)
            if s in cur:
                cur[s] += v
            else:
                cur[s] = v.astype(np.float64)
        if t + 1 in self._Tset:
            tot = self.totals[t + 1]
            for s in self.names:
                tot[s] += cur[s]


def _counting_session(model: onnx.ModelProto, counter_holder: list, device: str = "cpu"):
    """A SpikingSession on ``device`` that probes every spike tensor and feeds the counter on
    every step."""
    from ann2snn.runtime import SpikingSession

    class CountingSession(SpikingSession):
        def run_many(self, inputs, Ts, t0=None, on_step=None):  # noqa: ANN001
            counter = counter_holder[0]
            counter.start()

            def hook(t: int, values: dict[str, np.ndarray]) -> None:
                counter.on_step(t, values)
                if on_step is not None:
                    on_step(t, values)
            return super().run_many(inputs, Ts, t0, on_step=hook)

    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    return CountingSession(model, probes=[n["spikes"] for n in meta["neurons"]], device=device)


def _simulate(session: Any, data: Any, Ts: Sequence[int], label_key: str, batch_size: int,
              t0: int | None, show_progress: bool) -> dict[str, Any]:
    """SNN accuracy without an ANN reference (the part of ``evaluate`` that needs no ANN)."""
    from ..data.arrays import as_array_dict, check_arrays
    from ..progress import progress

    specs = session.input_specs
    arrays = as_array_dict(data, specs, "report data", lazy=True)  # read a batch at a time
    check_arrays(arrays, specs, "report data")
    n = arrays[specs[0].name].shape[0]
    labels = arrays.get(label_key)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != n:
            raise DataError(f"report data has {labels.shape[0]} labels under '{label_key}' for {n} samples")
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size} (--batch-size)")
    preds: dict[int, list[np.ndarray]] = {T: [] for T in Ts}
    out_name = session.output_names[0]
    for i in progress(range(0, n, batch_size), math.ceil(n / batch_size), "simulating", show_progress):
        res = session.run_many({s.name: arrays[s.name][i:i + batch_size] for s in specs}, Ts, t0)
        for T in Ts:
            preds[T].append(res[T][out_name].argmax(axis=1))
    rows = [{"T": T, "accuracy": float((np.concatenate(preds[T]) == labels).mean()) if labels is not None else None}
            for T in Ts]
    return {"samples": int(n), "ann_accuracy": None, "t0": session.t0 if t0 is None else int(t0), "snn": rows}


def sops_at_fraction(rows: Sequence[dict[str, Any]], ann_accuracy: float | None, fraction: float) -> dict[str, Any] | None:
    """The row (T, SOPs, ...) of the smallest T whose accuracy reaches ``fraction`` of the ANN's, or None."""
    if ann_accuracy is None:
        return None
    for r in sorted(rows, key=lambda r: r["T"]):
        if r.get("accuracy") is not None and r["accuracy"] >= fraction * ann_accuracy:
            return {"T": r["T"], "accuracy": r["accuracy"], "sops_per_input": r["sops_per_input"],
                    "energy_j": r.get("energy_j")}
    return None


def report(
    snn: str | os.PathLike[str] | onnx.ModelProto,
    data: Any,
    Ts: Sequence[int],
    *,
    ann: str | os.PathLike[str] | onnx.ModelProto | None = None,
    label_key: str = "label",
    batch_size: int | None = None,
    t0: int | None = None,
    energy: Sequence[EnergyModel] = DEFAULT_ENERGY,
    nonzero_weights: bool = False,
    analog_once: bool = True,
    mac_count: str = "dense",
    show_progress: bool = False,
    ray_address: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Firing rates, SOPs, MACs and energy per input, per layer and in total, at each T.

    One simulation of ``max(Ts)`` steps serves every T. With labels under ``label_key`` the
    SNN's accuracy is reported; with ``ann`` (the original ANN) also the ANN's accuracy, the
    agreement, and SOPs90 / SOPs95. The ANN's MACs always come from the compiled graph.
    ``batch_size``: default :func:`ann2snn.runtime.batches.default_batch_size`. With
    ``ray_address`` the simulation is sharded over Ray workers (``ann2snn.distributed``; ``snn``,
    ``data`` and ``ann`` must then be paths): the same report. ``device``: where the SNN and
    the ANN run (``cpu`` or ``cuda``, ann2snn.device).
    """
    from ann2snn.runtime.batches import default_batch_size
    from ann2snn.runtime.session import check_T

    Ts = sorted({check_T(T) for T in Ts})
    if not Ts:
        raise ConfigError("report needs at least one T (-T)")
    if not energy:
        raise ConfigError("report needs at least one energy model")
    proto = load_model(snn)
    cost = analyse(proto, nonzero_weights=nonzero_weights, mac_count=mac_count)
    holder: list[SpikeCounter] = []
    session = _counting_session(proto, holder, device)
    signed = any(n["op"] in SIGNED_SPIKE_OPS for n in cost.neurons)
    holder.append(SpikeCounter({n["spikes"]: n["shape"] for n in cost.neurons}, Ts, signed=signed))
    batch_size = batch_size or default_batch_size(session)
    if ray_address is not None:
        if not all(isinstance(p, (str, os.PathLike)) for p in (snn, data, *([ann] if ann is not None else []))):
            raise ConfigError("report with Ray reads the model, the data and the ANN on the workers: pass them as paths")
        totals, samples, acc = report_counts_ray(
            os.fspath(snn), os.fspath(data), Ts, specs=session.input_specs, address=ray_address, ann=os.fspath(ann) if ann is not None else None,
            label_key=label_key, batch_size=batch_size, t0=t0, t0_default=session.t0, threads=None,
            show_progress=show_progress)
        holder[0].totals, holder[0].samples = totals, samples
    elif ann is not None:
        from .evaluate import evaluate
        acc = evaluate(ann, session, data, Ts, label_key=label_key, batch_size=batch_size, t0=t0,
                       show_progress=show_progress)
    else:
        acc = _simulate(session, data, Ts, label_key, batch_size, t0, show_progress)
    counter = holder[0]
    result = summarise(cost, counter, acc, energy, analog_once)
    result["conventions"] = {"weights": "nonzero" if nonzero_weights else "dense",
                             "analog_macs": "once per input" if analog_once else "every step",
                             "mac_count": mac_count}
    result["model"] = str(snn) if isinstance(snn, (str, os.PathLike)) else None
    result["ann_model"] = str(ann) if isinstance(ann, (str, os.PathLike)) else None
    return result


def summarise(cost: NetworkCost, counter: SpikeCounter, acc: dict[str, Any], energy: Sequence[EnergyModel],
              analog_once: bool = True) -> dict[str, Any]:
    """Turn spike counts and fan-out maps into the report dictionary (JSON-ready)."""
    n = max(counter.samples, 1)
    Ts = counter.Ts
    by_T_acc = {r["T"]: r for r in acc["snn"]}
    # SOPs per input of every (neuron layer, accumulating layer) pair at every T
    pair = {T: {s: {k: float((counter.totals[T][s] * f).sum()) / n for k, f in per.items()}
                for s, per in cost.fanout.items()} for T in Ts}
    neuron_rows = []
    for nl in cost.neurons:
        s = nl["spikes"]
        rows = []
        for T in Ts:
            spikes = float(counter.totals[T][s].sum()) / n
            rows.append({"T": T, "spikes_per_input": spikes, "firing_rate": spikes / (nl["units"] * T),
                         "sops_per_input": sum(pair[T][s].values())})
        neuron_rows.append({"name": nl["name"], "spikes": s, "units": nl["units"],
                            "synapses": cost.synapses(s), "fanout_mean": cost.synapses(s) / nl["units"],
                            "targets": sorted(cost.fanout[s]), "by_T": rows})
    layer_rows = []
    for layer in cost.layers:
        sources = [nl["name"] for nl in cost.neurons if layer["name"] in cost.fanout[nl["spikes"]]]
        spiking_sources = bool(sources)
        if layer["analog_macs_per_step"]:
            sources.append("analog input")
        if layer.get("increment_macs_per_step"):
            sources.append("compensated increments")
        if layer.get("current_macs_per_step"):
            sources.append("analog current every step")
        if layer["part"] == "tail":
            sources.append("readout")
        rows = []
        for T in Ts:
            sops = sum(pair[T][s].get(layer["name"], 0.0) for s in cost.fanout)
            macs = (layer["analog_macs_per_step"] * (1 if analog_once else T) + layer.get("tail_macs", 0)
                    + (layer.get("increment_macs_per_step", 0) + layer.get("current_macs_per_step", 0)) * T)
            rows.append({"T": T, "sops_per_input": sops, "macs_per_input": macs,
                         "energy_j": {e.name: sops * e.sop_j + macs * e.mac_j for e in energy}})
        layer_rows.append({"name": layer["name"], "op": layer["op"], "part": layer["part"], "inputs": sources,
                           "from_spikes": spiking_sources, "ann_macs": layer["ann_macs"], "by_T": rows})
    ann_energy = {e.name: cost.ann_macs * e.mac_j for e in energy}
    analog_step = sum(layer["analog_macs_per_step"] for layer in cost.layers)
    increment_step = sum(layer.get("increment_macs_per_step", 0) + layer.get("current_macs_per_step", 0)
                         for layer in cost.layers)
    snn_rows = []
    for i, T in enumerate(Ts):
        sops = sum(r["by_T"][i]["sops_per_input"] for r in neuron_rows)
        macs = analog_step * (1 if analog_once else T) + cost.tail_macs + increment_step * T
        spikes = sum(r["by_T"][i]["spikes_per_input"] for r in neuron_rows)
        units = sum(nl["units"] for nl in cost.neurons)
        e = {m.name: sops * m.sop_j + macs * m.mac_j for m in energy}
        row = {"T": T, "sops_per_input": sops, "macs_per_input": macs, "spikes_per_input": spikes,
               "firing_rate": spikes / (units * T) if units else 0.0, "energy_j": e,
               "ann_over_snn_energy": {k: (ann_energy[k] / v if v else None) for k, v in e.items()}}
        row.update({k: v for k, v in by_T_acc.get(T, {}).items() if k != "T"})
        snn_rows.append(row)
    ann_acc = acc.get("ann_accuracy")
    on_spikes = sum(r["ann_macs"] for r in layer_rows if r["part"] == "spiking" and "analog input" not in r["inputs"]
                    and "compensated increments" not in r["inputs"] and "analog current every step" not in r["inputs"]
                    and r["inputs"])
    tail = sum(r["ann_macs"] for r in layer_rows if r["part"] == "tail")
    stepped = sum(r["ann_macs"] for r in layer_rows if "compensated increments" in r["inputs"])
    currents = sum(r["ann_macs"] for r in layer_rows if "analog current every step" in r["inputs"])
    share = {"total": cost.ann_macs, "spiking": on_spikes, "tail": tail,
             "prefix": cost.ann_macs - on_spikes - tail - stepped - currents,
             **({"compensated": stepped} if stepped else {}), **({"analog_current": currents} if currents else {})}
    return {
        "samples": int(acc["samples"]), "t0": acc["t0"], "Ts": Ts,
        "mac_share": share,
        "energy_models": [asdict(e) for e in energy],
        "ann": {"macs": cost.ann_macs, "accuracy": ann_acc, "energy_j": ann_energy},
        "snn": snn_rows,
        "sops90": sops_at_fraction(snn_rows, ann_acc, 0.90),
        "sops95": sops_at_fraction(snn_rows, ann_acc, 0.95),
        "neuron_layers": neuron_rows,
        "synaptic_layers": layer_rows,
    }


def report_shard(snn: str, data: str, ann: str | None, labels: np.ndarray | None, start: int, stop: int,
                  batch_size: int, Ts: Sequence[int], t0: int | None, threads: int) -> tuple[Any, int, list[Any]]:
    """One shard of ``report``: spike counts per T and layer (sums of integers, exact in any
    order), the samples counted, and the per-batch accuracy sums."""
    from ..distributed import _SESSIONS, _ann_session, _batches, _maybe_die
    from .evaluate import batch_sums, predictions

    _maybe_die()
    key = ("report", snn, os.path.getmtime(snn), threads)
    if key not in _SESSIONS:
        proto = load_model(snn)
        holder: list[Any] = []
        neurons = analyse(proto).neurons
        _SESSIONS[key] = (_counting_session(proto, holder), holder, neurons)
    session, holder, neurons = _SESSIONS[key]
    counter = SpikeCounter({n["spikes"]: n["shape"] for n in neurons}, Ts,
                           signed=any(n["op"] in SIGNED_SPIKE_OPS for n in neurons))
    holder[:] = [counter]
    ann_sess = _ann_session(ann, threads) if ann is not None else None
    sums: list[Any] = []
    pos = start
    for feeds in _batches(session, data, start, stop, batch_size):
        if ann_sess is not None:
            sums.append(batch_sums(ann_sess, session, feeds, labels, pos, Ts, t0))
        else:
            res = session.run_many(feeds, Ts, t0)
            out = session.output_names[0]
            b = len(next(iter(feeds.values())))
            truth = labels[pos:pos + b] if labels is not None else None
            sums.append({"samples": b, "correct": {T: int((predictions(res[T][out]) == truth).sum())
                                                   if truth is not None else 0 for T in Ts}})
        pos += sums[-1]["samples"]
    return counter.totals, counter.samples, sums


def report_counts_ray(snn: str, data: str, Ts: Sequence[int], *, specs: Sequence[Any], address: str | None,
                      ann: str | None, label_key: str, batch_size: int, t0: int | None, t0_default: int,
                      threads: int | None, show_progress: bool) -> tuple[Any, int, dict[str, Any]]:
    """The spike counts (by T and layer), the samples counted and the accuracy part of
    ``analysis.report.report``, with the shards on Ray workers: the counts are sums of integers
    and the accuracies merge as in ``evaluate_ray``, so the report is that of one process."""
    from ..distributed import _gather, connect, open_labelled, submit
    from .evaluate import merge_sums

    ray = connect(address)
    n, labels = open_labelled(data, specs, label_key, "report data")
    Ts = sorted({int(T) for T in Ts})
    threads = threads or 1
    labels_ref = ray.put(labels)
    paths = [os.path.abspath(snn), os.path.abspath(data), os.path.abspath(ann) if ann else None]
    futures, sizes = submit(ray, report_shard, n, batch_size, threads,
                            lambda a, b: (*paths, labels_ref, a, b, batch_size, Ts, t0, threads))
    totals: dict[int, dict[str, np.ndarray]] = {}
    samples = 0
    sums: list[dict[str, Any]] = []

    def take(_: int, result: tuple[Any, int, list[Any]]) -> None:
        nonlocal samples
        shard_totals, shard_samples, shard_sums = result
        for T, by_layer in shard_totals.items():
            for name, v in by_layer.items():
                totals.setdefault(T, {}).setdefault(name, np.zeros_like(v))
                totals[T][name] += v
        samples += shard_samples
        sums.extend(shard_sums)

    _gather(ray, futures, sizes, "simulating", show_progress, take)
    t0_used = t0_default if t0 is None else int(t0)
    if ann is not None:
        acc = merge_sums(sums, Ts, labels is not None, t0_used)
    else:
        acc = {"samples": n, "ann_accuracy": None, "t0": t0_used,
               "snn": [{"T": T, "accuracy": sum(b["correct"][T] for b in sums) / n if labels is not None else None}
                       for T in Ts]}
    return totals, samples, acc
