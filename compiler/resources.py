"""Memory estimates, checked before a simulation starts."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx

from .errors import ResourceError

GIB = 2**30


def default_memory_limit() -> int:
    """75% of the machine's physical memory, in bytes."""
    try:
        return int(0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GIB


def _per_sample_floats(vi: onnx.ValueInfoProto) -> int:
    if not vi.type.HasField("tensor_type"):
        return 0
    dims = vi.type.tensor_type.shape.dim[1:]
    if any(not d.HasField("dim_value") for d in dims):
        return 0
    return int(np.prod([d.dim_value for d in dims])) if dims else 1


def estimate_simulation_bytes(model: onnx.ModelProto, batch: int) -> dict[str, int]:
    """Bytes a simulation at ``batch`` needs: weights, membrane states (kept between steps),
    and the step's intermediate tensors (an upper bound: every one alive at once). T does
    not enter: the runtime keeps running sums, not the history of steps."""
    meta = json.loads({p.key: p.value for p in model.metadata_props}["ann2snn"])
    inferred = onnx.shape_inference.infer_shapes(model)
    by_name = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
               + list(inferred.graph.output)}
    states = sum(int(np.prod(s["shape"])) if s["shape"] else 1 for s in meta["states"])
    inter = sum(_per_sample_floats(vi) for vi in by_name.values())
    weights = sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer)
    return {"weights": weights, "states": 2 * states * batch * 4, "activations": inter * batch * 4,
            "total": weights + 2 * states * batch * 4 + inter * batch * 4}


def check_calibration_memory(model: onnx.ModelProto, batch: int, limit: int | None) -> int:
    """Raise ResourceError when a calibration batch would need more than ``limit`` bytes.

    The estimate counts every tensor of the ANN at once, plus the LTB probes (about one
    more copy of each activation), which bounds onnxruntime's peak from above.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = sum(_per_sample_floats(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.input))
    weights = sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer)
    need = weights + 2 * floats * batch * 4
    limit = default_memory_limit() if limit is None else limit
    if need > limit:
        raise ResourceError(
            f"calibrating with batches of {batch} needs about {need / GIB:.2f} GiB, more than the limit of "
            f"{limit / GIB:.2f} GiB; lower the calibration batch (--batch) or raise --max-memory")
    return need


def check_memory(model: onnx.ModelProto, batch: int, limit: int | None) -> dict[str, int]:
    """Raise ResourceError when the estimate for ``batch`` exceeds ``limit`` bytes."""
    est = estimate_simulation_bytes(model, batch)
    limit = default_memory_limit() if limit is None else limit
    if est["total"] > limit:
        raise ResourceError(
            f"simulating a batch of {batch} needs about {est['total'] / GIB:.2f} GiB (weights {est['weights'] / GIB:.2f}, "
            f"membrane states {est['states'] / GIB:.2f}, step activations {est['activations'] / GIB:.2f}), more than "
            f"the limit of {limit / GIB:.2f} GiB; lower the batch size (--batch-size) or raise --max-memory")
    return est
