"""Report every node the compiler cannot convert, all at once, before any work is done."""
from __future__ import annotations

from ann2snn.errors import NodeProblem, UnsupportedModelError
from ann2snn.state import PassState
from ann2snn.support import REJECTED, reject_reason, role


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
    if problems:
        raise UnsupportedModelError(problems)
    return state
