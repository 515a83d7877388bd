"""Bring an exported ONNX model into the compiler: opset check and upgrade, shape
inference, readable unique node names.

Old exports (IR 3, the ONNX model zoo's Caffe/Caffe2 conversions, torch's
``keep_initializers_as_inputs=True``) list every initializer in ``graph.input`` too. Such an
input is a constant with a default that a feed could override; nobody feeds weights, so they
are treated as initializers: removed from the graph inputs (the compiled model does not have
them), and the IR version is raised to the one the opset needs, so that shape inference,
which ignores initializers missing from the inputs below IR 4, sees the weights.
"""
from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from ann2snn.config import CompileConfig
from ann2snn.errors import ModelLoadError
from ann2snn.state import PassState
from ann2snn.support import MIN_OPSET, NEWEST_OPSET, OLDEST_OPSET

from ._graph import unique_name

log = logging.getLogger(__name__)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelLoadError("the model imports no ai.onnx opset; re-export it with a standard ONNX exporter")


def drop_initializer_inputs(model: onnx.ModelProto) -> list[str]:
    """Remove the graph inputs that are also initializers (in place); return their names."""
    inits = {t.name for t in model.graph.initializer}
    listed = [i.name for i in model.graph.input if i.name in inits]
    if listed:
        keep = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(keep)
    return listed


def _raise_ir(model: onnx.ModelProto) -> None:
    """At least the IR version the model's opsets need (IR 3 files without initializer inputs
    are read by shape inference as having no weights)."""
    need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.ir_version < max(need, 4):
        model.ir_version = max(need, 4)


def import_model(model: onnx.ModelProto, config: CompileConfig) -> PassState:
    """Check the opset (upgrading models older than opset 13), treat initializers listed as
    graph inputs as constants, infer shapes, name every node."""
    opset = original_opset = default_opset(model)
    ir_version = int(model.ir_version)
    if opset > NEWEST_OPSET:
        raise ModelLoadError(
            f"the model uses opset {opset}, newer than the newest ann2snn supports ({NEWEST_OPSET}); "
            f"re-export it with opset <= {NEWEST_OPSET} (torch.onnx.export(..., opset_version={NEWEST_OPSET}))"
        )
    if opset < OLDEST_OPSET:
        raise ModelLoadError(
            f"the model uses opset {opset}, older than ann2snn reads ({OLDEST_OPSET}); re-export it with opset >= 11, "
            "or take the opset 7, 8 or 9 version of the same network (the ONNX model zoo ships them)"
        )
    if opset < MIN_OPSET:
        log.info("upgrading the model from opset %d to %d", opset, MIN_OPSET)
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise ModelLoadError(
                f"could not upgrade the model from opset {opset} to {MIN_OPSET}: {exc}; "
                f"re-export it with opset >= {MIN_OPSET}"
            ) from None
        opset = MIN_OPSET
    listed = drop_initializer_inputs(model)
    if listed:
        log.warning("%d initializer(s) are also listed as graph inputs (an old export: IR %d, opset %d); they are "
                    "compiled as constants and the compiled model does not take them as inputs", len(listed),
                    ir_version, original_opset)
    _raise_ir(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise ModelLoadError(f"ONNX shape inference failed on the model: {exc}; check the model with onnx.checker") from None
    graph = gs.import_onnx(model)
    taken: set[str] = set()
    for node in graph.nodes:  # names must be unique: passes and reports refer to nodes by name
        node.name = unique_name(taken, node.name or f"{node.op}_{len(taken)}")
    state = PassState(
        graph=graph,
        config=config,
        opset=opset,
        ir_version=int(model.ir_version),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        output_types={o.name: o.type.SerializeToString() for o in model.graph.output},
        other_opsets={i.domain: int(i.version) for i in model.opset_import if i.domain not in ("", "ai.onnx")},
    )
    state.metadata["source"] = {"ir_version": ir_version, "opset": original_opset, "initializers_as_inputs": len(listed)}
    return state
