"""Find the activation sites: ReLU and Clip(0, c) / ReLU6 nodes."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ann2snn.errors import NodeProblem
from ann2snn.state import PassState, Site

from ._graph import const_value, static_shape


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


def _channel_axis(tensor: gs.Tensor, rank: int) -> int:
    """Axis of the channels / neurons: 1 for Conv and Gemm outputs, the last for MatMul."""
    t = tensor
    for _ in range(8):  # look through bias adds, pooling and the like
        if len(t.inputs) != 1:
            break
        prod = t.inputs[0]
        if prod.op == "MatMul":
            return rank - 1
        if prod.op in ("Conv", "ConvTranspose", "Gemm"):
            return 1
        if not prod.inputs:
            break
        t = prod.inputs[0]
    return 1


def find_activations(state: PassState) -> PassState:
    """Record every ReLU-like node as a Site (pre-activation tensor, output, cap, shape)."""
    sites = []
    for node in state.graph.nodes:
        if node.op == "Relu":
            cap = None
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
        axis = _channel_axis(pre, len(shape) + 1)
        sites.append(Site(node=node.name, pre=pre.name, post=node.outputs[0].name, cap=cap, channel_axis=axis, shape=shape))
    state.sites = sites
    return state
