"""The spiking neurons as ONNX model-local functions.

``ann2snn::IFNeuron(current, v, threshold) -> (spikes, v_next)``:
``v' = v + current``; ``spikes = (v' >= threshold)`` as 0/1 floats; ``v_next = v' - threshold * spikes``
(reset by subtraction).

``ann2snn::SignedIFNeuron(current, v, count, threshold) -> (spikes, v_next, count_next)``: the
same, plus a negative spike (-1) when ``v' < 0`` and the neuron's net spike count ``count`` is
positive (it takes back a spike it fired too early), with ``v_next = v' + threshold`` and
``count_next = count + spikes``. With v(0) = θ/2 and per-step currents below θ, the count after
t steps is ``max(0, round(Σ current / θ))`` at every t, not only in the time average: an early
surplus of input is corrected instead of being carried to the end (the "signed neuron"
remedy for the unevenness error of converted SNNs).

``ann2snn::SignedBurstIFNeuron(current, v, count, threshold, max_spikes) -> (spikes, v_next,
count_next)`` (``--neuron signed --burst N``): the signed neuron allowed to move its count by up
to ``max_spikes`` per step (a burst of N spikes, as an integer-valued spike): spikes =
clip(floor(v' / θ), max(-count, -N), N). It does not fall behind when one step brings more than θ.

``ann2snn::SymmetricIFNeuron(current, v, threshold) -> (spikes, v_next)``: the neuron of the
signed activation sites (LeakyReLU, PReLU, SiLU, GELU, HardSwish and the outputs of
expectation-compensated ops, docs/signed_activations.md): a spike of +1 when ``v' >= θ`` and of
-1 when ``v' < 0``, whatever its count (computed as clip(floor(v' / θ), -1, 1)), and
``v_next = v' - θ·spikes``. With v(0) = θ/2 and
per-step currents in [-θ, θ] the membrane stays in [0, θ), so its net count after t steps is
``round(Σ current / θ)`` for either sign: it stands for clip(x, -θ, θ), in steps of θ.

``ann2snn::UnitSymmetricIFNeuron(current, v)`` and ``UnitSymmetricBurstIFNeuron(current, v,
max_spikes)``: the same two neurons with θ = 1, current and membrane in units of θ (spikes =
clip(floor(v'), -N, N), ``v_next = v' - spikes``): what a site on a compensated op's output is
compiled to, the op emitting its increments divided by θ (runtime/compensation.py, ``scale``).

``ann2snn::SymmetricBurstIFNeuron(current, v, threshold, max_spikes) -> (spikes, v_next)``
(signed sites with ``--burst`` / ``--resolution``): the symmetric neuron allowed up to
``max_spikes`` spikes of either sign per step: spikes = clip(floor(v' / θ), -N, N),
``v_next = v' - θ·spikes``. With N = 1 it fires exactly when SymmetricIFNeuron does; with
v(0) = θ/2 and per-step currents in [-Nθ, Nθ] its net count after t steps is
``round(Σ current / θ)``.

Because they are FunctionProtos inside the model, stock onnxruntime inlines and runs them; no
compiled extension is needed.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "ann2snn"
IF_OP = "IFNeuron"
SIGNED_OP = "SignedIFNeuron"
BURST_OP = "SignedBurstIFNeuron"
SYMMETRIC_OP = "SymmetricIFNeuron"
SYMMETRIC_BURST_OP = "SymmetricBurstIFNeuron"
#: the symmetric neurons in units of their thresholds: the current arrives divided by θ (the
#: compensated op before them scales its totals), the membrane is v/θ, no threshold input
UNIT_SYMMETRIC_OP = "UnitSymmetricIFNeuron"
UNIT_SYMMETRIC_BURST_OP = "UnitSymmetricBurstIFNeuron"
#: the same, integrating the totals of the compensated op before them (its state: membrane − total)
TOTAL_SYMMETRIC_OP = "UnitSymmetricTotalIFNeuron"
TOTAL_SYMMETRIC_BURST_OP = "UnitSymmetricTotalBurstIFNeuron"
#: the neurons of signed activation sites and re-spiked compensated ops (no count state)
SYMMETRIC_OPS = (SYMMETRIC_OP, SYMMETRIC_BURST_OP, UNIT_SYMMETRIC_OP, UNIT_SYMMETRIC_BURST_OP, TOTAL_SYMMETRIC_OP,
                 TOTAL_SYMMETRIC_BURST_OP)
#: the ops whose second and third inputs are the membrane and the spike-count states
COUNTING_OPS = (SIGNED_OP, BURST_OP)
#: every neuron op of the domain
NEURON_OPS = (IF_OP, *COUNTING_OPS, *SYMMETRIC_OPS)
#: the neuron ops whose spikes may be negative (the cost report counts |spikes|; NIR cannot say them)
SIGNED_SPIKE_OPS = (*COUNTING_OPS, *SYMMETRIC_OPS)
#: the threshold given to channels that never activated during calibration: they never fire
DEAD_THRESHOLD = 1e30
#: runtime-only: IFNeuron with its threshold folded into its input (membrane in units of θ);
#: never written to a compiled model (runtime/unitform.py derives it at load time)
UNIT_IF_OP = "UnitIFNeuron"
#: HardSigmoid(x) = clip(ALPHA·x + BETA, 0, 1) is exactly the step (x >= 1) in float32: ALPHA·x
#: is exact (a power of two), and for x in [0.5, 1), whose spacing is 2**-24, ALPHA·x + BETA is
#: an exact integer <= 0; below 0.5 it is < 0, from 1 on it is >= 1
UNIT_STEP_ALPHA = float(2 ** 24)
UNIT_STEP_BETA = float(1 - 2 ** 24)


def if_neuron_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of IFNeuron for a model whose ai.onnx opset is ``opset`` (>= 13)."""
    nodes = [
        helper.make_node("Add", ["v", "current"], ["v_charged"], name="integrate"),
        helper.make_node("GreaterOrEqual", ["v_charged", "threshold"], ["fire"], name="compare"),
        helper.make_node("Cast", ["fire"], ["spikes"], to=TensorProto.FLOAT, name="to_spikes"),
        helper.make_node("Mul", ["spikes", "threshold"], ["discharge"], name="discharge"),
        helper.make_node("Sub", ["v_charged", "discharge"], ["v_next"], name="reset_by_subtraction"),
    ]
    return helper.make_function(
        DOMAIN, IF_OP, ["current", "v", "threshold"], ["spikes", "v_next"], nodes,
        [helper.make_opsetid("", opset)],
        doc_string="Integrate-and-fire neuron with reset by subtraction; spikes are 0/1.",
    )


