"""The optional compiled neuron kernels: one onnxruntime call runs an IF neuron layer over a
chunk of timesteps.

``make kernels`` builds ``libann2snn_kernels.so`` here from ``ann2snn_kernels.cc`` (our own
C++, against the onnxruntime C API headers it fetches). When the library is present,
:class:`~ann2snn.runtime.SpikingSession` registers it and, at load time, replaces each neuron
node of its derived forms by the kernel op of the same arithmetic (:func:`kernel_form`); the
layered form then runs one kernel call per neuron layer per chunk instead of three nodes per
step. The compiled model is unchanged: its neurons stay model-local ONNX functions and run
on stock onnxruntime. ``ANN2SNN_KERNELS=0`` or ``SpikingSession(..., kernels=False)`` turns
the kernels off.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ann2snn.errors import ConfigError

from ..ops import BURST_OP, DOMAIN, IF_OP, SIGNED_OP, UNIT_IF_OP

log = logging.getLogger(__name__)

#: the custom-op domain of the kernels (never written to a compiled model)
KERNEL_DOMAIN = "ann2snn.kernels"
#: neuron function op -> the kernel op with its arithmetic
KERNEL_OPS = {IF_OP: "IFChunk", UNIT_IF_OP: "IFChunk", SIGNED_OP: "SignedIFChunk", BURST_OP: "SignedBurstIFChunk"}
#: kernel ops whose inputs / outputs 1 and 2 are the membrane and spike-count states
COUNTING_KERNEL_OPS = ("SignedIFChunk", "SignedBurstIFChunk")
#: where ``make kernels`` writes the library
LIBRARY = Path(__file__).with_name("libann2snn_kernels.so")
#: the C API version of the headers the library is built with (onnxruntime 1.N offers API N)
API_VERSION = 29


def _ort_api() -> int:
    try:
        return int(ort.__version__.split(".")[1])
    except (IndexError, ValueError):
        return 0


def library(requested: bool | None = None) -> Path | None:
    """The kernel library to use, or None. ``requested``: None uses it when it is built and
    ``ANN2SNN_KERNELS`` is not ``0``; False never; True requires it (ConfigError if missing).
    ``ANN2SNN_KERNELS_LIB`` names a library built elsewhere (an installed, not editable,
    ann2snn has no source tree to build in)."""
    if requested is False or (requested is None and os.environ.get("ANN2SNN_KERNELS", "1") == "0"):
        return None
    path = Path(os.environ["ANN2SNN_KERNELS_LIB"]) if os.environ.get("ANN2SNN_KERNELS_LIB") else LIBRARY
    problem = None
    if not path.is_file():
        problem = f"{path} is not built"
    elif _ort_api() < API_VERSION:
        problem = f"onnxruntime {ort.__version__} is older than the kernels' C API (1.{API_VERSION})"
    if problem is None:
        return path
    if requested:
        raise ConfigError(f"the compiled neuron kernels are not available: {problem}; run `make kernels` "
                          "(needs g++ and npm) or pass kernels=False")
    log.debug("compiled neuron kernels not used: %s", problem)
    return None


def register(so: ort.SessionOptions, path: Path) -> None:
    """Register the kernel library ``path`` with the session options ``so``."""
    so.register_custom_ops_library(str(path))


def _expanded(value: np.ndarray, sample: tuple[int, ...]) -> np.ndarray | None:
    """``value`` as one number if it holds one, else broadcast to a sample's shape (what the
    kernel reads), or None if it does not broadcast against a sample."""
    if value.size and np.all(value.reshape(-1) == value.reshape(-1)[0]):
        return value.reshape(-1)[:1].astype(np.float32)
    try:
        full = np.broadcast_to(value.astype(np.float32), (1, *sample))
    except ValueError:
        return None
    if full.shape != (1, *sample):
        return None
    return np.ascontiguousarray(full.reshape(sample))


def _current_fits(current: str, sample: tuple[int, ...], static: set[str],
                  types: dict[str, onnx.TypeProto]) -> bool:
    """Whether the kernel can read ``current`` as one sample-shaped row per state row: it
    varies with the input (a constant current would be broadcast by the function, not by the
    kernel) and, where its shape is known, a sample of it has the state's shape."""
    if current in static:
        return False
    t = types.get(current)
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return True
    dims = t.tensor_type.shape.dim
    return len(dims) == len(sample) + 1 and all(
        not d.HasField("dim_value") or d.dim_value == n for d, n in zip(list(dims)[1:], sample))


def kernel_form(proto: onnx.ModelProto, sample_shapes: dict[str, tuple[int, ...]],
                types: dict[str, onnx.TypeProto] | None = None) -> onnx.ModelProto:
    """``proto`` with every neuron node whose threshold (and burst size) is an initializer
    replaced by its kernel op with ``steps=1``: the same arithmetic, one node. ``sample_shapes``:
    the per-sample shape of each state input; ``types``: the value types of ``proto``'s tensors,
    if known. Other neuron nodes are left as they are."""
    values = {i.name: i for i in proto.graph.initializer}
    static = set(values)  # tensors computed from constants alone
    for node in proto.graph.node:
        if all(i in static for i in node.input if i):
            static.update(node.output)
    new_nodes, inits, changed = [], [], 0
    for node in proto.graph.node:
        op = KERNEL_OPS.get(node.op_type) if node.domain == DOMAIN else None
        sample = sample_shapes.get(node.input[1]) if op and len(node.input) > 1 else None
        if op is None or sample is None or not _current_fits(node.input[0], sample, static, types or {}):
            new_nodes.append(node)
            continue
        n_states = 2 if op in COUNTING_KERNEL_OPS else 1
        params = list(node.input[1 + n_states:])  # threshold (, max_spikes)
        consts: list[str] = []
        if node.op_type == UNIT_IF_OP:
            params = []
            consts.append(f"{node.name}/kernel_threshold")
            inits.append(numpy_helper.from_array(np.ones(1, np.float32), consts[-1]))
        for k, p in enumerate(params):
            if p not in values:
                break
            value = _expanded(numpy_helper.to_array(values[p]), sample)
            if value is None:
                break
            consts.append(f"{node.name}/kernel_param{k}")
            inits.append(numpy_helper.from_array(value, consts[-1]))
        if len(consts) != max(len(params), 1) or (op == "SignedBurstIFChunk" and len(consts) != 2):
            new_nodes.append(node)
            continue
        new_nodes.append(helper.make_node(op, [*node.input[:1 + n_states], *consts], list(node.output),
                                          name=node.name, domain=KERNEL_DOMAIN, steps=1))
        changed += 1
    if not changed:
        return proto
    new = onnx.ModelProto()
    new.CopyFrom(proto)
    del new.graph.node[:]
    new.graph.node.extend(new_nodes)
    new.graph.initializer.extend(inits)
    new.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
    log.debug("compiled neuron kernels for %d neuron nodes", changed)
    return new
