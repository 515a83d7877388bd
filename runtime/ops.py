"""The integrate-and-fire neuron as an ONNX model-local function.

``ann2snn::IFNeuron(current, v, threshold) -> (spikes, v_next)``:
``v' = v + current``; ``spikes = (v' >= threshold)`` as 0/1 floats; ``v_next = v' - threshold * spikes``
(reset by subtraction). Because it is a FunctionProto inside the model, stock
onnxruntime inlines and runs it; no compiled extension is needed.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "ann2snn"
IF_OP = "IFNeuron"
#: the threshold given to channels that never activated during calibration: they never fire
DEAD_THRESHOLD = 1e30


def if_neuron_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of IFNeuron for a model whose ai.onnx opset is ``opset`` (>= 13)."""
    nodes = [
        helper.make_node("Add", ["v", "current"], ["v_charged"], name="integrate"),
        helper.make_node("GreaterOrEqual", ["v_charged", "threshold"], ["fire"], name="compare"),
        helper.make_node("Cast", ["fire"], ["spikes"], to=TensorProto.FLOAT, name="to_spikes"),
        helper.make_node("Mul", ["spikes", "threshold"], ["discharge"], name="discharge"),
        helper.make_node("Sub", ["v_charged", "discharge"], ["v_next"], name="reset_by_subtraction"),
    ]
    return helper.make_function(
        DOMAIN, IF_OP, ["current", "v", "threshold"], ["spikes", "v_next"], nodes,
        [helper.make_opsetid("", opset)],
        doc_string="Integrate-and-fire neuron with reset by subtraction; spikes are 0/1.",
    )


def if_neuron_reference(current: np.ndarray, v: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of one IFNeuron step: (spikes, v_next)."""
    charged = (v + current).astype(np.float32)
    spikes = (charged >= threshold).astype(np.float32)
    return spikes, (charged - spikes * threshold).astype(np.float32)
