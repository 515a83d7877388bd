"""Report every node the compiler cannot convert, all at once, before any work is done."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ann2snn.errors import ModelLoadError, NodeProblem, UnsupportedModelError
from ann2snn.ortsession import make_session
from ann2snn.state import PassState
from ann2snn.support import REJECTED, reject_reason, role

from ._graph import const_value, export, restore_output_types


def check_support(state: PassState) -> PassState:
    """Raise UnsupportedModelError listing every rejected node (see ann2snn.support)."""
    problems = []
    for node in state.graph.nodes:
        domain = node.domain or ""
        if role(node.op, domain) == REJECTED:
            problem, remedy = reject_reason(node.op, domain)
            problems.append(NodeProblem(node.name, f"{domain or 'ai.onnx'}::{node.op}", problem, remedy))
        elif node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            problems.append(NodeProblem(node.name, "ai.onnx::Dropout", "has its mask output used, which only exists in training",
                                        "export the model in eval mode (model.eval() before torch.onnx.export)"))
        elif _training_mode(node):
            problems.append(NodeProblem(
                node.name, f"ai.onnx::{node.op}",
                "is in training mode (" + ("drops random units" if node.op == "Dropout" else
                                           "normalises with the batch's own statistics") +
                "), so the network's output depends on more than its input",
                "export the model in eval mode (model.eval() before torch.onnx.export, training=False in Keras)"))
    if problems:
        raise UnsupportedModelError(problems)
    _check_runs(state)
    return state


def _training_mode(node: gs.Node) -> bool:
    """A Dropout whose training_mode input is a constant true, or a BatchNormalization with training_mode=1."""
    if node.op == "BatchNormalization":
        return bool(node.attrs.get("training_mode", 0)) or len(node.outputs) > 1 and any(t.outputs for t in node.outputs[1:])
    if node.op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
        value = const_value(node.inputs[2])
        return value is None or bool(np.asarray(value).reshape(-1)[0])
    return False


def _check_runs(state: PassState) -> None:
    """The ANN itself must load in onnxruntime, or nothing later can run it."""
    try:
        model = restore_output_types(export(state.graph.copy(), state.opset, state.ir_version), state.output_types)
        make_session(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"onnxruntime cannot load the model: {first}; check that the model runs in "
                             "onnxruntime before converting it") from None
