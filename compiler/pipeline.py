"""The whole compiler, as one flat list of passes in the order they run.

Each pass takes the PassState and returns it; the last one emits the ONNX model. A pass
declares what it needs and what it guarantees; a failure names the pass and the passes
that ran before it. With ``dump_dir`` the graph is written after every pass.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ann2snn.passes.calibrate_thresholds import calibrate_thresholds
from ann2snn.passes.canonicalize_activations import canonicalize_activations
from ann2snn.passes.canonicalize_ops import canonicalize_ops
from ann2snn.passes.check_support import check_support
from ann2snn.passes.emit_spiking import emit_spiking
from ann2snn.passes.find_activations import find_activations
from ann2snn.passes.fold_batchnorm import fold_batchnorm
from ann2snn.passes.fix_input_sizes import fix_input_sizes
from ann2snn.passes.fold_constants import fold_constants
from ann2snn.passes.import_model import import_model
from ann2snn.passes.make_batch_dynamic import make_batch_dynamic
from ann2snn.passes.partition_graph import partition_graph
from ann2snn.passes.remove_identity import remove_identity
from ann2snn.passes.swap_maxpool import swap_maxpool

from .config import CompileConfig
from .errors import Ann2SnnError, PassError, UnsupportedModelError
from .modelio import save_model
from .state import PassState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pass:
    """A named pass with the properties it needs and the ones it guarantees afterwards."""

    name: str
    run: Callable[[PassState], Any]
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()


def _p(run: Callable[[PassState], Any], requires: str = "", provides: str = "") -> Pass:
    return Pass(run.__name__, run, frozenset(requires.split()), frozenset(provides.split()))


PIPELINE: list[Pass] = [
    # -- normalise: any exporter's output -> one canonical graph ----------------------
    _p(check_support, provides="supported"),
    _p(fix_input_sizes, requires="supported", provides="sample-sizes"),  # symbolic H x W: the calibration data's
    _p(remove_identity, requires="sample-sizes", provides="no-identity"),
    _p(canonicalize_ops, requires="no-identity", provides="canonical-ops"),
    _p(fold_constants, requires="canonical-ops", provides="constants-folded"),
    _p(make_batch_dynamic, requires="constants-folded", provides="dynamic-batch"),
    # written-out SiLU / HardSwish / GELU / LayerNorm / Softmax / Max(x, 0) -> one op each
    _p(canonicalize_activations, requires="dynamic-batch", provides="canonical-activations"),
    _p(fold_batchnorm, requires="canonical-activations", provides="no-batchnorm"),
    # -- the spiking structure ---------------------------------------------------------
    _p(find_activations, requires="no-batchnorm", provides="sites"),
    _p(swap_maxpool, requires="sites", provides="pre-neuron-pooling"),
    _p(partition_graph, requires="pre-neuron-pooling", provides="partition"),
    # -- calibration on a copy of the graph ---------------------------------------------
    _p(calibrate_thresholds, requires="partition", provides="thresholds"),
    # -- emission ------------------------------------------------------------------------
    _p(emit_spiking, requires="thresholds", provides="spiking-model"),
]


def run_pipeline(model: onnx.ModelProto, config: CompileConfig, calib: Any,
                 dump_dir: str | Path | None = None, stats: dict[str, Any] | None = None) -> onnx.ModelProto:
    """Run every pass of PIPELINE on ``model`` and return the spiking model.

    ``stats``, if given, receives per-pass timings, the partition, per-layer thresholds and
    calibration statistics (for ``--report``; none of it goes into the model, which stays
    byte-identical from run to run).
    """
    total = time.perf_counter()
    timings: dict[str, float] = {}
    state, result = _run_passes(model, config, calib, PIPELINE, dump_dir, timings)
    assert isinstance(result, onnx.ModelProto)
    if stats is not None:
        timings["total"] = time.perf_counter() - total
        stats.update(_statistics(state, timings))
    return result


def run_until(model: onnx.ModelProto, config: CompileConfig, calib: Any, last: str) -> PassState:
    """Run the passes of PIPELINE up to and including the one named ``last``; return the state
    (the graph with its sites, thresholds once calibration has run). For analyses that need the
    calibrated graph before emission (ann2snn.analysis.probe)."""
    names = [p.name for p in PIPELINE]
    if last not in names:
        raise PassError(f"no pass named '{last}'; the passes are {', '.join(names)}")
    state, _ = _run_passes(model, config, calib, PIPELINE[:names.index(last) + 1], None, {})
    return state


def _run_passes(model: onnx.ModelProto, config: CompileConfig, calib: Any, passes: list[Pass],
                dump_dir: str | Path | None, timings: dict[str, float]) -> tuple[PassState, Any]:
    start = time.perf_counter()
    state = import_model(model, config)
    timings["import_model"] = time.perf_counter() - start
    state.calib = calib
    have: set[str] = set()
    result: Any = state
    for i, p in enumerate(passes):
        missing = p.requires - have
        if missing:
            raise PassError(f"pass '{p.name}' needs {', '.join(sorted(missing))}, which no earlier pass provides")
        start = time.perf_counter()
        try:
            result = p.run(state)
        except Ann2SnnError:
            raise
        except Exception as exc:
            ran = ", ".join(state.history) or "none"
            raise PassError(f"pass '{p.name}' failed ({type(exc).__name__}: {exc}); passes run before it: {ran}. "
                            "This is a bug in ann2snn or an unusual model: please report it with the model") from exc
        if state.problems:
            raise UnsupportedModelError(state.problems)
        state.history.append(p.name)
        have |= p.provides
        timings[p.name] = time.perf_counter() - start
        log.debug("pass %s took %.3f s", p.name, timings[p.name])
        if dump_dir is not None and isinstance(result, PassState):
            from ann2snn.passes._graph import export

            save_model(export(state.graph.copy().cleanup().toposort(), state.opset),
                       Path(dump_dir) / f"{i:02d}_{p.name}.onnx")
    return state, result


def _statistics(state: PassState, timings: dict[str, float]) -> dict[str, Any]:
    layers = []
    for site in state.sites:
        theta = site.theta
        live = theta[theta > 0]
        layers.append({"layer": site.node, "units": int(np.prod(site.shape)), "thresholds": int(theta.size),
                       "min": float(live.min()) if live.size else 0.0, "max": float(theta.max()),
                       "mean": float(live.mean()) if live.size else 0.0, "dead": int((theta <= 0).sum()),
                       "mean_activation": float(site.mean_act.mean())})
    return {
        "partition": {"neuron_layers": len(state.sites), "neurons": sum(int(np.prod(s.shape)) for s in state.sites),
                      "spiking_nodes": len(state.spiking), "tail_nodes": list(state.tail),
                      "boundary": list(state.boundary), "cumulative_pools": list(state.varying_pools)},
        "thresholds": layers,
        "readout_t0": int(state.metadata.get("t0", 0)),
        "calibration": dict(state.metadata.get("calibration", {})),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
