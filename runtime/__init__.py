"""The spiking runtime: the semantics of a compiled model, and faster forms derived from it.

The semantics (what a compiled model computes):

- ``ops.py``: the neuron ops (IFNeuron, SignedIFNeuron, SignedBurstIFNeuron, and the symmetric
  neurons of signed sites: SymmetricIFNeuron, SymmetricBurstIFNeuron and their unit-θ forms) as ONNX
  functions, with numpy references;
- ``reference.py``: the step graph run as written, one onnxruntime call per step, and the
  readout window. Its docstring states the invariant every derived form keeps: the
  reference's step outputs and states, to ``reference.RTOL``.

Derived from the step graph at load time, each keeping that invariant:

- ``forms.py``: the time-constant prefix run once, the step form with bound state buffers,
  and the layered form (several timesteps per call, layer by layer);
- ``unitform.py``: IF neurons in units of their thresholds (also used by the compiler);
- ``kernels/``: the optional compiled neuron ops (``make kernels``), swapped into the forms
  at load time when built, with the functions' arithmetic bit for bit;
- ``session.py``: ``SpikingSession``, which picks a form by a fixed rule and guards it
  against the reference before first use.

Around them, ``batches.py`` runs a whole data file (arrays or images) batch by batch, as
``ann2snn run`` does.

The tests in tests/runtime/ check the invariant (test_forms.py: every form against the
reference on generated graphs, the reference models and the regression files).
"""
from __future__ import annotations

import ann2snn.ortsession  # noqa: F401  (quiets onnxruntime's own logging before any session)

from .ops import (
    if_neuron_function,
    if_neuron_reference,
    signed_burst_if_neuron_function,
    signed_burst_if_neuron_reference,
    signed_if_neuron_function,
    signed_if_neuron_reference,
)
from .reference import window_start
from .session import SpikingSession

__all__ = ["SpikingSession", "if_neuron_function", "if_neuron_reference", "signed_burst_if_neuron_function",
           "signed_burst_if_neuron_reference", "signed_if_neuron_function", "signed_if_neuron_reference",
           "window_start"]
