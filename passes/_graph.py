"""Small graph helpers shared by the passes (not a pass)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # its warnings are about exporter quirks we handle


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor that is constant at compile time, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        if "value" in attrs:
            return np.asarray(attrs["value"].values)
    return None


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """All tensors of the graph by name."""
    return graph.tensors()


def node_map(graph: gs.Graph) -> dict[str, gs.Node]:
    """All nodes of the graph by name."""
    return {n.name: n for n in graph.nodes}


def unique_name(taken: set[str], base: str) -> str:
    """``base`` or ``base_1``, ``base_2``, ... whichever is free; marks it taken."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer (and graph output slot) of ``old`` read ``new`` instead."""
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
    for i, t in enumerate(graph.outputs):
        if t is old:
            graph.outputs[i] = new


def owned_constant(graph: gs.Graph, node: gs.Node, index: int) -> gs.Constant:
    """The constant at ``node.inputs[index]``, copied first if anything else reads it.

    Passes that rewrite weights call this so that shared weights are never changed
    under another node.
    """
    tensor = node.inputs[index]
    value = const_value(tensor)
    if value is None:
        raise ValueError(f"input {index} of node '{node.name}' is not constant")
    shared = len(tensor.outputs) > 1 or not isinstance(tensor, gs.Constant)
    if shared:
        taken = set(graph.tensors())
        copy = gs.Constant(unique_name(taken, f"{node.name}/{tensor.name.split('/')[-1] or 'w'}"), np.array(value))
        node.inputs[index] = copy
        return copy
    return tensor


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The per-sample shape (without the batch axis) if every such dim is a known int."""
    if tensor.shape is None:
        return None
    dims = tuple(tensor.shape)[1:]
    if any(not isinstance(d, (int, np.integer)) or d < 0 for d in dims):
        return None
    return tuple(int(d) for d in dims)


def export(graph: gs.Graph, opset: int, ir_version: int | None = None) -> onnx.ModelProto:
    """Export a graph to a ModelProto with the given default-domain opset."""
    graph.opset = opset
    model = gs.export_onnx(graph, do_type_check=False)
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def restore_output_types(model: onnx.ModelProto, types: dict[str, bytes]) -> onnx.ModelProto:
    """Put back graph-output types gs does not keep (non-tensor ones, e.g. a ZipMap's sequence)."""
    for o in model.graph.output:
        if o.name in types:
            o.type.ParseFromString(types[o.name])
    return model


def with_shapes(graph: gs.Graph, opset: int) -> gs.Graph:
    """Re-run ONNX shape inference over the graph and return the re-imported graph."""
    model = export(graph.cleanup().toposort(), opset)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # shape inference is best effort here; the checker runs at the end
        pass
    return gs.import_onnx(model)


def apply_node(node: gs.Node, x: np.ndarray, opset: int = 17) -> list[np.ndarray]:
    """Run a copy of ``node`` on ``x`` (its first input; the others must be constants)."""
    from ann2snn.ortsession import make_session

    inp = gs.Variable("x", dtype=x.dtype, shape=list(x.shape))
    outs = [gs.Variable(f"y{i}", dtype=x.dtype) for i in range(len(node.outputs))]
    rest = [gs.Constant(f"c{i}", const_value(t)) if t.name else t for i, t in enumerate(node.inputs[1:])]
    copy = gs.Node(node.op, attrs=dict(node.attrs), inputs=[inp] + rest, outputs=outs)
    graph = gs.Graph(nodes=[copy], inputs=[inp], outputs=outs, opset=opset)
    model = gs.export_onnx(graph, do_type_check=False)
    sess = make_session(model)
    return [np.asarray(v) for v in sess.run(None, {"x": x})]


def channel_axis(tensor: gs.Tensor, rank: int) -> int:
    """Axis of the channels / neurons: 1 for Conv and Gemm outputs, the last for MatMul.

    Looks back through bias adds, pooling and the like along the first input that is not a
    constant: the legacy torch exporter writes a bias add as ``Add(bias, MatMul(...))``."""
    t = tensor
    for _ in range(8):
        if len(t.inputs) != 1:
            break
        prod = t.inputs[0]
        if prod.op == "MatMul":
            return rank - 1
        if prod.op in ("Conv", "ConvTranspose", "Gemm"):
            return 1
        varying = [i for i in prod.inputs if not isinstance(i, gs.Constant)]
        if not varying:
            break
        t = varying[0]
    return 1
