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

    (x_1..x_k, sum_1..sum_k, total, t, t_1..t_k, c_1..c_m[, scale]) -> (y, sum_1'..sum_k', total')

with x the time-varying inputs in order, c the others in order, and the op itself inside. t is
the step number (1, 2, ...) of each sample, shaped [N, 1, ..., 1] to the output's rank, and t_i
the same to input i's rank: the graph keeps one step counter for all its compensated ops
(``STEP_COUNT``) and reshapes it once per rank, so no op counts its own steps.

Numerical hazards (docs/compensation.md, "Numerical hazards"): the op only ever sees running
means, never a step's increment, so a LayerNorm's variance and epsilon are those of the mean
(a step that swings wildly does not reach it). Softmax and LogSoftmax subtract the row maximum
of the mean inside the function, so they are stable at any input scale whatever the runtime's
kernel does. Ops that can give inf or NaN on finite inputs (GUARDED: a division by a running
mean still 0, Sqrt / Log of a mean that rounding left slightly negative, Exp or t·f(·)
overflowing) keep their previous total where t·f(means) is not finite, i.e. emit 0 there: the
running sum stays finite, and the first step whose means are back in the op's domain restores
it to exactly t·f(means), so convergence is not lost. An op whose ANN output is itself not
finite on the calibration data cannot converge at all: calibrate_thresholds refuses it by name.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .ops import DOMAIN

#: prefix of the function names (ExpectationCompensatedSoftmax, ...)
EC_PREFIX = "ExpectationCompensated"

#: ops whose output can be inf / NaN on finite inputs: their compensated total is guarded
#: (kept where t·f(means) is not finite). Others are finite wherever their means are, and
#: skip the guard's four element-wise ops per step.
GUARDED = frozenset({"Div", "Reciprocal", "Log", "Sqrt", "Pow", "Exp", "Softplus", "LpNormalization",
                     "ReduceLogSumExp", "ReduceL2", "InstanceNormalization", "GroupNormalization"})
#: ops that get the row maximum of their (mean) input subtracted first: the same value, never overflowing
MAX_SHIFTED = frozenset({"Softmax", "LogSoftmax"})
#: the state of the graph's one step counter (shape [N, 1], starting at 0), and its next value
STEP_COUNT = "ann2snn/step_count"


def is_compensated(node: onnx.NodeProto) -> bool:
    """Whether ``node`` calls an expectation-compensated function."""
    return node.domain == DOMAIN and node.op_type.startswith(EC_PREFIX)


def compensated_function(name: str, inner: onnx.NodeProto, varying: Sequence[int], opsets: dict[str, int],
                         scaled: bool = False, totals: bool = False) -> onnx.FunctionProto:
    """The FunctionProto wrapping ``inner`` (its inputs and attributes as in the model) whose
    inputs at the positions ``varying`` vary in time. ``opsets``: domain -> version for the body.

    ``scaled``: one more input after the others, ``scale`` (broadcast against the output), and
    the totals (so the increments) are t·f(means)·scale: a signed site's neuron after the op then
    reads its current in units of its threshold (scale = 1/θ) at no extra element-wise pass.

    ``totals`` (with ``scaled``, for an op that is not guarded): the function emits the totals
    t·f(means)·scale themselves, keeps no total state and computes no increment: the neuron after
    it (UnitSymmetricTotalIFNeuron) integrates totals, its state being its membrane minus the
    total (runtime/ops.py): one element-wise pass and one state fewer per step.

    (x_1..x_k, sum_1..sum_k, t, t_1..t_k, c_1..c_m, scale) -> (total', sum_1'..sum_k')"""
    k = len(varying)
    xs, sums, sums_next = [f"x{i}" for i in range(k)], [f"sum{i}" for i in range(k)], [f"sum{i}_next" for i in range(k)]
    ts = [f"t{i}" for i in range(k)]
    consts = [f"c{j}" for j, name_in in enumerate(inner.input) if name_in and j not in varying]
    nodes: list[onnx.NodeProto] = []
    args: list[str] = []
    ci = iter(consts)
    for j, name_in in enumerate(inner.input):
        if not name_in:
            args.append("")
        elif j in varying:
            i = list(varying).index(j)
            nodes.append(helper.make_node("Add", [sums[i], xs[i]], [sums_next[i]], name=f"accumulate{i}"))
            nodes.append(helper.make_node("Div", [sums_next[i], ts[i]], [f"mean{i}"], name=f"mean{i}"))
            args.append(f"mean{i}")
        else:
            args.append(next(ci))
    standard = inner.domain in ("", "ai.onnx")
    if standard and inner.op_type in MAX_SHIFTED and args[0].startswith("mean"):
        axis = next((a.i for a in inner.attribute if a.name == "axis"), -1)  # opset >= 13: one axis
        if opsets.get("", 13) >= 18:  # ReduceMax takes its axes as an input from opset 18
            nodes.append(helper.make_node("Constant", [], ["axis"],
                                          value=helper.make_tensor("axis", TensorProto.INT64, [1], [axis])))
            reduce = helper.make_node("ReduceMax", [args[0], "axis"], ["row_max"], keepdims=1, name="row_max")
        else:
            reduce = helper.make_node("ReduceMax", [args[0]], ["row_max"], axes=[axis], keepdims=1, name="row_max")
        nodes += [reduce, helper.make_node("Sub", [args[0], "row_max"], ["shifted"], name="shift")]
        args[0] = "shifted"
    op = helper.make_node(inner.op_type, args, ["f_of_mean"], name="op", domain=inner.domain)
    op.attribute.extend(inner.attribute)
    guarded = standard and inner.op_type in GUARDED
    if totals and (guarded or not scaled):
        raise ValueError(f"{name}: totals need a scaled function of an op that is not guarded")
    if scaled:  # t·scale is small (the scale's shape); the totals take it in the one Mul they had
        nodes.append(helper.make_node("Mul", ["t", "scale"], ["t_scaled"], name="scale"))
    nodes += [op, helper.make_node("Mul", ["f_of_mean", "t_scaled" if scaled else "t"],
                                   ["raw_total" if guarded else "total_next"], name="total")]
    if guarded:  # keep the previous total where t·f(means) is inf / NaN: the op emits 0 there
        nodes += [helper.make_node("IsNaN", ["raw_total"], ["nan"], name="is_nan"),
                  helper.make_node("IsInf", ["raw_total"], ["inf"], name="is_inf"),
                  helper.make_node("Or", ["nan", "inf"], ["not_finite"], name="not_finite"),
                  helper.make_node("Where", ["not_finite", "total", "raw_total"], ["total_next"], name="guard")]
    if totals:
        return helper.make_function(
            DOMAIN, name, xs + sums + ["t"] + ts + consts + ["scale"], ["total_next"] + sums_next,
            nodes, [helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
            doc_string=f"Expectation-compensated {inner.op_type}, totals form: emits t·f(S_t/t)·scale for the "
                       "running sums S of its time-varying inputs (the neuron after it integrates totals).")
    nodes.append(helper.make_node("Sub", ["total_next", "total"], ["y"], name="increment"))
    return helper.make_function(
        DOMAIN, name, xs + sums + ["total", "t"] + ts + consts + (["scale"] if scaled else []),
        ["y"] + sums_next + ["total_next"],
        nodes, [helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
        doc_string=f"Expectation-compensated {inner.op_type}: emits t·f(S_t/t) − (t−1)·f(S_(t−1)/(t−1)) for the "
                   "running sums S of its time-varying inputs, so its outputs sum to t·f(mean input).")


def step_counter_nodes(count: str, count_next: str, ranks: Sequence[int]
                       ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], dict[int, str]]:
    """A step counter as plain ONNX (what passes/_compensation.py emits with graphsurgeon):
    ``count_next = count + 1`` for a [N, 1] state, and t reshaped to [N, 1, ..., 1] for each rank.
    Returns (nodes, initializers, rank -> tensor name), for graphs built by hand."""
    nodes = [helper.make_node("Add", [count, f"{count}/one"], [count_next], name=f"{count}/step")]
    inits = [onnx.numpy_helper.from_array(np.ones(1, np.float32), f"{count}/one")]
    names: dict[int, str] = {}
    for rank in sorted(set(ranks)):
        if rank == 2:
            names[rank] = count_next
            continue
        names[rank] = f"{count}/rank{rank}"
        inits.append(onnx.numpy_helper.from_array(np.array([-1] + [1] * (rank - 1), np.int64), f"{count}/shape{rank}"))
        nodes.append(helper.make_node("Reshape", [count_next, f"{count}/shape{rank}"], [names[rank]]))
    return nodes, inits, names


def compensated_reference(f: Callable[..., np.ndarray], xs: Sequence[np.ndarray], sums: Sequence[np.ndarray],
                          total: np.ndarray, count: np.ndarray, guarded: bool = False,
                          scale: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """numpy reference of one step: (y, sums_next, total_next, count_next); ``f`` takes the means.
    ``guarded``: keep the previous total where t·f(means) is not finite (the GUARDED ops);
    ``scale``: the totals are t·f(means)·scale (``compensated_function(scaled=True)``)."""
    count_next = (count + 1).astype(np.float32)
    t = np.float32(count_next.max())
    sums_next = [(s + x).astype(np.float32) for s, x in zip(sums, xs)]
    factor = t if scale is None else (t * np.asarray(scale, np.float32)).astype(np.float32)
    with np.errstate(all="ignore"):
        total_next = (np.asarray(f(*[s / t for s in sums_next]), np.float32) * factor).astype(np.float32)
    if guarded:
        total_next = np.where(np.isfinite(total_next), total_next, total).astype(np.float32)
    return (total_next - total).astype(np.float32), sums_next, total_next, count_next
