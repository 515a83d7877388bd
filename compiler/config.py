"""The one frozen configuration every pass reads its options from.

Each field maps one to one onto a ``compile`` CLI flag (``iters`` is ``--iters``,
``granularity`` is ``--granularity``, ...).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .device import check_device, require_cuda_provider
from .errors import ConfigError

METHODS = ("ltb", "max", "percentile")
GRANULARITIES = ("channel", "layer")
MAXPOOL_MODES = ("cumulative", "instant")
NEURONS = ("if", "signed")
#: how a nonlinear op on a time-varying signal is run (``--nonlinear``)
NONLINEAR_MODES = ("analog", "compensate")
#: where the neuron of a signed activation site sits (``--signed-sites``, docs/signed_activations.md):
#: ``auto`` (LeakyReLU and PReLU as ``output`` sites, the smooth ones as ordinary analog ops), on
#: the op's output (the op compensated on its input current), on its input current (the op
#: compensated on the neuron's spikes), or nowhere (an ordinary analog op, as before)
SIGNED_SITE_FORMS = ("auto", "output", "input", "off")
#: the form ``auto`` gives LeakyReLU / PReLU (benchmarks/results/signed_activations.md)
AUTO_SIGNED_FORM = "output"
#: options added after format 1 of the metadata: recorded only when they differ from their
#: defaults, so that a model compiled with the defaults keeps the bytes it had before them
LATER_OPTIONS = ("signed_sites", "respike", "resolution", "respike_currents")
#: what ``eval --task`` scores: top-1 accuracy, mIoU, mAP (ann2snn.analysis.tasks)
TASKS = ("classification", "segmentation", "detection")
#: the options a recipe sets (the recipe search, ann2snn.search, varies them); every other option is the caller's
RECIPE_FIELDS = ("method", "granularity", "neuron", "burst", "keep_clip_cap", "resolution")
#: without --target-T and without a recipe option, the search runs on networks with at least this many
#: neuron layers on one path from input to output. Measured (README "Defaults and why"): every reference
#: network on which the default recipe converges has at most 13 (the DenseNet stand-in; the Fashion
#: networks 6-7), MobileNetV2 35 and EfficientNet-Lite1 43, on which it plateaus far below the ANN
DEEP_CHAIN = 20
#: the T that default search scores at (issue 15's first target: agreement at T = 64)
DEFAULT_TARGET_T = 64


@dataclass(frozen=True)
class CompileConfig:
    """Options of the conversion.

    method: threshold calibration: local threshold balancing (``ltb``), max-norm or
        percentile norm.
    iters: LTB iterations K (batches fed); for max/percentile, the number of batches seen.
    batch: calibration batch size B.
    granularity: one threshold per channel/neuron or per layer.
    eta: LTB step size (1.0 in the authors' code).
    percentile: the percentile used by ``method='percentile'``.
    v0: initial membrane potential as a fraction of the threshold (0.5 rounds).
    keep_clip_cap: for Clip(0, c) / ReLU6, keep thresholds <= c so the ANN's cap holds.
    seed: seed of the calibration sampler (recorded in the output's metadata).
    maxpool: how a pre-neuron MaxPool whose current varies in time is run. ``cumulative``
        pools the running sum of the current and feeds the neuron its increment, so the
        neuron's total input is exactly T·maxpool(mean current); ``instant`` pools each
        step's current (the paper's rule, biased upwards when the current fluctuates).
    neuron: the neuron model. ``if``: integrate-and-fire with reset by subtraction, 0/1 spikes
        (the paper's). ``signed``: the same, plus a negative spike that takes back an earlier
        spike when the membrane falls below 0, so that every neuron's spike count tracks its
        rounded cumulative input at every step; much faster convergence on deep networks
        (MobileNetV2), one more state per neuron and a few more elementwise ops per step.
    burst: the most spikes (or take-backs) a neuron that can burst may emit in one step: the
        signed neuron of a ReLU site (``neuron='signed'``) and the symmetric neuron of a signed
        activation site or re-spiked compensated op (``SymmetricBurstIFNeuron``; with
        ``neuron='if'`` only these burst, and a network without them refuses a burst above 1);
        1 is the plain neuron, N > 1 emits integer-valued bursts so that a step bringing more
        than θ does not leave the count behind.
    resolution: each threshold θ of a neuron that can burst (as for ``burst``) is divided by
        this integer N and the neuron may emit up to N·burst spikes of θ/N per step: the same most per step
        (burst·θ, and never above a kept ReLU6 cap), N times finer steps, so the rounding error
        of each neuron falls like θ/(N·T) instead of θ/T, at up to N times the spike count. The
        largest spike magnitude per step is N·burst (the cost report counts every spike).
    nonlinear: what becomes of a nonlinear op (Softmax, LayerNorm, GELU, a product of two
        activations, ...) whose input varies in time. ``analog``: it ends the spiking part and
        runs, with everything after it, in the analog tail on the readout. ``compensate``:
        expectation compensation keeps it in the step graph; it keeps the running sums of its
        time-varying inputs and emits the increment of t·f(mean input) (docs/compensation.md).
    signed_sites: what becomes of LeakyReLU, PReLU, SiLU, GELU and HardSwish (activations with a
        negative part). ``auto``: LeakyReLU and PReLU become ``output`` sites (without, they are an
        error inside the spiking part), SiLU, GELU and HardSwish stay as with ``off``. ``output``: the op is applied with expectation compensation to its input
        current and a symmetric signed neuron (spikes of ±1) sits on its output, so the next
        weighted op reads signed spikes. ``input``: the signed neuron sits on the input current
        and the op is applied with expectation compensation to its spikes. ``off``: an ordinary
        analog op (LeakyReLU / PReLU inside the spiking part are then an error, the others end it
        or are compensated with ``nonlinear='compensate'``).
    respike: with ``nonlinear='compensate'``, a compensated op whose output reaches a weighted op
        (Conv, ConvTranspose, Gemm, MatMul with a constant weight) gets a symmetric signed neuron on
        its output, so that the weighted op reads spikes, not real-valued increments.
    respike_currents: a weighted op (Conv, Gemm, MatMul with a constant weight) that reads the
        current of another weighted op with no neuron between them (a MobileNet-style linear
        bottleneck: projection Conv -> residual Add -> expand Conv) gets a symmetric signed neuron
        on that input (a signed site of kind ``current``), so that it reads spikes instead of a
        real-valued current at every step; the current's other readers (the residual path) keep
        it exact. Off by default: it adds neurons to networks that compile today.
    strict: a non-spike-compatible op inside the spiking part is an error instead of
        ending the spiking part there with a warning.
    spiking_until: tensors whose consumers, and everything after them, run in the analog
        tail (the boundary placed by hand).
    threads: onnxruntime intra-op threads for calibration (0: its default). The output
        is byte-identical whatever the value.
    device: where the calibration (and the recipe search's simulations) run: ``cpu``, or
        ``cuda`` (one GPU through onnxruntime-gpu, README "One GPU"). Thresholds calibrated on
        a GPU can differ from the CPU's in the last bits (its convolutions sum in another order).
    resize, crop, crop_mode, mean, std, channel_order, layout: how image files (a class
        folder or list file given as data) become inputs; recorded in the compiled model so
        that run and eval apply the same (see ann2snn.data.images.Preprocess).
    max_memory: refuse a calibration whose estimated memory exceeds this many GiB
        (0: 75% of physical memory).
    progress: show a progress bar on stderr during calibration.
    ray: calibrate on Ray workers (``pip install 'ann2snn[ray]'``): '' in this process,
        ``local`` on a cluster started on this machine, else the address of one (``auto``,
        ``ray://host:port``). Each worker reads its part of every batch from the data file or
        image folder; the thresholds are those of one process with the same ``batch`` (to float
        rounding). ``threads`` sets each worker's threads (default 1).
    target_T: with T > 0, choose the recipe (method, granularity, neuron, burst, clip cap) from
        the data: part of the calibration set is held out, candidate recipes are compiled on
        the rest and simulated on it for T steps, and the best (top-1 agreement with the ANN,
        then relative output error) is compiled on the whole set (ann2snn.search). 0: no search,
        the options as given. None (the default): a search at T = 64 when the network is deep
        (DEEP_CHAIN neuron layers or more on one path) and no recipe option was
        given, else none (DEEP_CHAIN, ann2snn.search.default_target_T).
    search_budget: seconds the recipe search may spend; the first candidate always runs, a
        later one only if it is expected to finish within the budget.
    min_agreement: a search whose best candidate agrees with the ANN on fewer than this
        fraction of the held-out samples stops with an error naming the figures and the best
        recipe instead of writing a poor model (0: write the best whatever it scores).
    """

    method: str = "ltb"
    iters: int = 200
    batch: int = 64
    granularity: str = "channel"
    eta: float = 1.0
    percentile: float = 99.99
    v0: float = 0.5
    keep_clip_cap: bool = True
    seed: int = 0
    maxpool: str = "cumulative"
    neuron: str = "if"
    burst: int = 1
    resolution: int = 1
    nonlinear: str = "analog"
    signed_sites: str = "auto"
    respike: bool = True
    respike_currents: bool = False
    strict: bool = False
    spiking_until: tuple[str, ...] = ()
    threads: int = 0
    device: str = "cpu"
    max_memory: float = 0.0
    resize: int = 0
    crop: int = 0
    crop_mode: str = "center"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    channel_order: str = "RGB"
    layout: str = "NCHW"
    progress: bool = False
    ray: str = ""
    target_T: int | None = None
    search_budget: float = 120.0
    min_agreement: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method '{self.method}' is unknown; use one of {', '.join(METHODS)} (--method)")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity '{self.granularity}' is unknown; use one of {', '.join(GRANULARITIES)} (--granularity)"
            )
        if isinstance(self.spiking_until, str) or not isinstance(self.spiking_until, tuple):
            object.__setattr__(self, "spiking_until",
                               (self.spiking_until,) if isinstance(self.spiking_until, str) else tuple(self.spiking_until))
        if self.maxpool not in MAXPOOL_MODES:
            raise ConfigError(f"maxpool '{self.maxpool}' is unknown; use one of {', '.join(MAXPOOL_MODES)} (--maxpool)")
        if self.neuron not in NEURONS:
            raise ConfigError(f"neuron '{self.neuron}' is unknown; use one of {', '.join(NEURONS)} (--neuron)")
        if self.nonlinear not in NONLINEAR_MODES:
            raise ConfigError(f"nonlinear '{self.nonlinear}' is unknown; use one of {', '.join(NONLINEAR_MODES)} "
                              "(--nonlinear)")
        if self.signed_sites not in SIGNED_SITE_FORMS:
            raise ConfigError(f"signed_sites '{self.signed_sites}' is unknown; use one of "
                              f"{', '.join(SIGNED_SITE_FORMS)} (--signed-sites)")
        if isinstance(self.burst, bool) or int(self.burst) != self.burst or self.burst < 1:
            raise ConfigError(f"burst is the most spikes per neuron and step, an integer >= 1, got {self.burst!r} "
                              "(--burst)")
        if isinstance(self.resolution, bool) or int(self.resolution) != self.resolution or self.resolution < 1:
            raise ConfigError(f"resolution divides the thresholds, an integer >= 1, got {self.resolution!r} "
                              "(--resolution)")
        if self.iters <= 0:
            raise ConfigError(f"iters must be a positive number of calibration batches, got {self.iters} (--iters)")
        if self.batch <= 0:
            raise ConfigError(f"batch must be a positive batch size, got {self.batch} (--batch)")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must lie in (0, 100], got {self.percentile} (--percentile)")
        if not 0.0 <= self.v0 < 1.0:
            raise ConfigError(f"v0 is a fraction of the threshold in [0, 1), got {self.v0} (--v0)")
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                if isinstance(value, str):
                    value = tuple(float(v) for v in value.split(",") if v.strip())
                object.__setattr__(self, name, tuple(float(v) for v in value))
            except (TypeError, ValueError):
                raise ConfigError(f"{name} takes comma-separated numbers, one per channel, got {value!r} "
                                  f"(--{name})") from None
        self.preprocess()  # validates the image options
        if self.max_memory < 0:
            raise ConfigError(f"max_memory is a size in GiB (0: the default), got {self.max_memory} (--max-memory)")
        check_device(self.device)
        if self.ray and self.device != "cpu":
            raise ConfigError("ray calibrates on CPU workers for now: drop --ray to calibrate on one GPU with "
                              "--device cuda, or drop --device cuda to calibrate over Ray")
        if self.device == "cuda":  # before the pipeline, not at the first calibration batch
            require_cuda_provider()
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: onnxruntime's default), got {self.threads} (--threads)")
        if self.target_T is not None and (isinstance(self.target_T, bool) or int(self.target_T) != self.target_T
                                          or self.target_T < 0):
            raise ConfigError(f"target_T is the number of timesteps the recipe search scores at (0: no search; "
                              f"unset: a search on deep networks only), got {self.target_T!r} (--target-T)")
        if not self.search_budget > 0:
            raise ConfigError(f"search_budget is a number of seconds > 0, got {self.search_budget} (--search-budget)")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError(f"min_agreement is a fraction in [0, 1], got {self.min_agreement} (--min-agreement)")
        if self.eta <= 0:
            raise ConfigError(f"eta must be positive, got {self.eta} (--eta)")

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (recorded in the compiled model's metadata)."""
        d = asdict(self)
        for runtime_only in ("progress", "threads", "max_memory", "ray", "device"):  # they do not change the output
            d.pop(runtime_only)
        # the search chooses the recipe, which these options then state in full: the model records the
        # search under its own key (ann2snn.search), so compiling the chosen options gives the same bytes
        for search_only in ("target_T", "search_budget", "min_agreement"):
            d.pop(search_only)
        for later in LATER_OPTIONS:
            if d[later] == getattr(CompileConfig, later):
                d.pop(later)
        d["spiking_until"] = list(d["spiking_until"])
        d["mean"], d["std"] = list(d["mean"]), list(d["std"])
        return d

    def preprocess(self) -> Any:
        """The image preprocessing these options declare (an ann2snn.data.images.Preprocess)."""
        from .data.images import Preprocess

        return Preprocess(self.resize, self.crop, self.crop_mode, tuple(self.mean), tuple(self.std),
                          self.channel_order, self.layout)

    @classmethod
    def from_options(cls, **options: Any) -> "CompileConfig":
        """Build a config from keyword options, naming any unknown option."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known options are {', '.join(sorted(known))}")
        return cls(**options)
