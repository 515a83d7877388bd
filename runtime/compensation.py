"""Expectation compensation: a nonlinear op kept in the step graph (``--nonlinear compensate``).

A tensor of the spiking part is a stream of increments x_1, x_2, ... whose running mean
S_t / t is what the ANN computes, in the limit. A nonlinear op f (Softmax, LayerNorm, GELU,
a product of two activations) applied to each step's increment would not have that mean.
Wrapped, it keeps the running sum S_t of each time-varying input as a state and emits

    y_t = t·f(S_t / t) − (t−1)·f(S_{t−1} / (t−1))

so that the running sum of its outputs is exactly t·f(mean input so far) at every t, and the
ops after it see an increment stream of the same kind (docs/compensation.md). Inputs that are
constant in time are passed to f as they are. States (all starting at 0): the running sum of
each time-varying input, the previous total (t−1)·f(·), and the step count t.

The wrapper is the model-local function ``ann2snn::ExpectationCompensated<Op>`` (one per op
type, attributes and pattern of time-varying inputs), so stock onnxruntime runs it:

    (x_1..x_k, sum_1..sum_k, total, count, c_1..c_m) -> (y, sum_1'..sum_k', total', count')

with x the time-varying inputs in order, c the others in order, and the op itself inside.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .ops import DOMAIN

#: prefix of the function names (ExpectationCompensatedSoftmax, ...)
EC_PREFIX = "ExpectationCompensated"


def is_compensated(node: onnx.NodeProto) -> bool:
    """Whether ``node`` calls an expectation-compensated function."""
    return node.domain == DOMAIN and node.op_type.startswith(EC_PREFIX)


def compensated_function(name: str, inner: onnx.NodeProto, varying: Sequence[int], opsets: dict[str, int]
                         ) -> onnx.FunctionProto:
    """The FunctionProto wrapping ``inner`` (its inputs and attributes as in the model) whose
    inputs at the positions ``varying`` vary in time. ``opsets``: domain -> version for the body."""
    k = len(varying)
    xs, sums, sums_next = [f"x{i}" for i in range(k)], [f"sum{i}" for i in range(k)], [f"sum{i}_next" for i in range(k)]
    consts = [f"c{j}" for j, name_in in enumerate(inner.input) if name_in and j not in varying]
    nodes = [
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])),
        helper.make_node("Add", ["count", "one"], ["count_next"], name="step"),
        # every sample has the same count: one scalar t broadcasts against inputs of any rank
        helper.make_node("ReduceMax", ["count_next"], ["t"], keepdims=0, name="t"),
    ]
    args: list[str] = []
    ci = iter(consts)
    for j, name_in in enumerate(inner.input):
        if not name_in:
            args.append("")
        elif j in varying:
            i = list(varying).index(j)
            nodes.append(helper.make_node("Add", [sums[i], xs[i]], [sums_next[i]], name=f"accumulate{i}"))
            nodes.append(helper.make_node("Div", [sums_next[i], "t"], [f"mean{i}"], name=f"mean{i}"))
            args.append(f"mean{i}")
        else:
            args.append(next(ci))
    op = helper.make_node(inner.op_type, args, ["f_of_mean"], name="op", domain=inner.domain)
    op.attribute.extend(inner.attribute)
    nodes += [op,
              helper.make_node("Mul", ["f_of_mean", "t"], ["total_next"], name="total"),
              helper.make_node("Sub", ["total_next", "total"], ["y"], name="increment")]
    return helper.make_function(
        DOMAIN, name, xs + sums + ["total", "count"] + consts, ["y"] + sums_next + ["total_next", "count_next"],
        nodes, [helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
        doc_string=f"Expectation-compensated {inner.op_type}: emits t·f(S_t/t) − (t−1)·f(S_(t−1)/(t−1)) for the "
                   "running sums S of its time-varying inputs, so its outputs sum to t·f(mean input).")


def compensated_reference(f: Callable[..., np.ndarray], xs: Sequence[np.ndarray], sums: Sequence[np.ndarray],
                          total: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray,
                                                                         np.ndarray]:
    """numpy reference of one step: (y, sums_next, total_next, count_next); ``f`` takes the means."""
    count_next = (count + 1).astype(np.float32)
    t = np.float32(count_next.max())
    sums_next = [(s + x).astype(np.float32) for s, x in zip(sums, xs)]
    total_next = (np.asarray(f(*[s / t for s in sums_next]), np.float32) * t).astype(np.float32)
    return (total_next - total).astype(np.float32), sums_next, total_next, count_next
