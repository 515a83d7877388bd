"""Fold inference-mode BatchNormalization into the preceding Conv / ConvTranspose /
Gemm / MatMul; a BatchNorm that cannot be folded becomes a per-channel Mul and Add."""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ann2snn.errors import NodeProblem, UnsupportedModelError
from ann2snn.state import PassState

from ._graph import const_value, owned_constant, replace_uses, unique_name

log = logging.getLogger(__name__)


def _bn_affine(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (scale, shift) of a BatchNormalization node, or None if not constant."""
    vals = [const_value(t) for t in node.inputs[1:5]]
    if any(v is None for v in vals):
        return None
    gamma, beta, mean, var = (np.asarray(v, dtype=np.float64) for v in vals)
    eps = float(node.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - scale * mean


def _fold_into(graph: gs.Graph, prod: gs.Node, scale: np.ndarray, shift: np.ndarray) -> bool:
    """Scale the producer's weights and bias per output channel. False if not foldable."""
    op = prod.op
    if op in ("Conv", "ConvTranspose"):
        if const_value(prod.inputs[1]) is None or (len(prod.inputs) > 2 and const_value(prod.inputs[2]) is None):
            return False
        w_t = owned_constant(graph, prod, 1)
        w = np.asarray(w_t.values, dtype=np.float64)
        if op == "Conv":
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        else:  # ConvTranspose weight: [C_in, C_out / group, k...]
            g = int(prod.attrs.get("group", 1))
            cin, cout_g = w.shape[0], w.shape[1]
            wr = w.reshape((g, cin // g, cout_g) + w.shape[2:])
            wr = wr * scale.reshape((g, 1, cout_g) + (1,) * (w.ndim - 2))
            w = wr.reshape(w.shape)
        w_t.values = w.astype(w_t.values.dtype)
        bias = np.zeros(len(scale)) if len(prod.inputs) < 3 else np.asarray(const_value(prod.inputs[2]), np.float64)
        new_b = bias * scale + shift
        if len(prod.inputs) < 3:
            prod.inputs.append(gs.Constant(f"{prod.name}/bias", new_b.astype(w_t.values.dtype)))
        else:
            b_t = owned_constant(graph, prod, 2)
            b_t.values = new_b.astype(b_t.values.dtype)
        return True
    if op == "Gemm":
        if prod.attrs.get("transA", 0) or const_value(prod.inputs[1]) is None:
            return False
        if len(prod.inputs) > 2 and const_value(prod.inputs[2]) is None:
            return False
        w_t = owned_constant(graph, prod, 1)
        w = np.asarray(w_t.values, dtype=np.float64)
        w = w * scale[:, None] if prod.attrs.get("transB", 0) else w * scale[None, :]
        w_t.values = w.astype(w_t.values.dtype)
        beta = float(prod.attrs.get("beta", 1.0))
        bias = np.zeros(len(scale)) if len(prod.inputs) < 3 else np.broadcast_to(
            np.asarray(const_value(prod.inputs[2]), np.float64) * beta, (len(scale),)
        )
        new_b = (bias * scale + shift).astype(w_t.values.dtype)
        prod.attrs["beta"] = 1.0
        if len(prod.inputs) < 3:
            prod.inputs.append(gs.Constant(f"{prod.name}/bias", new_b))
        else:
            prod.inputs[2] = gs.Constant(f"{prod.name}/bias", new_b)
        return True
    if op == "MatMul":
        w = const_value(prod.inputs[1])
        out = prod.outputs[0]
        if w is None or w.ndim != 2 or out.shape is None or len(out.shape) != 2:
            return False  # BatchNorm's channel axis 1 is MatMul's last axis only for 2-D outputs
        w_t = owned_constant(graph, prod, 1)
        w_t.values = (np.asarray(w_t.values, np.float64) * scale[None, :]).astype(w_t.values.dtype)
        return True
    return False


def fold_batchnorm(state: PassState) -> PassState:
    """Fold every BatchNormalization (see module doc); report non-constant ones."""
    graph = state.graph
    taken = set(graph.tensors())
    problems = []
    for node in list(graph.nodes):
        if node.op != "BatchNormalization":
            continue
        if len(node.outputs) > 1 and any(t.outputs for t in node.outputs[1:]):
            problems.append(NodeProblem(node.name, "ai.onnx::BatchNormalization",
                                        "is in training mode (its running statistics are used)",
                                        "export the model in eval mode (model.eval() before torch.onnx.export)"))
            continue
        affine = _bn_affine(node)
        if affine is None:
            problems.append(NodeProblem(node.name, "ai.onnx::BatchNormalization",
                                        "has non-constant statistics", "export the model with constant BatchNorm parameters"))
            continue
        scale, shift = affine
        x, y = node.inputs[0], node.outputs[0]
        prod = x.inputs[0] if len(x.inputs) == 1 else None
        foldable = (
            prod is not None
            and len(x.outputs) == 1  # torch.fx fuse() rule: not when the output has other consumers
            and not any(t is x for t in graph.outputs)
            and _fold_into(graph, prod, scale, shift)
        )
        if foldable:
            if prod.op == "MatMul":  # MatMul has no bias: the shift becomes an Add
                add_out = gs.Variable(unique_name(taken, f"{node.name}/shifted"), dtype=y.dtype, shape=y.shape)
                graph.nodes.append(gs.Node("Add", name=f"{node.name}/bn_shift",
                                           inputs=[x, gs.Constant(f"{node.name}/shift_value", shift.astype(np.float32))],
                                           outputs=[add_out]))
                x = add_out
            was_output = any(t is y for t in graph.outputs)
            replace_uses(graph, y, x)
            if was_output:  # the graph output keeps its public name
                x.name, y.name = y.name, f"{y.name}__folded"
            log.debug("folded %s into %s", node.name, prod.name)
            state.removed[node.name] = f"folded into '{prod.name}'"
        else:
            rank = len(x.shape) if x.shape is not None else 4
            bshape = (-1,) + (1,) * max(rank - 2, 0)
            mid = gs.Variable(unique_name(taken, f"{node.name}/scaled"), dtype=y.dtype, shape=y.shape)
            graph.nodes.append(gs.Node("Mul", name=f"{node.name}/bn_scale",
                                       inputs=[x, gs.Constant(f"{node.name}/scale_value", scale.reshape(bshape).astype(np.float32))],
                                       outputs=[mid]))
            graph.nodes.append(gs.Node("Add", name=f"{node.name}/bn_shift",
                                       inputs=[mid, gs.Constant(f"{node.name}/shift_value", shift.reshape(bshape).astype(np.float32))],
                                       outputs=[y]))
            state.removed[node.name] = f"became per-channel Mul/Add '{node.name}/bn_scale', '{node.name}/bn_shift'"
        node.inputs.clear()
        node.outputs.clear()
    if problems:
        raise UnsupportedModelError(problems)
    graph.cleanup().toposort()
    return state
