"""The op support table: one place that says what each ONNX op becomes.

Roles, as data (op type in the default ``ai.onnx`` domain -> role):

- ``neuron``: an activation site; becomes an IF neuron (ReLU, and Clip(0, c) / ReLU6).
- ``affine``: correct on spike trains because it commutes with averaging over time
  (linear maps, constant shifts, re-layouts); may sit anywhere in the spiking part.
- ``prepool``: MaxPool / GlobalMaxPool. Before a neuron (pre-neuron max pooling) or
  anywhere on a time-varying signal, it pools the running sum of its input and passes on
  the increment (``--maxpool cumulative``), so its time average is exactly the max pool of
  the input's time average. With ``--maxpool instant`` only pre-neuron pools spike.
- ``removed``: disappears during normalisation or folding (Identity, Dropout, BatchNorm, ...).
- ``rejected``: cannot be converted at all (control flow, recurrence, randomness).

Any other op is allowed where its inputs are constant in time (the analog prefix that
feeds the first neurons, recomputed identically at every step) or in the analog tail,
which runs once on the readout. Where such an op consumes spikes with neurons after it,
the spiking part ends there.
"""
from __future__ import annotations

NEURON = "neuron"
AFFINE = "affine"
PREPOOL = "prepool"
REMOVED = "removed"
REJECTED = "rejected"

OP_ROLES: dict[str, str] = {
    # activation sites
    "Relu": NEURON,
    "Clip": NEURON,  # only Clip(0, c) / Clip(0, inf); other clips are rejected by find_activations
    # affine on spikes
    "Conv": AFFINE,
    "ConvTranspose": AFFINE,
    "Gemm": AFFINE,
    "MatMul": AFFINE,  # with a constant operand
    "Add": AFFINE,
    "Sub": AFFINE,
    "Mul": AFFINE,  # by a constant
    "Div": AFFINE,  # by a constant
    "Sum": AFFINE,
    "Neg": AFFINE,
    "AveragePool": AFFINE,
    "GlobalAveragePool": AFFINE,
    "Pad": AFFINE,
    "Flatten": AFFINE,
    "Reshape": AFFINE,
    "Transpose": AFFINE,
    "Squeeze": AFFINE,
    "Unsqueeze": AFFINE,
    "Concat": AFFINE,
    "Slice": AFFINE,
    "Split": AFFINE,
    "Resize": AFFINE,
    "Upsample": AFFINE,
    # pooling that needs the pre-neuron rule
    "MaxPool": PREPOOL,
    "GlobalMaxPool": PREPOOL,
    # removed by normalisation or folding
    "Identity": REMOVED,
    "Dropout": REMOVED,
    "BatchNormalization": REMOVED,
    "Constant": REMOVED,
    # cannot be converted
    "Loop": REJECTED,
    "If": REJECTED,
    "Scan": REJECTED,
    "LSTM": REJECTED,
    "GRU": REJECTED,
    "RNN": REJECTED,
    "RandomNormal": REJECTED,
    "RandomNormalLike": REJECTED,
    "RandomUniform": REJECTED,
    "RandomUniformLike": REJECTED,
    "Multinomial": REJECTED,
    "Bernoulli": REJECTED,
}

#: which inputs of an affine op may vary in time (the others must be constant in time):
#: "any", "first" (the data input; weights, shapes, divisors constant), or "one" (exactly
#: one of the first two, e.g. MatMul with one constant operand).
VARYING_INPUTS: dict[str, str] = {
    "Add": "any", "Sub": "any", "Sum": "any", "Concat": "any",
    "Mul": "one", "MatMul": "one", "Gemm": "first",
}

#: activations with a negative part, which IF neurons (positive spikes only) cannot carry
NEGATIVE_SLOPE = ("LeakyRelu", "PRelu")
#: fixed one-input activations with a negative part that become signed activation sites
#: (``--signed-sites``, docs/signed_activations.md): a symmetric signed neuron and the op under
#: expectation compensation. Standard ops (PReLU with a constant slope) ...
SIGNED_ACTIVATIONS = frozenset({"LeakyRelu", "PRelu", "HardSwish", "Gelu"})
#: ... and the model-local functions of canonicalize_activations (ann2snn.activations domain)
SIGNED_ACTIVATION_FUNCTIONS = frozenset({"SiLU", "HardSwish", "Gelu", "GeluTanh"})

REJECT_REASONS: dict[str, tuple[str, str]] = {
    "control": (
        "is control flow, which ann2snn does not convert",
        "export the model with the control flow unrolled (e.g. torch.onnx.export with fixed shapes)",
    ),
    "recurrent": (
        "is a recurrent layer; IF neurons replace feed-forward ReLU activations only",
        "convert a feed-forward model, or export the recurrent part separately",
    ),
    "random": (
        "draws random numbers, so the network's output is not a function of its input",
        "export the model in eval mode without random ops",
    ),
    "domain": (
        "belongs to a custom operator domain, which onnxruntime cannot run without its library",
        "export the model with standard ONNX ops only",
    ),
}