def signed_if_neuron_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of SignedIFNeuron for a model whose ai.onnx opset is ``opset`` (>= 13)."""
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Add", ["v", "current"], ["v_charged"], name="integrate"),
        helper.make_node("GreaterOrEqual", ["v_charged", "threshold"], ["fire"], name="compare"),
        helper.make_node("Less", ["v_charged", "zero"], ["below"], name="below_zero"),
        helper.make_node("Greater", ["count", "zero"], ["owed"], name="has_fired"),
        helper.make_node("And", ["below", "owed"], ["take_back"], name="take_back"),
        helper.make_node("Cast", ["fire"], ["up"], to=TensorProto.FLOAT, name="to_up"),
        helper.make_node("Cast", ["take_back"], ["down"], to=TensorProto.FLOAT, name="to_down"),
        helper.make_node("Sub", ["up", "down"], ["spikes"], name="signed_spikes"),
        helper.make_node("Mul", ["spikes", "threshold"], ["discharge"], name="discharge"),
        helper.make_node("Sub", ["v_charged", "discharge"], ["v_next"], name="reset_by_subtraction"),
        helper.make_node("Add", ["count", "spikes"], ["count_next"], name="count"),
    ]
    return helper.make_function(
        DOMAIN, SIGNED_OP, ["current", "v", "count", "threshold"], ["spikes", "v_next", "count_next"], nodes,
        [helper.make_opsetid("", opset)],
        doc_string="Integrate-and-fire neuron with reset by subtraction and signed spikes (+1, or -1 when the "
                   "membrane falls below 0 while the net spike count is positive).",
    )


def signed_burst_if_neuron_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of SignedBurstIFNeuron for a model whose ai.onnx opset is ``opset`` (>= 13)."""
    nodes = [
        helper.make_node("Add", ["v", "current"], ["v_charged"], name="integrate"),
        helper.make_node("Div", ["v_charged", "threshold"], ["ratio"], name="in_thresholds"),
        helper.make_node("Floor", ["ratio"], ["whole"], name="whole_thresholds"),
        helper.make_node("Neg", ["count"], ["owed"], name="owed"),
        helper.make_node("Max", ["whole", "owed"], ["not_below_count"], name="take_back_at_most_count"),
        helper.make_node("Neg", ["max_spikes"], ["min_spikes"], name="min_spikes"),
        helper.make_node("Max", ["not_below_count", "min_spikes"], ["above_min"], name="burst_floor"),
        helper.make_node("Min", ["above_min", "max_spikes"], ["spikes"], name="burst_cap"),
        helper.make_node("Mul", ["spikes", "threshold"], ["discharge"], name="discharge"),
        helper.make_node("Sub", ["v_charged", "discharge"], ["v_next"], name="reset_by_subtraction"),
        helper.make_node("Add", ["count", "spikes"], ["count_next"], name="count"),
    ]
    return helper.make_function(
        DOMAIN, BURST_OP, ["current", "v", "count", "threshold", "max_spikes"], ["spikes", "v_next", "count_next"],
        nodes, [helper.make_opsetid("", opset)],
        doc_string="Signed integrate-and-fire neuron with bursts: up to max_spikes spikes (or take-backs) per step.",
    )


