"""The spiking runtime: the neuron ops and the stepper that runs compiled models."""
from __future__ import annotations

from .ops import (
    if_neuron_function,
    if_neuron_reference,
    signed_burst_if_neuron_function,
    signed_burst_if_neuron_reference,
    signed_if_neuron_function,
    signed_if_neuron_reference,
)
from .session import SpikingSession, window_start

__all__ = ["SpikingSession", "if_neuron_function", "if_neuron_reference", "signed_burst_if_neuron_function",
           "signed_burst_if_neuron_reference", "signed_if_neuron_function", "signed_if_neuron_reference",
           "window_start"]