_REJECT_KIND = {
    "Loop": "control",
    "If": "control",
    "Scan": "control",
    "LSTM": "recurrent",
    "GRU": "recurrent",
    "RNN": "recurrent",
}

#: ONNX opsets the compiler accepts; older models are upgraded to MIN_OPSET first.
MIN_OPSET = 13
OLDEST_OPSET = 6
NEWEST_OPSET = 23


#: operator domains onnxruntime runs without extra libraries
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
#: the model-local functions canonicalize_activations writes where the model's opset has no
#: standard op (SiLU, HardSwish, Gelu, GeluTanh, LayerNormalization): ordinary analog ops
ACTIVATION_DOMAIN = "ann2snn.activations"

#: activations other than ReLU: they stay analog (in the time-constant prefix or the tail) until
#: spiking forms exist for them; ``ann2snn inspect`` gives this reason for each
ANALOG_ACTIVATIONS = ("Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "SiLU", "Gelu", "GeluTanh", "Elu", "Selu",
                      "Softplus", "Softsign", "Mish", "Erf", "Exp")
NORMALISERS = ("Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
               "LpNormalization", "ReduceMax", "ReduceMin", "ReduceL2", "ArgMax", "ArgMin")


#: ops that ``--nonlinear compensate`` keeps in the spiking part by expectation compensation
#: (runtime/compensation.py): deterministic, float-valued functions of their inputs, so that
#: f(mean input) is what the ANN computes on converged inputs. Ops with integer or index
#: outputs (ArgMax, TopK, NonMaxSuppression, Shape) are absent: they stay in the analog tail.
COMPENSABLE = frozenset({
    "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Erf",
    "Exp", "Log", "Sqrt", "Reciprocal", "Pow", "Abs", "Relu", "LeakyRelu", "PRelu", "Gelu", "Max", "Min",
    "Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "LpNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceMin", "ReduceL1",
    "ReduceL2", "ReduceLogSumExp", "Mul", "Div", "MatMul", "Gemm", "Conv", "Einsum",
})
#: the model-local activation functions (canonicalize_activations) compensation wraps too
COMPENSABLE_FUNCTIONS = frozenset({"SiLU", "HardSwish", "Gelu", "GeluTanh", "LayerNormalization"})


def compensable(op_type: str, domain: str = "") -> bool:
    """Whether ``--nonlinear compensate`` may wrap the op (see COMPENSABLE)."""
    if domain == ACTIVATION_DOMAIN:
        return op_type in COMPENSABLE_FUNCTIONS
    return domain in ("", "ai.onnx") and op_type in COMPENSABLE


def signed_activation(op_type: str, domain: str = "") -> bool:
    """Whether the op may become a signed activation site (see SIGNED_ACTIVATIONS)."""
    if domain == ACTIVATION_DOMAIN:
        return op_type in SIGNED_ACTIVATION_FUNCTIONS
    return domain in ("", "ai.onnx") and op_type in SIGNED_ACTIVATIONS


def role(op_type: str, domain: str = "") -> str | None:
    """The role of an op, or None when it is an ordinary analog op (see module doc)."""
    if domain == ACTIVATION_DOMAIN:
        return None
    if domain not in STANDARD_DOMAINS:
        return REJECTED
    if domain == "ai.onnx.ml":
        return None
    return OP_ROLES.get(op_type)


def spike_safe(op_type: str, domain: str, varying: list[bool]) -> bool:
    """Whether an affine op stays correct on spikes, given which of its inputs vary in time."""
    if role(op_type, domain) != AFFINE:
        return False
    rule = VARYING_INPUTS.get(op_type, "first")
    if rule == "any":
        return True
    if rule == "one":
        return sum(varying[:2]) == 1 and not any(varying[2:])
    return not any(varying[1:])


def analog_reason(op_type: str, domain: str, varying: list[bool]) -> str:
    """Why a node that reads a time-varying signal is not correct on spikes (for ``inspect``)."""
    if op_type in ANALOG_ACTIVATIONS:
        return (f"{op_type} is a non-ReLU activation: IF neurons replace ReLU-like activations only, so it runs "
                "analog on the readout")
    if op_type in NORMALISERS:
        return f"{op_type} normalises over its inputs, which is not linear in spikes"
    if op_type in ("MatMul", "Mul", "Div") and sum(varying) > 1:
        return f"{op_type} of two time-varying signals (e.g. attention) is not linear in spikes"
    if op_type in NEGATIVE_SLOPE:
        return f"{op_type} has a negative slope, which IF neurons (positive spikes only) cannot carry"
    if role(op_type, domain) == AFFINE:
        return f"{op_type} with a time-varying operand where a constant is needed is not linear in spikes"
    return f"{op_type} is not linear in its time-varying input, so it runs analog on the readout"


def reject_reason(op_type: str, domain: str = "") -> tuple[str, str]:
    """(problem, remedy) for a rejected op."""
    if domain not in STANDARD_DOMAINS:
        return REJECT_REASONS["domain"]
    return REJECT_REASONS[_REJECT_KIND.get(op_type, "random")]