def _symmetric_neuron_function(opset: int, units: str, burst: bool) -> onnx.FunctionProto:
    """One of the six symmetric neurons: ``units`` ``calibrated`` (θ an input: v' = v + current,
    spikes = clip(floor(v'/θ)), v_next = v' − θ·spikes), ``unit`` (θ = 1: v_next = v' − spikes) or
    ``total`` (θ = 1, fed the running total of its current with state u = v − total:
    v' = u + total, u_next = u − spikes); ``burst``: clipped to ±max_spikes (a scalar input)
    instead of ±1. clip(floor(v'/θ), -1, 1) is [v' >= θ] - [v' < 0] in six kernels where the two
    comparisons, two casts and their difference took eight (these neurons sit after every
    compensated op of a transformer)."""
    state, current = ("u", "total") if units == "total" else ("v", "current")
    nodes = [] if burst else [
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])),
        helper.make_node("Constant", [], ["minus_one"],
                         value=helper.make_tensor("minus_one", TensorProto.FLOAT, [], [-1.0]))]
    nodes.append(helper.make_node("Add", [state, current], ["v_charged"], name="integrate"))
    if units == "calibrated":
        nodes.append(helper.make_node("Div", ["v_charged", "threshold"], ["ratio"], name="in_thresholds"))
    nodes.append(helper.make_node("Floor", ["ratio" if units == "calibrated" else "v_charged"], ["whole"],
                                  name="whole_thresholds"))
    if burst:
        nodes += [helper.make_node("Neg", ["max_spikes"], ["min_spikes"], name="min_spikes"),
                  helper.make_node("Clip", ["whole", "min_spikes", "max_spikes"], ["spikes"], name="burst")]
    else:
        nodes.append(helper.make_node("Clip", ["whole", "minus_one", "one"], ["spikes"], name="signed_spikes"))
    if units == "calibrated":
        nodes += [helper.make_node("Mul", ["spikes", "threshold"], ["discharge"], name="discharge"),
                  helper.make_node("Sub", ["v_charged", "discharge"], ["v_next"], name="reset_by_subtraction")]
    else:  # in units of θ; for ``total`` the reset is taken from u = v − total
        nodes.append(helper.make_node("Sub", ["u" if units == "total" else "v_charged", "spikes"], [f"{state}_next"],
                                      name="reset_by_subtraction"))
    op = {("calibrated", False): SYMMETRIC_OP, ("calibrated", True): SYMMETRIC_BURST_OP,
          ("unit", False): UNIT_SYMMETRIC_OP, ("unit", True): UNIT_SYMMETRIC_BURST_OP,
          ("total", False): TOTAL_SYMMETRIC_OP, ("total", True): TOTAL_SYMMETRIC_BURST_OP}[(units, burst)]
    inputs = [current, state] + (["threshold"] if units == "calibrated" else []) + (["max_spikes"] if burst else [])
    return helper.make_function(
        DOMAIN, op, inputs, ["spikes", f"{state}_next"], nodes, [helper.make_opsetid("", opset)],
        doc_string=f"Symmetric signed integrate-and-fire neuron ({units} units{', bursts' if burst else ''}): "
                   "+1 (or up to max_spikes) when the membrane reaches the threshold, -1 (or down to -max_spikes) "
                   "below 0; the count may be negative.")


def symmetric_if_neuron_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of SymmetricIFNeuron(current, v, threshold) -> (spikes, v_next) (opset >= 13)."""
    return _symmetric_neuron_function(opset, "calibrated", burst=False)


def symmetric_burst_if_neuron_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of SymmetricBurstIFNeuron(current, v, threshold, max_spikes) -> (spikes, v_next)."""
    return _symmetric_neuron_function(opset, "calibrated", burst=True)


def unit_symmetric_if_neuron_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of UnitSymmetricIFNeuron(current, v) -> (spikes, v_next): θ = 1."""
    return _symmetric_neuron_function(opset, "unit", burst=False)


def unit_symmetric_burst_if_neuron_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of UnitSymmetricBurstIFNeuron(current, v, max_spikes) -> (spikes, v_next)."""
    return _symmetric_neuron_function(opset, "unit", burst=True)


