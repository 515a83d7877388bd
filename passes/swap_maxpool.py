"""Pre-neuron max pooling: ReLU -> MaxPool becomes MaxPool -> ReLU.

max(ReLU(z)) = ReLU(max(z)) (and the same for Clip), so the swap is exact in the ANN;
in the SNN the neuron then integrates the pooled current instead of max-pooling spikes. The
same holds for every non-decreasing activation (LeakyReLU, PReLU with slopes >= 0), not for
SiLU, GELU or HardSwish, which dip below 0: at those signed sites the pool stays after the
neuron (and pools the running sums of its spikes, ``--maxpool cumulative``).
"""
from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from ann2snn.state import PassState

from ._graph import const_value, node_map, unique_name

log = logging.getLogger(__name__)


def _non_decreasing(act: gs.Node) -> bool:
    """Whether the activation commutes with max: ReLU, Clip, LeakyReLU / PReLU with slopes >= 0."""
    if act.op in ("Relu", "Clip"):
        return True
    if act.op == "LeakyRelu" and not act.domain:
        return float(act.attrs.get("alpha", 0.01)) >= 0
    if act.op == "PRelu" and not act.domain and len(act.inputs) > 1:
        slope = const_value(act.inputs[1])
        return slope is not None and bool((slope >= 0).all())
    return False


def swap_maxpool(state: PassState) -> PassState:
    """Move every MaxPool that is the only consumer of an activation in front of it."""
    graph = state.graph
    nodes = node_map(graph)
    taken = set(graph.tensors())
    for site in state.sites:
        if not _non_decreasing(nodes[site.node]):
            continue
        while True:
            act = nodes[site.node]
            post = act.outputs[0]
            if len(post.outputs) != 1 or any(t is post for t in graph.outputs):
                break
            pool = post.outputs[0]
            if pool.op != "MaxPool" or (len(pool.outputs) > 1 and pool.outputs[1].outputs):
                break
            if pool.outputs[0].shape is None:
                break
            z = act.inputs[0]
            pooled_out = pool.outputs[0]
            pooled_pre = gs.Variable(unique_name(taken, f"{pool.name}/pre"), dtype=z.dtype, shape=pooled_out.shape)
            pool.inputs[0] = z
            pool.outputs = [pooled_pre]
            act.inputs[0] = pooled_pre
            act.outputs = [pooled_out]
            post.inputs.clear()
            site.pre, site.post = pooled_pre.name, pooled_out.name
            site.shape = tuple(int(d) for d in pooled_out.shape[1:])
            log.debug("pre-neuron max pooling: %s now before %s", pool.name, act.name)
    graph.cleanup().toposort()
    return state
