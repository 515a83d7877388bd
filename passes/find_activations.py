"""Find the activation sites: ReLU and Clip(0, c) / ReLU6 nodes, and (``--signed-sites``, not
``off``) the signed activation sites: LeakyReLU, PReLU with a constant slope, SiLU, GELU and
HardSwish (docs/signed_activations.md)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ann2snn.errors import NodeProblem
from ann2snn.state import PassState, Site
from ann2snn.config import AUTO_SIGNED_FORM
from ann2snn.support import NEGATIVE_SLOPE, signed_activation

from ._graph import channel_axis, const_value, static_shape


def _clip_bounds(node: gs.Node) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip whose bounds are constants (None = unbounded); None if not constant."""
    bounds = []
    for i in (1, 2):
        if len(node.inputs) <= i or node.inputs[i].name == "":
            bounds.append(None)
            continue
        v = const_value(node.inputs[i])
        if v is None:
            return None
        bounds.append(float(np.asarray(v).reshape(())))
    return bounds[0], bounds[1]


def _signed_form(node: gs.Node, option: str) -> str:
    """The form of a signed site at ``node`` under ``--signed-sites option`` ("off": none)."""
    if not signed_activation(node.op, node.domain or ""):
        return "off"
    if option == "auto":
        return AUTO_SIGNED_FORM if node.op in NEGATIVE_SLOPE and not node.domain else "off"
    return option


def find_activations(state: PassState) -> PassState:
    """Record every ReLU-like node, and every signed activation, as a Site (pre-activation tensor,
    output, cap, shape, kind)."""
    sites = []
    signed = state.config.signed_sites
    for node in state.graph.nodes:
        kind = "relu"
        if node.op == "Relu":
            cap = None
        elif _signed_form(node, signed) != "off" and node.inputs \
                and all(const_value(t) is not None for t in node.inputs[1:] if t.name):
            cap, kind = None, _signed_form(node, signed)
        elif node.op == "Clip":
            bounds = _clip_bounds(node)
            if bounds is None or bounds[0] != 0.0:
                continue  # not ReLU-like: an ordinary analog op
            cap = bounds[1]
            if cap is not None and cap <= 0:
                continue
        else:
            continue
        pre = node.inputs[0]
        shape = static_shape(pre)
        if shape is None or len(shape) == 0:
            state.problems.append(NodeProblem(
                node.name, f"ai.onnx::{node.op}",
                f"has an input '{pre.name}' whose per-sample shape is unknown ({pre.shape}), so its neurons cannot be laid out",
                "export the model with a fixed input size (only the batch dimension may be dynamic)"))
            continue
        axis = channel_axis(pre, len(shape) + 1)
        sites.append(Site(node=node.name, pre=pre.name, post=node.outputs[0].name, cap=cap, channel_axis=axis, shape=shape,
                          kind=kind))
    state.sites = sites
    if any(s.signed for s in sites):  # for inspect: told apart from the compensated ops re-spiked later
        state.metadata["signed_activations"] = [s.node for s in sites if s.signed]
    return state
