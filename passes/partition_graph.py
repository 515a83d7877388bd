"""Split the graph into the spiking part and the analog tail.

A tensor is *time-varying* once it depends on a neuron's spikes. A time-varying node must
be affine in its time-varying inputs (see ``ann2snn.support``) to stay in the spiking part;
the first one that is not starts the analog tail, which holds it and everything downstream
and runs once on the readout. Nodes whose inputs are constant in time (the analog prefix,
e.g. input normalisation) may be any op. MaxPool on a time-varying signal stays in the
spiking part as cumulative pooling (``--maxpool cumulative``), or only in front of a neuron
(``instant``, the paper's pre-neuron rule). An activation whose output reaches no weighted
layer (Conv, Gemm, MatMul) inside the spiking part stays an analog op in the tail: the
output layer is never a neuron. ``--spiking-until T`` sends the consumers of tensor T,
and everything after them, to the tail.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ann2snn.errors import ConfigError, NodeProblem, UnsupportedModelError
from ann2snn.macs import WEIGHTED, node_macs, step_signals
from ann2snn.state import PassState, Site
from ann2snn.support import NEGATIVE_SLOPE, PREPOOL, compensable, role, spike_safe

from ._graph import channel_axis, static_shape

log = logging.getLogger(__name__)

#: ops that read only the shape of their input, never its values (tf2onnx's Tensordot reshapes)
SHAPE_ONLY = ("Shape", "Size")


def _feeds_neuron(node: gs.Node, neuron_nodes: set[str]) -> bool:
    """A MaxPool placed in front of a neuron by swap_maxpool (pre-neuron max pooling)."""
    if role(node.op, node.domain or "") != PREPOOL or len(node.outputs[0].outputs) != 1:
        return False
    return node.outputs[0].outputs[0].name in neuron_nodes


def _classify(graph: gs.Graph, neuron_nodes: set[str], cumulative: bool,
              cut: set[str], compensate: frozenset[str] = frozenset()) -> tuple[set[str], set[str]]:
    """(spiking node names, tail node names) for a set of neuron nodes.

    ``cut`` holds tensors whose consumers are forced into the tail (--spiking-until);
    ``compensate`` the nonlinear nodes that may stay spiking by expectation compensation.
    """
    varying: set[str] = set()  # tensor names
    spiking: set[str] = set()
    tail: set[str] = set()
    tail_tensors: set[str] = set()
    for node in graph.nodes:  # topological order
        in_names = [t.name for t in node.inputs if t.name]
        if any(n in tail_tensors or n in cut for n in in_names):
            tail.add(node.name)
            tail_tensors.update(t.name for t in node.outputs)
            continue
        if node.name in neuron_nodes:
            spiking.add(node.name)
            varying.update(t.name for t in node.outputs)
            continue
        mask = [bool(t.name) and t.name in varying for t in node.inputs]
        if not any(mask) or (node.op in SHAPE_ONLY and not node.domain):
            continue  # analog prefix (the shape of a time-varying tensor is constant in time)
        domain = node.domain or ""
        pool = role(node.op, domain) == PREPOOL and (cumulative or _feeds_neuron(node, neuron_nodes))
        if pool or spike_safe(node.op, domain, mask) or node.name in compensate:
            spiking.add(node.name)
            varying.update(t.name for t in node.outputs)
        else:
            tail.add(node.name)
            tail_tensors.update(t.name for t in node.outputs)
    return spiking, tail


def _reaches_weight(graph: gs.Graph, start: gs.Node, spiking: set[str], stop: set[str] | frozenset[str] = frozenset()
                    ) -> bool:
    """Whether a weighted node inside the spiking part lies downstream of ``start`` (not through
    the nodes named in ``stop``)."""
    stack = [c for t in start.outputs for c in t.outputs]
    seen: set[str] = set()
    while stack:
        node = stack.pop()
        if node.name in seen or node.name not in spiking or node.name in stop:
            continue
        seen.add(node.name)
        if node.op in WEIGHTED:
            return True
        stack.extend(c for t in node.outputs for c in t.outputs)
    return False


def _settle(graph: gs.Graph, nodes: dict[str, gs.Node], neurons: set[str], cumulative: bool,
            cut: set[str], compensate: frozenset[str] = frozenset()) -> tuple[set[str], set[str], set[str]]:
    """(neurons, spiking, tail) once every neuron and every compensated op left has a weighted
    layer after it (a compensated op with none after it gains nothing over the tail)."""
    while True:
        spiking, tail = _classify(graph, neurons, cumulative, cut, compensate)
        keep = {n for n in neurons if n in spiking and _reaches_weight(graph, nodes[n], spiking)}
        kept = frozenset(n for n in compensate if n not in spiking or _reaches_weight(graph, nodes[n], spiking))
        if keep == neurons and kept == compensate:
            return neurons, spiking, tail
        neurons, compensate = keep, kept


def _ancestors(node: gs.Node) -> set[str]:
    """Names of the nodes upstream of ``node``."""
    seen: set[str] = set()
    stack = [t.inputs[0] for t in node.inputs if t.inputs]
    while stack:
        n = stack.pop()
        if n.name not in seen:
            seen.add(n.name)
            stack.extend(t.inputs[0] for t in n.inputs if t.inputs)
    return seen


def _extend_prefix(graph: gs.Graph, nodes: dict[str, gs.Node], sites: set[str], cumulative: bool,
                   cut: set[str], compensate: frozenset[str] = frozenset()
                   ) -> tuple[set[str], set[str], set[str], dict[str, str]]:
    """The partition (neurons, spiking, tail) and, per node moved into the prefix, why.

    An op that is not correct on spikes (LRN behind AlexNet's and GoogLeNet's first
    convolutions) would end the spiking part right there. Instead, the activations upstream
    of it may stay analog, so that its input is constant in time (direct coding) and it runs
    exactly in the analog prefix; the spiking part starts after it. This is done only where
    it leaves more MACs taking spikes as input than ending the spiking part at the op.
    """
    best = _settle(graph, nodes, sites, cumulative, cut, compensate)
    score = _mac_share(graph, *best)["spiking"]
    moved: list[gs.Node] = []
    chosen: list[gs.Node] = []
    while True:  # follow the chain of such ops from the inputs on; keep the best cut
        spiking, tail = _classify(graph, sites, cumulative, cut, compensate)
        node = next((n for n in graph.nodes if n.name in tail and n.name not in sites
                     and not any(t.name in cut for t in n.inputs)
                     and any(t.inputs and t.inputs[0].name in spiking for t in n.inputs)), None)
        if node is None:
            break
        sites = sites - _ancestors(node)  # not empty: a spiking input has a neuron upstream
        moved.append(node)
        trial = _settle(graph, nodes, sites, cumulative, cut, compensate)
        if _mac_share(graph, *trial)["spiking"] > score:
            best, score, chosen = trial, _mac_share(graph, *trial)["spiking"], list(moved)
    notes: dict[str, str] = {}
    for node in chosen:
        why = (f"analog prefix up to '{node.name}' ({node.op}, not correct on spikes): computed once per input, "
               "so that more MACs spike than if the spiking part ended there")
        for name in sorted(_ancestors(node) | {node.name}):
            if name not in best[1] and name not in best[2]:
                notes.setdefault(name, why)
    return best[0], best[1], best[2], notes


def _cut_tensors(state: PassState) -> set[str]:
    """The --spiking-until tensors, checked against the graph."""
    names = set(state.graph.tensors())
    missing = [t for t in state.config.spiking_until if t not in names]
    if missing:
        raise UnsupportedModelError([], header=(
            f"--spiking-until names tensor(s) {', '.join(repr(m) for m in missing)} that the normalised graph does not "
            "have (folding may have removed them); run `ann2snn inspect model.onnx` to list the tensors"))
    return set(state.config.spiking_until)


def _after_sites(node: gs.Node, analog_sites: set[str], short: bool = False) -> str:
    """' (after activation 'Relu_4')' when ``node`` reads an activation that stayed analog."""
    sites = [t.inputs[0].name for t in node.inputs if t.inputs and t.inputs[0].name in analog_sites]
    if not sites:
        return ""
    names = ", ".join(f"'{n}'" for n in sites)
    return f", after activation {names}" if short else f" (it reads activation {names}, which therefore stays analog)"


def partition_graph(state: PassState) -> PassState:
    """Decide which sites become neurons, which nodes form the tail, and the boundary tensors."""
    graph = state.graph
    nodes = {n.name: n for n in graph.nodes}
    cumulative = state.config.maxpool == "cumulative"
    cut = _cut_tensors(state)
    why_not: dict[str, str] = {}
    candidates = _compensation_candidates(graph, why_not) if state.config.nonlinear == "compensate" else frozenset()
    state.metadata["not_compensated"] = why_not
    neurons, spiking, tail, notes = _extend_prefix(graph, nodes, {s.node for s in state.sites}, cumulative, cut,
                                                   candidates)
    state.compensated = _compensated(graph, spiking, neurons, candidates)
    respiked = _respike(state, spiking, neurons) if state.config.respike else []
    state.metadata["prefix_notes"] = notes
    analog_sites = {s.node for s in state.sites if s.node not in neurons}
    # nodes that end the spiking part: tail nodes fed by the spiking part, directly or through
    # an activation that stayed analog because of them
    feeders = spiking | analog_sites
    breaking = [n for n in graph.nodes if n.name in tail and n.name not in analog_sites
                and any(t.inputs and t.inputs[0].name in feeders for t in n.inputs)]
    # activations with weights after them that did not become neurons
    everywhere = set(nodes)
    lost = [s for s in state.sites if s.node in analog_sites and s.node not in notes
            and _reaches_weight(graph, nodes[s.node], everywhere)]
    moved = sorted({why.split("'")[1] for why in notes.values()}, key=list(nodes).index)
    if moved:
        log.warning("%s not correct on spikes and sit(s) behind the first layers: the layers up to %s run in the "
                    "analog prefix, once per input (activations %s stay analog), and the spiking part starts after "
                    "%s; `ann2snn inspect` marks them", ", ".join(f"'{n}' ({nodes[n].op})" for n in moved),
                    "them" if len(moved) > 1 else "it",
                    ", ".join(f"'{s.node}'" for s in state.sites if s.node in notes),
                    "them" if len(moved) > 1 else "it")
    if lost and not cut:
        slopes = [n for n in breaking if n.op in NEGATIVE_SLOPE]
        if slopes:
            raise UnsupportedModelError([NodeProblem(
                n.name, f"ai.onnx::{n.op}",
                "has a negative slope, which IF neurons (positive spikes only) cannot represent",
                f"replace it with ReLU and fine-tune, or pass --spiking-until '{n.inputs[0].name}' to run it and "
                "everything after it in the analog tail") for n in slopes])
        problems = [NodeProblem(n.name, f"{n.domain or 'ai.onnx'}::{n.op}",
                                "is not spike-compatible inside the spiking region" + _after_sites(n, analog_sites),
                                "pass --spiking-until <tensor> to end the spiking part before it, or replace the op")
                    for n in breaking]
        if not breaking:  # no single op to blame (e.g. a weight computed from the data): name the activations
            problems = [NodeProblem(s.node, f"ai.onnx::{nodes[s.node].op}",
                                    "does not become a neuron: no spiking signal reaches it or its consumers are "
                                    "not spike-compatible", "run `ann2snn inspect model.onnx` to see why") for s in lost]
        if state.config.strict:
            raise UnsupportedModelError(problems, header=f"{len(problems)} node(s) would end the spiking part early "
                                                         f"and leave {len(lost)} activation(s) analog")
        total = sum(node_macs(n) for n in graph.nodes)
        analog = sum(node_macs(nodes[n]) for n in tail)
        names = ", ".join(f"'{s.node}'" for s in lost[:5]) + (" ..." if len(lost) > 5 else "")
        where = ("the spiking part ends at " + ", ".join(f"'{n.name}' ({n.op}{_after_sites(n, analog_sites, True)})"
                                                        for n in breaking) if breaking
                 else f"activation(s) {names} do not become neurons (their input does not spike)")
        log.warning("%s; %d activation(s) stay analog, %d of them with weighted layers after them; %d of the "
                    "network's %d MACs (%.1f%%) run in the analog tail (use --strict to make this an error)",
                    where, len(analog_sites), len(lost), analog, total, 100.0 * analog / max(total, 1))
    if state.sites and not neurons:
        log.warning("none of the %d activation(s) became a neuron: the compiled model is not spiking (it computes "
                    "the ANN's outputs once per input); run `ann2snn inspect model.onnx` to see why", len(state.sites))
    elif not state.sites:
        log.warning("the model has no ReLU-like activation, so no neuron: the compiled model is not spiking (it "
                    "computes the ANN's outputs once per input); run `ann2snn inspect model.onnx` to see each op's role")
    # signed sites are neurons whose op is compensated: their own MACs (a compensated MatMul of
    # two activations) run on increments, what reads their neuron's output reads spikes
    # (kind 'input': the neuron sits before the op, so what reads the op reads increments)
    signed_in = {s.node for s in state.sites if s.kind == "input" and s.node in neurons}
    spike_sources = (neurons - signed_in) | {s.node for s in respiked}
    analog_steps = set(state.compensated) | {s.node for s in state.sites if s.signed and s.node in neurons} \
        | {s.node for s in respiked}
    seen, on_increments, on_currents = _step_readers(graph, spike_sources, spiking, set(tail), analog_steps)
    currents = _current_sites(graph, on_currents) if state.config.respike_currents else []
    on_currents -= {s.node for s in currents}
    share = _mac_share(graph, spike_sources, spiking, set(tail), analog_steps, {s.node for s in currents})
    if analog_steps:  # for inspect: what reads a compensated op's real-valued increments
        state.metadata["on_increments"] = sorted((spiking - neurons - analog_steps - seen) | on_increments)
    if on_currents:  # for inspect: the weighted ops that read another weighted op's current
        state.metadata["on_currents"] = sorted(on_currents)
    state.metadata["macs"] = share
    if share["total"] and share["spiking"] < 0.5 * share["total"]:
        def named(ns: list[gs.Node]) -> str:
            return ", ".join(f"'{n.name}' ({n.domain or 'ai.onnx'}::{n.op})" for n in ns[:5]) + \
                (" ..." if len(ns) > 5 else "")

        first = [n for n in graph.nodes if n.name in neurons]
        where = (f"spiking starts at {named(first)}" if first else "no neuron forms") + \
            (f" and ends at {named(breaking)}" if breaking else "")
        log.warning("only %.1f%% of the network's weighted work (%d of %d MACs per sample) takes spikes as input: "
                    "%s; the rest runs as the time-constant prefix (%.1f%%), the analog tail (%.1f%%), on the "
                    "real-valued increments of compensated ops (%.1f%%) or on the current of another weighted op "
                    "(%.1f%%). `ann2snn inspect` shows each node's role",
                    100.0 * share["spiking"] / share["total"], share["spiking"], share["total"], where,
                    100.0 * share["prefix"] / share["total"], 100.0 * share["tail"] / share["total"],
                    100.0 * share.get("compensated", 0) / share["total"],
                    100.0 * share.get("analog_current", 0) / share["total"])
    order = {n.name: k for k, n in enumerate(graph.nodes)}
    state.sites = sorted([s for s in state.sites if s.node in neurons] + respiked + currents,
                         key=lambda s: order[s.node])
    state.spiking = [n.name for n in graph.nodes if n.name in spiking and n.name not in neurons]
    # an activation that stayed analog is in the tail when it reads a time-varying signal (then
    # _classify put it there); one in the time-constant prefix stays there, computed once per
    # input (adding it to the tail made a tail function with no outputs: tests/runtime/regressions/forms)
    state.tail = [n.name for n in graph.nodes if n.name in tail]
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
    # max pools on a time-varying signal: emitted as cumulative pooling
    state.varying_pools = [n.name for n in graph.nodes if cumulative and n.name in spiking
                           and role(n.op, n.domain or "") == PREPOOL
                           and any(t.inputs and t.inputs[0].name in spiking for t in n.inputs)]
    log.info("%d neuron layer(s), %d tail node(s), boundary: %s", len(state.sites), len(state.tail), ", ".join(boundary))
    _check_bursts(state)
    return state


def _check_bursts(state: PassState) -> None:
    """``--burst`` / ``--resolution`` above 1 need a neuron that can burst: signed ReLU-site
    neurons (``--neuron signed``) or the symmetric neurons of signed sites. Refused before
    calibration when the network has neither."""
    cfg = state.config
    if cfg.neuron == "signed" or cfg.burst * cfg.resolution == 1 or any(s.signed for s in state.sites):
        return
    flag = f"burst {cfg.burst} (--burst)" if cfg.burst > 1 else f"resolution {cfg.resolution} (--resolution)"
    raise ConfigError(f"{flag} needs signed neurons, and this network has no signed activation site: add "
                      "--neuron signed (bursts at its ReLU sites), or use --burst 1 --resolution 1")


def _mac_share(graph: gs.Graph, neurons: set[str], spiking: set[str], analog: set[str],
               compensated: set[str] | None = None, respiked_inputs: set[str] = frozenset()) -> dict[str, int]:
    """MACs per sample of the weighted nodes that take spikes as input (downstream of a neuron
    inside the spiking part, not behind a compensated op, not reading another weighted op's
    current), of the time-constant prefix, of the analog tail and, with ``compensated``, of the
    step graph's analog work on increments: the compensated ops and the weighted nodes behind
    them, which take real-valued increments, not spikes. ``analog_current`` (present when not 0):
    the weighted nodes that read the current of another weighted node with no neuron between
    them (Conv -> Conv -> Relu), real values at every step; ``ann2snn report`` splits the same way.
    ``respiked_inputs``: weighted nodes whose current input a neuron re-spikes (``--respike-currents``):
    on spikes."""
    seen, on_increments, on_currents = _step_readers(graph, neurons, spiking, analog, compensated or set())
    on_currents = on_currents - respiked_inputs
    total = spiking_macs = tail_macs = step_analog = currents = 0
    for n in graph.nodes:
        m = node_macs(n)
        total += m
        if n.name in analog:
            tail_macs += m
        elif n.name in on_increments:
            step_analog += m
        elif n.name in on_currents:
            currents += m
        elif n.name in seen:
            spiking_macs += m
        elif compensated and n.name in spiking:
            step_analog += m  # time-varying but not on spikes: behind (or in) a compensated op
    share = {"total": total, "spiking": spiking_macs,
             "prefix": total - spiking_macs - tail_macs - step_analog - currents, "tail": tail_macs}
    if compensated:
        share["compensated"] = step_analog
    if currents:  # only then: models without such ops keep the keys (and bytes) they had
        share["analog_current"] = currents
    return share


def _step_readers(graph: gs.Graph, neurons: set[str], spiking: set[str], analog: set[str], compensated: set[str]
                  ) -> tuple[set[str], set[str], set[str]]:
    """(the spiking-part nodes downstream of a neuron, those of them that are weighted and read
    real-valued increments, those that are weighted and read another weighted op's current):
    ann2snn.macs.step_signals on the step graph (the nodes outside the tail ``analog``)."""
    seen = _on_spikes(graph, neurons, spiking, compensated)
    varying = {t.name for n in graph.nodes if n.name in spiking for t in n.outputs}
    increments, currents = step_signals(
        ((n.op, [t.name for t in n.inputs], [t.name for t in n.outputs],
          "neuron" if n.name in neurons else "compensated" if n.name in compensated else "")
         for n in graph.nodes if n.name not in analog), set(graph.tensors()) - varying)
    weighted = {n.name: n.inputs[0].name for n in graph.nodes if n.name in seen and n.op in WEIGHTED}
    on_increments = {k for k, x in weighted.items() if x in increments}
    return seen, on_increments, {k for k, x in weighted.items() if x in currents and k not in on_increments}


def _on_spikes(graph: gs.Graph, neurons: set[str], spiking: set[str], compensated: set[str]) -> set[str]:
    """Spiking-part nodes downstream of a neuron through spike-safe ops only (their input is spikes)."""
    by_tensor: dict[str, list[gs.Node]] = {}
    for n in graph.nodes:
        for t in n.inputs:
            by_tensor.setdefault(t.name, []).append(n)
    seen: set[str] = set()
    todo = [n for n in graph.nodes if n.name in neurons]
    while todo:
        n = todo.pop()
        for t in n.outputs:
            for c in by_tensor.get(t.name, []):
                if c.name in spiking and c.name not in seen and c.name not in compensated:
                    seen.add(c.name)
                    todo.append(c)
    return seen


def _respike(state: PassState, spiking: set[str], neurons: set[str]) -> list[Site]:
    """The compensated ops whose output a weighted op reads (``--respike``): each becomes a signed
    site of kind ``output`` (its symmetric neuron re-spikes the increments) and leaves
    ``state.compensated``. Their order is the graph's."""
    graph = state.graph
    stop = neurons | set(state.compensated)
    out: list[Site] = []
    for node in graph.nodes:
        if node.name not in state.compensated or not _reaches_weight(graph, node, spiking, stop):
            continue
        y = node.outputs[0]
        shape = static_shape(y)
        if shape is None or len(shape) == 0:
            continue  # candidates have static shapes; a scalar per sample has no channel to spike
        out.append(Site(node=node.name, pre=node.inputs[state.compensated[node.name][0]].name, post=y.name, cap=None,
                        channel_axis=channel_axis(y, len(shape) + 1), shape=shape, kind="output",
                        varying=tuple(state.compensated[node.name])))
    for site in out:
        del state.compensated[site.node]
    return out


def _current_sites(graph: gs.Graph, on_currents: set[str]) -> list[Site]:
    """``--respike-currents``: a signed site of kind ``current`` before each weighted node that
    reads another weighted node's current (its symmetric neuron integrates that input; the node
    reads its spikes), where the input has a static per-sample shape with a channel axis."""
    out: list[Site] = []
    for node in graph.nodes:
        if node.name not in on_currents:
            continue
        x = node.inputs[0]
        shape = static_shape(x)
        if shape is None or len(shape) == 0:
            continue
        out.append(Site(node=node.name, pre=x.name, post=x.name, cap=None, channel_axis=channel_axis(x, len(shape) + 1),
                        shape=shape, kind="current"))
    return out


def _static_sample_shape(t: gs.Tensor) -> bool:
    shape = t.shape
    return shape is not None and len(shape) >= 1 and all(isinstance(d, int) and d >= 0 for d in shape[1:])


def _compensation_candidates(graph: gs.Graph, why_not: dict[str, str]) -> frozenset[str]:
    """Nodes expectation compensation can wrap: a compensable op (ann2snn.support.COMPENSABLE)
    with one used output, float32 data and static per-sample shapes (its states need them).
    ``why_not`` receives, per compensable op left out, the reason."""
    out: set[str] = set()
    for node in graph.nodes:
        if not compensable(node.op, node.domain or "") or not node.outputs:
            continue
        if any(t.outputs or any(o is t for o in graph.outputs) for t in node.outputs[1:]):
            why_not[node.name] = "more than one of its outputs is used"
            continue
        tensors = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)] + [node.outputs[0]]
        if not all(_static_sample_shape(t) for t in tensors):
            why_not[node.name] = "the per-sample shapes of its inputs or output are not static (its states need them)"
        elif not all(t.dtype is None or t.dtype == np.float32 for t in tensors):
            why_not[node.name] = "its data is not float32"
        else:
            out.add(node.name)
    return frozenset(out)


def _compensated(graph: gs.Graph, spiking: set[str], neurons: set[str], candidates: frozenset[str]
                 ) -> dict[str, list[int]]:
    """The candidates that stayed spiking, each with the positions of its time-varying inputs."""
    made_by = {t.name: n.name for n in graph.nodes for t in n.outputs}
    out: dict[str, list[int]] = {}
    for n in graph.nodes:
        if n.name not in candidates or n.name not in spiking or n.name in neurons:
            continue
        mask = [bool(t.name) and made_by.get(t.name) in spiking for t in n.inputs]
        if any(mask) and not spike_safe(n.op, n.domain or "", mask) and role(n.op, n.domain or "") != PREPOOL:
            out[n.name] = [k for k, v in enumerate(mask) if v]
    return out

