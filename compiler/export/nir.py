"""Export a compiled spiking model to NIR, the Neuromorphic Intermediate Representation.

``ann2snn export model.snn.onnx --to nir -o model.nir`` maps the step graph onto NIR nodes
(Input, Conv2d, Affine / Linear, AvgPool2d, Flatten, Scale, IF, Output) and edges. NIR sums
all edges that enter a node, so residual Adds become several edges into the consumer.

NIR cannot say everything an ann2snn model says. What it cannot express is written into the
node and graph metadata (keys ``ann2snn.*``) and is of two kinds:

- the neuron model, present in every export: ann2snn neurons reset by subtraction, start at
  ``v(0) = v0·θ`` and fire at ``v >= θ``; NIR's IF resets to ``v_reset``, starts at 0 and
  fires at ``v > v_threshold``. Exported as IF (r = 1, v_reset = 0) with the true rule,
  the initial membrane ``ann2snn.v_init`` and the readout window in metadata;
- graph parts NIR has no node for (max pooling, the analog tail): refused, unless the user
  accepts the approximation (``--allow-approximation``): max pooling then becomes an
  AvgPool2d placeholder of the same geometry and the tail is left out; metadata says so.

``nir`` is an optional dependency (``pip install nir``); nothing here imports it at module
load.

This module walks the step graph and writes the file; the handler of each op is in
:mod:`.nir_ops`, the graph under construction and its bookkeeping in :mod:`.nir_builder`.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ann2snn.runtime.compensation import STEP_COUNT, is_compensated
from ann2snn.runtime.ops import DOMAIN, IF_OP, SIGNED_SPIKE_OPS, SYMMETRIC_OPS

from ..errors import NodeProblem, PassError, UnsupportedModelError
from ..version import __version__
from .nir_builder import ALLOW_FLAG, META, NEURON_MODEL, NirBuilder, NirExportError, _require_nir
from .nir_ops import HANDLERS, _if_neuron

log = logging.getLogger(__name__)


class _Exporter(NirBuilder):
    """Walks the step graph in order, handing each node to its handler (:mod:`.nir_ops`)."""

    def convert(self):
        nir = self.nir
        g = self.model.graph
        for inp in g.input:
            if inp.name in self.state_in or inp.name in self.consts:
                continue
            shape = self.shapes.get(inp.name)
            if shape is None:
                raise UnsupportedModelError([NodeProblem(inp.name, "graph input", "has no static per-sample shape",
                                                  "re-compile a model with static input shapes")])
            key = self.add(inp.name, nir.Input(input_type={"input": np.array(shape)}), [],
                           onnx_input=inp.name, coding="direct: the analog input is fed unchanged at every step")
            self.src[inp.name] = [key]
            self.static.add(inp.name)
        broken: set[str] = set()
        counter = {STEP_COUNT}  # the compensated ops' step counter: reported through the ops that read it
        for node in g.node:
            if not is_compensated(node) and any(x in counter for x in node.input):
                counter.update(node.output)
                continue
            handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if node.domain == DOMAIN and node.op_type == IF_OP:
                handler = _if_neuron
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = onnx.helper.get_attribute_value(node.attribute[0])
                self.consts[node.output[0]] = (numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto)
                                               else np.asarray(value))
                continue
            if any(x in broken for x in node.input):  # downstream of a reported node: not reported again
                broken.update(node.output)
                continue
            if is_compensated(node):
                self.problem(node, "is an expectation-compensated op (a signed activation site, or --nonlinear "
                             "compensate), which NIR cannot express (it keeps running sums and emits increments)",
                             "re-compile the model with '--signed-sites off --nonlinear analog' (the op and everything "
                             "after it then run in the analog tail) to export it to NIR")
                broken.update(node.output)
                continue
            if node.domain == DOMAIN and node.op_type in SYMMETRIC_OPS:
                current = any(n.get("site") == "current" and n["node"] == node.name
                              for n in self.meta.get("neurons", []))
                self.problem(node, "is the symmetric signed-spike neuron of " + (
                    "a re-spiked current (--respike-currents)" if current else
                    "a signed activation site or of a re-spiked compensated op") +
                    ", which NIR cannot express (its IF neuron fires 0/1 spikes only)",
                    "re-compile the model with '--no-respike-currents' to export it to NIR" if current else
                    "re-compile the model with '--signed-sites off --nonlinear analog' (the activation and "
                    "everything after it then run in the analog tail) to export it to NIR")
                broken.update(node.output)
                continue
            if node.domain == DOMAIN and node.op_type in SIGNED_SPIKE_OPS:
                self.problem(node, "is a signed-spike neuron, which NIR cannot express (its IF neuron fires 0/1 "
                             "spikes only)", "re-compile the model with '--neuron if' to export it to NIR")
                broken.update(node.output)
                continue
            if handler is None:
                self.problem(node, "has no NIR equivalent")
            elif not any(x in self.src for x in node.input):
                self.problem(node, "has no input computed from the model's inputs")
            else:
                handler(self, node)
            broken.update(o for o in node.output if o and o not in self.src and o not in self.state_out)
        self._tail()
        for name in self.meta["step_outputs"]:
            if name not in self.src:
                continue  # the node producing it was reported above
            shape = self.shapes.get(name)
            self.add(name, nir.Output(output_type={"output": np.array(shape)}), self.src[name], onnx_output=name,
                     readout=f"mean over steps [t0, T) with t0 = {self.meta['readout']['t0']} (the last "
                             f"{self.meta['readout'].get('min_window', 4)} steps when T < t0 + "
                             f"{self.meta['readout'].get('min_window', 4)})")
        if self.unsupported:
            raise UnsupportedModelError(self.unsupported, header=f"the model has {len(self.unsupported)} node(s) "
                                        "that NIR cannot represent")
        if self.approximate and not self.allow:
            raise NirExportError(self.approximate, header=f"{len(self.approximate)} part(s) of the model cannot be "
                                 f"exported to NIR faithfully; pass {ALLOW_FLAG} to accept the approximations below")
        try:
            return nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata=self._graph_metadata())
        except (ValueError, AssertionError) as exc:  # nir's own type check: a bug of this exporter
            raise PassError(f"the nir package rejected the exported graph ({exc}); please report this with the "
                            "model") from None

    def _tail(self) -> None:
        tail = self.meta.get("tail")
        if tail:
            self.approx(f"{tail['domain']}::{tail['function']}", "analog tail",
                        f"is the analog tail ({len(tail['nodes'])} node(s), run once on the readout), which NIR "
                        "cannot hold", f"the spiking part only, ending at {', '.join(tail['inputs'])}; "
                        "run the tail on the readout yourself")

    def _graph_metadata(self) -> dict[str, Any]:
        tail = self.meta.get("tail")
        return {
            f"{META}version": __version__,
            f"{META}format": 1,
            f"{META}neuron_model": NEURON_MODEL,
            f"{META}dt": 1.0,
            f"{META}time": "discrete: one NIR time unit is one ann2snn step; simulate with dt = 1 (forward Euler "
                           "v += dt * r * I then reproduces v += I)",
            f"{META}coding": "direct: the analog input is fed unchanged at every step",
            f"{META}readout_t0": int(self.meta["readout"]["t0"]),
            f"{META}readout": "the answer is the mean of each Output over steps [t0, T) (the last "
                              f"{self.meta['readout'].get('min_window', 4)} steps when T < t0 + "
                              f"{self.meta['readout'].get('min_window', 4)}), not its value at one step",
            f"{META}step_outputs": json.dumps(self.meta["step_outputs"]),
            f"{META}outputs": json.dumps(self.meta["outputs"]),
            f"{META}tail": json.dumps(tail, sort_keys=True) if tail else "",
            f"{META}lost": json.dumps(LOST),
            f"{META}approximations": json.dumps(self.approximations),
            f"{META}config": json.dumps(self.meta.get("config", {}), sort_keys=True),
        }


#: what every NIR export loses or changes (also written to the graph metadata, key ann2snn.lost)
LOST = [
    ("reset: ann2snn neurons reset by subtraction (v -= v_threshold); NIR's IF resets to v_reset (written as 0). "
     "The true rule is in each IF node's metadata (ann2snn.reset)."),
    ("initial membrane: ann2snn starts at v(0) = v0 * v_threshold (v0 = 0.5 by default); NIR's IF has no initial "
     "state. The values are in each IF node's metadata (ann2snn.v_init, ann2snn.v_init_fraction)."),
    "firing condition: ann2snn fires at v >= v_threshold, NIR's IF at v > v_threshold.",
    ("time: NIR is continuous-time (dv/dt = r * I); the export sets r = 1 and means one time unit per ann2snn step "
     "(dt = 1, graph metadata ann2snn.dt)."),
    ("readout: the answer is the mean of the outputs over steps [t0, T); NIR has no readout: t0 is in the graph "
     "metadata (ann2snn.readout_t0)."),
    ("max pooling: NIR has no max pooling; with --allow-approximation each MaxPool becomes an AvgPool2d "
     "placeholder of the same geometry, marked in its metadata (ann2snn.placeholder_for, ann2snn.maxpool_mode)."),
    ("grouped and depthwise convolutions are written as their dense block-diagonal Conv2d (groups = 1), the "
     "original group count in metadata (ann2snn.groups): nir 1.0.8 cannot read a grouped Conv2d back."),
    ("constant Sub / Add / Mul / Div (input normalisation, spike values before residual adds) become Scale, or a "
     "diagonal 1x1 Conv2d / diagonal Affine where a bias is needed; x / c becomes x * (1 / c)."),
    ("analog tail: NIR cannot hold it; with --allow-approximation only the spiking part is exported and the tail is "
     "described in the graph metadata (ann2snn.tail)."),
]


def to_nir(model, allow_approximation: bool = False):
    """The ``nir.NIRGraph`` of a compiled spiking model (a path, bytes or ModelProto).

    Raises ``UnsupportedModelError`` for nodes NIR cannot represent at all and
    ``NirExportError`` for parts it can only approximate, unless ``allow_approximation``.
    """
    from ..modelio import load_model

    ex = _Exporter(load_model(model), allow_approximation)
    graph = ex.convert()
    for note in ex.approximations:
        log.warning("NIR export approximates %s", note)
    return graph


def export_nir(model, output: str | Path, allow_approximation: bool = False):
    """Write ``model`` (a compiled spiking model) as a NIR file, atomically; returns the graph."""
    from ..modelio import write_atomic

    nir = _require_nir()
    graph = to_nir(model, allow_approximation)
    buf = io.BytesIO()
    nir.write(buf, graph)
    write_atomic(output, buf.getvalue())
    return graph


__all__ = ["ALLOW_FLAG", "LOST", "NirExportError", "export_nir", "to_nir"]