def total_symmetric_if_neuron_function(opset: int, burst: bool = False) -> onnx.FunctionProto:
    """The FunctionProto of UnitSymmetricTotal(Burst)IFNeuron(total, u[, max_spikes]) -> (spikes, u_next):
    the unit neuron fed the running total of its current, state u = v − total; the same spikes as
    UnitSymmetricIFNeuron on the increments, one subtraction and one state fewer for the op before."""
    return _symmetric_neuron_function(opset, "total", burst)


def unit_if_neuron_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of UnitIFNeuron(current, v) -> (spikes, v_next): IFNeuron with θ = 1,
    in three elementwise kernels (integrate, a HardSigmoid that is exactly the step v' >= 1,
    reset) instead of five."""
    nodes = [
        helper.make_node("Add", ["v", "current"], ["v_charged"], name="integrate"),
        helper.make_node("HardSigmoid", ["v_charged"], ["spikes"], alpha=UNIT_STEP_ALPHA, beta=UNIT_STEP_BETA,
                         name="fire_at_one"),
        helper.make_node("Sub", ["v_charged", "spikes"], ["v_next"], name="reset_by_subtraction"),
    ]
    return helper.make_function(
        DOMAIN, UNIT_IF_OP, ["current", "v"], ["spikes", "v_next"], nodes, [helper.make_opsetid("", opset)],
        doc_string="Integrate-and-fire neuron with unit threshold and reset by subtraction; spikes are 0/1.",
    )


def neuron_op(neuron: str, burst: int = 1) -> str:
    """The op the compile options ``neuron`` ("if" / "signed") and ``burst`` select."""
    if neuron == "if":
        return IF_OP
    return BURST_OP if burst > 1 else SIGNED_OP


def neuron_function(op: str, opset: int) -> onnx.FunctionProto:
    """The FunctionProto of the neuron op ``op`` for a model whose ai.onnx opset is ``opset``."""
    return {IF_OP: if_neuron_function, SIGNED_OP: signed_if_neuron_function,
            BURST_OP: signed_burst_if_neuron_function, SYMMETRIC_OP: symmetric_if_neuron_function,
            SYMMETRIC_BURST_OP: symmetric_burst_if_neuron_function, UNIT_SYMMETRIC_OP: unit_symmetric_if_neuron_function,
            UNIT_SYMMETRIC_BURST_OP: unit_symmetric_burst_if_neuron_function,
            TOTAL_SYMMETRIC_OP: total_symmetric_if_neuron_function,
            TOTAL_SYMMETRIC_BURST_OP: lambda o: total_symmetric_if_neuron_function(o, burst=True)}[op](opset)


def if_neuron_reference(current: np.ndarray, v: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of one IFNeuron step: (spikes, v_next)."""
    charged = (v + current).astype(np.float32)
    spikes = (charged >= threshold).astype(np.float32)
    return spikes, (charged - spikes * threshold).astype(np.float32)


def signed_if_neuron_reference(current: np.ndarray, v: np.ndarray, count: np.ndarray, threshold: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy reference of one SignedIFNeuron step: (spikes, v_next, count_next)."""
    charged = (v + current).astype(np.float32)
    spikes = (charged >= threshold).astype(np.float32) - ((charged < 0) & (count > 0)).astype(np.float32)
    return spikes, (charged - spikes * threshold).astype(np.float32), (count + spikes).astype(np.float32)


def signed_burst_if_neuron_reference(current: np.ndarray, v: np.ndarray, count: np.ndarray, threshold: np.ndarray,
                                     max_spikes: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy reference of one SignedBurstIFNeuron step: (spikes, v_next, count_next)."""
    charged = (v + current).astype(np.float32)
    whole = np.floor((charged / threshold).astype(np.float32))
    m = np.float32(max_spikes)
    spikes = np.minimum(np.maximum(np.maximum(whole, -count), -m), m).astype(np.float32)
    return spikes, (charged - spikes * threshold).astype(np.float32), (count + spikes).astype(np.float32)


def symmetric_if_neuron_reference(current: np.ndarray, v: np.ndarray, threshold: np.ndarray
                                  ) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of one SymmetricIFNeuron step: (spikes, v_next)."""
    return symmetric_burst_if_neuron_reference(current, v, threshold, 1.0)


def symmetric_burst_if_neuron_reference(current: np.ndarray, v: np.ndarray, threshold: np.ndarray, max_spikes: float
                                        ) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of one SymmetricBurstIFNeuron step: (spikes, v_next)."""
    charged = (v + current).astype(np.float32)
    whole = np.floor((charged / threshold).astype(np.float32))
    m = np.float32(max_spikes)
    spikes = np.minimum(np.maximum(whole, -m), m).astype(np.float32)
    return spikes, (charged - spikes * threshold).astype(np.float32)
