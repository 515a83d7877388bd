"""Bring an exported ONNX model into the compiler: opset check and upgrade, shape
inference, readable unique node names."""
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


def import_model(model: onnx.ModelProto, config: CompileConfig) -> PassState:
    """Check the opset (upgrading models older than opset 13), infer shapes, name every node."""
    opset = default_opset(model)
    if opset > NEWEST_OPSET:
        raise ModelLoadError(
            f"the model uses opset {opset}, newer than the newest ann2snn supports ({NEWEST_OPSET}); "
            f"re-export it with opset <= {NEWEST_OPSET} (torch.onnx.export(..., opset_version={NEWEST_OPSET}))"
        )
    if opset < OLDEST_OPSET:
        raise ModelLoadError(
            f"the model uses opset {opset}, older than ann2snn reads ({OLDEST_OPSET}); re-export it with opset >= 11"
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
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise ModelLoadError(f"ONNX shape inference failed on the model: {exc}; check the model with onnx.checker") from None
    graph = gs.import_onnx(model)
    taken: set[str] = set()
    for node in graph.nodes:  # names must be unique: passes and reports refer to nodes by name
        node.name = unique_name(taken, node.name or f"{node.op}_{len(taken)}")
    return PassState(
        graph=graph,
        config=config,
        opset=opset,
        ir_version=int(model.ir_version),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        output_types={o.name: o.type.SerializeToString() for o in model.graph.output},
        other_opsets={i.domain: int(i.version) for i in model.opset_import if i.domain not in ("", "ai.onnx")},
    )
