"""What the passes hand to each other: the graph and the annotations on it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .config import CompileConfig
from .errors import NodeProblem


@dataclass
class Site:
    """An activation site: a ReLU / Clip(0, c) that becomes an IF neuron.

    ``pre`` is the tensor the neuron integrates (the pre-activation current), ``post`` the
    activation's output (after emission: the spike tensor). ``theta`` holds one threshold
    per channel (or one per layer) once calibration has run; ``mean_act`` the mean
    ReLU(pre) per neuron (shape ``shape``) over the calibration data (for the readout delay).

    ``kind`` says which neuron: ``relu`` (the IF / signed neuron of ``--neuron`` on ``pre``), or
    a signed site (docs/signed_activations.md) with a symmetric signed neuron: ``output`` (the
    node applied with expectation compensation to its time-varying inputs, at the positions
    ``varying``, and the neuron on its output ``post``) or ``input`` (the neuron on ``pre``, the
    node compensated on its spikes) or ``current`` (``--respike-currents``: the node is a weighted
    op reading another weighted op's current ``pre``; the neuron on that input, nothing
    compensated). For signed sites θ is calibrated on |value| and ``mean_act`` is the mean |value|.
    """

    node: str
    pre: str
    post: str
    cap: float | None
    channel_axis: int = 1
    shape: tuple[int, ...] = ()
    theta: np.ndarray | None = None
    mean_act: np.ndarray | None = None
    kind: str = "relu"
    varying: tuple[int, ...] = (0,)

    @property
    def signed(self) -> bool:
        """Whether the site is a signed site (a symmetric signed neuron, the op compensated)."""
        return self.kind != "relu"

    @property
    def probe(self) -> str:
        """The tensor the neuron integrates in the ANN: the node's input, or its output for ``output``."""
        return self.post if self.kind == "output" else self.pre

    def theta_shape(self, granularity: str) -> tuple[int, ...]:
        """Shape of the threshold tensor, broadcastable against ``[N, *shape]``."""
        rank = len(self.shape) + 1
        dims = [1] * rank
        if granularity == "channel":
            dims[self.channel_axis] = self.shape[self.channel_axis - 1]
        return tuple(dims)


@dataclass
class PassState:
    """The graph being compiled, its annotations, and what has run so far."""

    graph: gs.Graph
    config: CompileConfig
    calib: Any = None
    sites: list[Site] = field(default_factory=list)
    #: names of the nodes of the analog tail (run once on the readout)
    tail: list[str] = field(default_factory=list)
    #: tensors at the spiking -> analog boundary, read out by the runtime
    boundary: list[str] = field(default_factory=list)
    #: MaxPool nodes in the spiking part whose input varies in time (cumulative pooling)
    varying_pools: list[str] = field(default_factory=list)
    #: nonlinear nodes kept in the spiking part by expectation compensation (--nonlinear
    #: compensate): node name -> positions of its time-varying inputs
    compensated: dict[str, list[int]] = field(default_factory=dict)
    #: nodes of the spiking part that are not neurons (affine ops on spikes, pooling)
    spiking: list[str] = field(default_factory=list)
    #: nodes a pass could not handle; the pipeline stops with all of them after that pass
    problems: list[NodeProblem] = field(default_factory=list)
    #: what happened to nodes that normalisation removed: node name -> note
    removed: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    opset: int = 13
    #: the exported model's graph outputs (gs keeps only tensor types; a ZipMap's is a sequence)
    output_types: dict[str, bytes] = field(default_factory=dict)
    #: opsets of the other standard domains the model imports (e.g. ai.onnx.ml)
    other_opsets: dict[str, int] = field(default_factory=dict)
    ir_version: int = 8
    producer: str = ""

    def site_by_node(self) -> dict[str, Site]:
        """Sites keyed by their node name."""
        return {s.node: s for s in self.sites}
