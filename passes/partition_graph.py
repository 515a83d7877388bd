"""Split the graph into the spiking part and the analog tail.

A tensor is *time-varying* once it depends on a neuron's spikes. A time-varying node must
be affine (see ``ann2snn.support``) to stay in the spiking part; the first one that is not
starts the analog tail, which holds it and everything downstream and runs once on the
readout. Nodes whose inputs are constant in time (the analog prefix, e.g. input
normalisation) may be any op. A MaxPool that feeds a neuron integrates the pooled
current (pre-neuron max pooling: exact while the current is constant in time, an
approximation deeper in the network). An activation whose output reaches no weighted layer
(Conv, Gemm, MatMul) inside the spiking part stays an analog op in the tail: the output
layer is never a neuron.
"""
from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from ann2snn.errors import NodeProblem, UnsupportedModelError
from ann2snn.state import PassState
from ann2snn.support import AFFINE, PREPOOL, role

log = logging.getLogger(__name__)

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _feeds_neuron(node: gs.Node, neuron_nodes: set[str]) -> bool:
    """A MaxPool placed in front of a neuron by swap_maxpool (pre-neuron max pooling)."""
    if role(node.op, node.domain or "") != PREPOOL or len(node.outputs[0].outputs) != 1:
        return False
    return node.outputs[0].outputs[0].name in neuron_nodes


def _classify(graph: gs.Graph, neuron_nodes: set[str]) -> tuple[set[str], set[str]]:
    """(time-varying non-tail node names, tail node names) for a set of neuron nodes."""
    varying: set[str] = set()  # tensor names
    spiking: set[str] = set()
    tail: set[str] = set()
    tail_tensors: set[str] = set()
    for node in graph.nodes:  # topological order
        in_names = [t.name for t in node.inputs if t.name]
        if node.name in neuron_nodes and not any(n in tail_tensors for n in in_names):
            spiking.add(node.name)
            varying.update(t.name for t in node.outputs)
            continue
        if any(n in tail_tensors for n in in_names):
            tail.add(node.name)
            tail_tensors.update(t.name for t in node.outputs)
            continue
        if not any(n in varying for n in in_names):
            continue  # analog prefix
        if role(node.op, node.domain or "") == AFFINE or _feeds_neuron(node, neuron_nodes):
            spiking.add(node.name)
            varying.update(t.name for t in node.outputs)
        else:
            tail.add(node.name)
            tail_tensors.update(t.name for t in node.outputs)
    return spiking, tail


def _reaches_weight(graph: gs.Graph, start: gs.Node, spiking: set[str]) -> bool:
    """Whether a weighted node inside the spiking part lies downstream of ``start``."""
    stack = [c for t in start.outputs for c in t.outputs]
    seen: set[str] = set()
    while stack:
        node = stack.pop()
        if node.name in seen or node.name not in spiking:
            continue
        seen.add(node.name)
        if node.op in WEIGHTED:
            return True
        stack.extend(c for t in node.outputs for c in t.outputs)
    return False


def partition_graph(state: PassState) -> PassState:
    """Decide which sites become neurons, which nodes form the tail, and the boundary tensors."""
    graph = state.graph
    nodes = {n.name: n for n in graph.nodes}
    neurons = {s.node for s in state.sites}
    while True:
        spiking, tail = _classify(graph, neurons)
        keep = {n for n in neurons if n in spiking and _reaches_weight(graph, nodes[n], spiking)}
        if keep == neurons:
            break
        neurons = keep
    analog_sites = [s for s in state.sites if s.node not in neurons]
    # non-affine nodes that consume spikes while neurons wait downstream end the spiking part early
    breaking = [nodes[n] for n in sorted(tail) if any(
        t.inputs and t.inputs[0].name not in tail for t in nodes[n].inputs if t.name)]
    lost = [s for s in analog_sites if s.node in tail and any(
        c.op in WEIGHTED for c in nodes[s.node].outputs[0].outputs)]
    if lost:
        problems = [NodeProblem(n.name, f"{n.domain or 'ai.onnx'}::{n.op}",
                                "is not spike-compatible inside the spiking region",
                                "pass --spiking-until <tensor> to end the spiking part before it, or replace the op")
                    for n in breaking]
        if state.config.strict:
            raise UnsupportedModelError(problems, header=f"{len(problems)} node(s) would end the spiking part early "
                                                         f"and leave {len(lost)} activation(s) analog")
        log.warning("the spiking part ends at %s; %d activation(s) after it stay analog (use --strict to make this an error)",
                    ", ".join(f"'{n.name}' ({n.op})" for n in breaking), len(lost))
    state.sites = [s for s in state.sites if s.node in neurons]
    state.tail = [n.name for n in graph.nodes if n.name in tail or n.name in {s.node for s in analog_sites}]
    tail_set = set(state.tail)
    boundary: list[str] = []
    for node in graph.nodes:
        if node.name not in tail_set:
            continue
        for t in node.inputs:
            if t.name and not isinstance(t, gs.Constant) and (not t.inputs or t.inputs[0].name not in tail_set):
                if t.name not in boundary:
                    boundary.append(t.name)
    for t in graph.outputs:
        if (not t.inputs or t.inputs[0].name not in tail_set) and t.name not in boundary:
            boundary.append(t.name)
    state.boundary = boundary
    # pre-neuron max pools whose current varies in time (deeper than the first layer)
    state.varying_pools = [n.name for n in graph.nodes if n.name in spiking and n.op == "MaxPool"
                           and _feeds_neuron(n, neurons)
                           and any(t.inputs and t.inputs[0].name in spiking for t in n.inputs)]
    log.info("%d neuron layer(s), %d tail node(s), boundary: %s", len(state.sites), len(state.tail), ", ".join(boundary))
    return state
