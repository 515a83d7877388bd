"""Remove Identity and inference-mode Dropout nodes."""
from __future__ import annotations


from ann2snn.state import PassState

from ._graph import replace_uses


def remove_identity(state: PassState) -> PassState:
    """Rewire the consumers of every Identity / Dropout output to its input."""
    graph = state.graph
    graph_inputs = {t.name for t in graph.inputs}
    for node in list(graph.nodes):
        if node.op not in ("Identity", "Dropout"):
            continue
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            continue  # the mask is used; check_support reports the node
        src, dst = node.inputs[0], node.outputs[0]
        if any(t is dst for t in graph.outputs):
            if src.name in graph_inputs or any(t is src for t in graph.outputs):
                continue  # nothing to rename onto: keep the node
            replace_uses(graph, dst, src)
            node.outputs.clear()
            name = dst.name
            dst.name = f"{name}__removed"
            src.name = name  # the graph output keeps its public name
        else:
            replace_uses(graph, dst, src)
            node.outputs.clear()
        node.inputs.clear()
        state.removed[node.name] = f"removed ({node.op} is a no-op at inference)"
    graph.cleanup().toposort()
    return state
