"""The recipe chosen from the data: ``compile --target-T T [--search-budget S]``.

A part of the calibration set is held out (a seeded split); candidate recipes (threshold
method and granularity, neuron, burst, ReLU6 cap kept or dropped) are compiled on the rest
and simulated on the held-out part for ``target_T`` steps; each is scored by its top-1
agreement with the ANN, then by its relative output error (mean |SNN - ANN| / mean |ANN|);
agreements within one held-out sample of the best count as equal (:func:`choose`).
The best recipe is then compiled on the whole calibration set by the caller (ann2snn.api),
with the options the search recorded: those options alone give the same model.

Candidates run most promising first (measured: benchmarks/results/recipe_search.md) and
the search stops before a candidate that would not finish within the budget (the longest
candidate so far is the estimate); the first always runs. Candidates that share a calibration (method, granularity, cap) share one
calibration run: only the neuron and its emission differ. On costly models the max / percentile
candidates calibrate on a seeded subset (:func:`stats_calibration_size`): that changes their
scores and the time they take, never the model written.

Without ``--target-T`` and without a recipe option the search runs at DEFAULT_TARGET_T on deep
networks (:func:`default_target_T`, DEEP_CHAIN neuron layers on one path), where the default
recipe plateaus; shallower networks compile with the defaults, unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .config import DEEP_CHAIN, DEFAULT_TARGET_T, RECIPE_FIELDS, CompileConfig
from .data.arrays import ArrayDict, CalibrationSource
from .errors import Ann2SnnError, DataError, SearchError
from .ortsession import make_session, run_checked
from .pipeline import run_until
from .progress import progress
from .state import PassState

log = logging.getLogger(__name__)

#: share of the calibration samples held out to score the candidates, and its bounds
HOLDOUT_FRACTION = 0.25
MIN_HOLDOUT = 16
MAX_HOLDOUT = 256
#: the floor for models too costly to simulate even MIN_HOLDOUT samples within a quarter of the budget.
#: Scoring is most of such a search (MobileNetV2, 16 crops x 64 steps: 96-170 s of 165-219 s at load
#: 7-9 on 2 cores, benchmarks/results/search_time.md), and within the default budget only the first
#: candidate runs there, so the held-out part only checks --min-agreement: a recipe that agrees on 90%
#: fails a 0.5 floor on 8 samples with probability 0.0004, one that agrees on 30% passes it with 0.19
#: (on 16: 0.07)
MIN_COSTLY_HOLDOUT = 8
#: samples left to calibrate each candidate on, at least
MIN_CALIBRATION = 16
#: multiply-accumulates per second a simulation was assumed to reach on 2 cores (the MobileNetV2
#: SNN ran at about 2.9x the ANN's time per step, README "Speed and memory"); with it the held-out
#: part is sized so that scoring one candidate takes about a quarter of the budget. A constant, not
#: a timing: the split must not depend on the machine's load
SCORE_MACS_PER_S = 5e9
#: multiply-accumulates per second a max/percentile calibration was measured to reach on 2 cores
#: (MobileNetV2: 240 crops in 68 s at load 7, the activations' statistics included). With it the
#: candidates' max/percentile calibration uses at most an eighth of the budget, and never fewer than
#: MIN_STATS_CALIBRATION samples. Measured on MobileNetV2 (benchmarks/results/search_time.md): the
#: percentile candidate calibrated on 64 of the 240 crops in 39 s instead of 69 s and scored the same
#: held-out agreement (93.8%; relative error 0.212 against 0.208). The chosen recipe is then compiled
#: on the whole calibration set, so this changes the scores, never the model written
CALIB_MACS_PER_S = 1e9
MIN_STATS_CALIBRATION = 64
#: samples simulated at once when scoring (a model compiled for a fixed batch takes that batch)
SCORE_BATCH = 64


@dataclass(frozen=True)
class Recipe:
    """One candidate: the options the search varies."""

    method: str
    granularity: str
    neuron: str
    burst: int
    keep_clip_cap: bool = True
    resolution: int = 1

    @property
    def label(self) -> str:
        """A short name, e.g. ``percentile/channel signed burst 2`` (``... resolution 2``)."""
        neuron = (self.neuron + (f" burst {self.burst}" if self.burst > 1 else "")
                  + (f" resolution {self.resolution}" if self.resolution > 1 else ""))
        return f"{self.method}/{self.granularity} {neuron}" + ("" if self.keep_clip_cap else ", cap dropped")

    def options(self) -> dict[str, Any]:
        """The recipe as CompileConfig fields."""
        return {f: getattr(self, f) for f in RECIPE_FIELDS}


def candidates(target_T: int, has_cap: bool) -> list[Recipe]:
    """The candidate recipes, most promising first for ``target_T``.

    Small T (< 128): signed neurons with bursts of 2 converge fastest on deep networks
    (MobileNetV2: README "Accuracy"), LTB channel-wise is best on the shallow ones at small T.
    Large T: thresholds that do not clip (max-norm, a high percentile) let the error keep
    falling, where LTB's clipping leaves a floor (benchmarks/results/old_exports.md).
    Recipes that drop the ReLU6 cap come last and only when the model has a cap. A capped
    (mobile) network at T < 128 starts with percentile thresholds, signed neurons, bursts of 4
    and resolution 2 (thresholds θ/2, up to 8 spikes of θ/2 per step: the ceiling min(4θ, cap),
    the rounding error of T = 128 at T = 64), one threshold per layer, then per channel: measured
    on EfficientNet-Lite1 with calibration and evaluation crops from different photos, where
    per-channel percentiles clip head channels that the calibration photos hardly drive (README
    "The recipe chosen from the data"); then bursts of 2, the recipe measured on MobileNetV2.
    """
    ltb, pct, mx, layer = ("ltb", "channel"), ("percentile", "channel"), ("max", "channel"), ("ltb", "layer")
    pct_layer = ("percentile", "layer")
    s2, if_, s1 = ("signed", 2), ("if", 1), ("signed", 1)
    if target_T < 128:
        order = [(ltb, s2), (pct, s2), (ltb, if_), (mx, s2), (pct, if_), (ltb, s1), (pct, s1), (mx, if_), (mx, s1)]
        if has_cap:
            order[0], order[1] = order[1], order[0]
    else:
        order = [(mx, s2), (pct, s2), (mx, if_), (ltb, s2), (pct, if_), (ltb, if_), (mx, s1), (pct, s1), (ltb, s1)]
    order += [(layer, s2), (layer, if_), (layer, s1)]
    recipes = [Recipe(c[0], c[1], n[0], n[1]) for c, n in order]
    if has_cap and target_T < 128:
        recipes[:0] = [Recipe(*c, "signed", 4, resolution=2) for c in (pct_layer, pct)]
    if has_cap:
        recipes += [dataclasses.replace(r, keep_clip_cap=False) for r in recipes]
    return recipes


def holdout_size(n: int, macs_per_sample: int, target_T: int, budget: float) -> int:
    """How many of ``n`` calibration samples the search holds out: a quarter (at most
    MAX_HOLDOUT), fewer when simulating them at ``target_T`` would take more than a quarter of
    the budget (see SCORE_MACS_PER_S), never fewer than MIN_HOLDOUT, or MIN_COSTLY_HOLDOUT when
    not even MIN_HOLDOUT would fit."""
    held, floor = min(MAX_HOLDOUT, int(round(n * HOLDOUT_FRACTION))), MIN_HOLDOUT
    if macs_per_sample > 0:
        affordable = int(budget / 4 * SCORE_MACS_PER_S / (macs_per_sample * max(1, target_T)))
        held = min(held, affordable)
        floor = MIN_HOLDOUT if affordable >= MIN_HOLDOUT else MIN_COSTLY_HOLDOUT
    return max(floor, held)


def stats_calibration_size(n: int, macs_per_sample: int, budget: float) -> int:
    """How many of the ``n`` samples left after the split calibrate a max / percentile candidate:
    all, fewer when that would take more than an eighth of the budget (see CALIB_MACS_PER_S), never
    fewer than MIN_STATS_CALIBRATION."""
    if macs_per_sample <= 0:
        return n
    return min(n, max(MIN_STATS_CALIBRATION, int(budget / 8 * CALIB_MACS_PER_S / macs_per_sample)))


def calibration_seconds(method: str, macs_per_sample: int, ltb_samples: int, stats_samples: int) -> float:
    """A machine-independent estimate of one candidate calibration's seconds: LTB feeds ``ltb_samples``
    (iters x batch) through the network at SCORE_MACS_PER_S, max / percentile ``stats_samples`` at
    CALIB_MACS_PER_S. On MobileNetV2 an LTB candidate is estimated at 770 s (it took 340 s at low load
    and overran the budget before this estimate), a percentile one at 19 s (7-20 s)."""
    if method == "ltb":
        return ltb_samples * macs_per_sample / SCORE_MACS_PER_S
    return stats_samples * macs_per_sample / CALIB_MACS_PER_S


def split_calibration(n: int, seed: int, held: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(calibration indices, held-out indices), sorted, for ``n`` samples: a seeded split that
    holds out ``held`` samples (default: :func:`holdout_size` without a cost limit)."""
    held = holdout_size(n, 0, 0, 0.0) if held is None else held
    if n - held < MIN_CALIBRATION:
        raise DataError(
            f"the calibration data has {n} samples, too few for the recipe search (--target-T): it holds out "
            f"{held} to score the candidates and calibrates on at least {MIN_CALIBRATION} others, "
            f"so it needs {held + MIN_CALIBRATION} or more; pass more calibration samples (--calib) or "
            "compile without --target-T")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def neuron_depth(state: PassState) -> int:
    """The most neuron layers on one path from an input to an output of the partitioned graph."""
    sites = {s.node for s in state.sites}
    depth: dict[str, int] = {}
    best = 0
    for node in state.graph.copy().toposort().nodes:
        d = max((depth.get(t.name, 0) for t in node.inputs), default=0) + (node.name in sites)
        for t in node.outputs:
            depth[t.name] = d
        best = max(best, d)
    return best


def default_target_T(proto: onnx.ModelProto, cfg: CompileConfig, calib: Any,
                     explicit: list[str]) -> tuple[int, dict[str, Any] | None]:
    """The target T when none was given (``cfg.target_T is None``), and why.

    (DEFAULT_TARGET_T, a note for the search record) when the network is at least DEEP_CHAIN neuron
    layers deep and none of the recipe options (``explicit``) was given; (0, None), no search, otherwise,
    and also when the calibration data cannot be split (an iterable of batches, too few samples): then a
    warning names the fix, since the user did not ask for the search."""
    if explicit:
        return 0, None
    package = logging.getLogger("ann2snn")
    level = package.level
    package.setLevel(logging.ERROR)  # the compile that follows repeats the passes and their warnings
    try:
        depth = neuron_depth(run_until(proto, dataclasses.replace(cfg, target_T=0), calib, "partition_graph"))
    finally:
        package.setLevel(level)
    if depth < DEEP_CHAIN:
        return 0, None
    why = f"the network is {depth} neuron layers deep (the default recipe converges slowly from {DEEP_CHAIN} on)"
    skip = ("--target-T 0, or any recipe option (--method, --granularity, --neuron, --burst, --resolution, --keep-clip-cap / "
            "--drop-clip-cap), compiles without the search")
    n = calib.size if isinstance(calib, CalibrationSource) else None
    if n is None or n - MIN_HOLDOUT < MIN_CALIBRATION:
        have = "an iterable of batches" if n is None else f"{n} samples"
        log.warning("%s, but the calibration data (%s) cannot be split for the recipe search (it needs %d samples "
                    "or more, as arrays, a file or images): compiling the default recipe, which may agree poorly "
                    "with the ANN; pass more calibration samples (--calib) or choose the recipe options",
                    why, have, MIN_HOLDOUT + MIN_CALIBRATION)
        return 0, None
    log.warning("%s: choosing the recipe from the data for T = %d (recipe search, --search-budget %g s); %s, "
                "--target-T N searches for another T", why, DEFAULT_TARGET_T, cfg.search_budget, skip)
    return DEFAULT_TARGET_T, {"reason": why, "neuron_depth": depth, "deep_chain": DEEP_CHAIN, "skip": skip}


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    from .data.arrays import input_specs

    sizes = {s.shape[0] for s in input_specs(model) if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    return min(sizes) if sizes else None


def _chunks(data: ArrayDict, size: int) -> list[ArrayDict]:
    n = len(next(iter(data.values())))
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]


def _ann_reference(model: onnx.ModelProto, held: ArrayDict, device: str = "cpu") -> tuple[str, np.ndarray]:
    """(output name, the ANN's first output on the held-out samples)."""
    sess = make_session(model, device=device)
    name = sess.get_outputs()[0].name
    outs = [run_checked(sess, [name], feeds, "calibration data")[0]
            for feeds in _chunks(held, _fixed_batch(model) or SCORE_BATCH)]
    return name, np.concatenate([np.asarray(o) for o in outs])


def _score(snn: onnx.ModelProto, held: ArrayDict, name: str, ref: np.ndarray, T: int,
           threads: int, device: str = "cpu") -> tuple[float, float | None]:
    """(top-1 agreement, relative output error) of ``snn`` against ``ref`` at T steps."""
    from ann2snn.runtime import SpikingSession

    from .analysis.evaluate import predictions

    session = SpikingSession(snn, threads=threads or None, device=device)
    outs = [session.run(feeds, T)[name] for feeds in _chunks(held, _fixed_batch(snn) or SCORE_BATCH)]
    y = np.concatenate(outs)
    agreement = float((predictions(y) == predictions(ref)).mean())
    if not (np.issubdtype(ref.dtype, np.floating) and ref.ndim > 1):
        return agreement, None  # a label output: agreement only
    scale = float(np.abs(ref).mean(dtype=np.float64)) or 1.0
    return agreement, float(np.abs(y - ref).mean(dtype=np.float64)) / scale


def _calibrated(proto: onnx.ModelProto, cfg: CompileConfig, calib: ArrayDict,
                cache: dict[tuple[Any, ...], PassState]) -> PassState:
    """A copy of the calibrated state for ``cfg``'s calibration (method, granularity, cap), computed once."""
    from ann2snn.passes.calibrate_thresholds import estimate_t0

    key = (cfg.method, cfg.granularity, cfg.keep_clip_cap)
    if key not in cache:
        # the candidates calibrate in this process, on the arrays the search holds in memory
        cache[key] = run_until(proto, dataclasses.replace(cfg, neuron="if", burst=1, resolution=1, ray=""), calib,
                               "calibrate_thresholds")
    base = cache[key]
    # emission changes the graph and its annotations: every field is copied (the calibration
    # data are only read; the graph is copied as onnx-graphsurgeon copies graphs)
    fresh = {f.name: copy.deepcopy(getattr(base, f.name)) for f in dataclasses.fields(base)
             if f.name not in ("graph", "config", "calib")}
    state = dataclasses.replace(base, graph=base.graph.copy(), config=cfg, **fresh)
    state.metadata["t0"] = 0 if cfg.neuron == "signed" else estimate_t0(state)  # as calibrate_thresholds sets it
    return state


def search_recipe(proto: onnx.ModelProto, cfg: CompileConfig,
                  source: CalibrationSource) -> tuple[CompileConfig, dict[str, Any]]:
    """Choose the recipe for ``cfg.target_T``; return the config to compile and the search record.

    The record holds the split, every candidate (options, agreement, relative error, seconds,
    status) and the chosen options. SearchError when no candidate reaches
    ``cfg.min_agreement`` (the message gives the figures and the best recipe).
    """
    from ann2snn.passes.emit_spiking import emit_spiking

    start = time.perf_counter()
    T = int(cfg.target_T)
    n = source.size
    if n is None:
        raise DataError("the recipe search (--target-T) needs calibration data as a .npz/.npy file, arrays or "
                        "images, not an iterable of batches (it holds a part out); pass arrays or compile without "
                        "--target-T")
    structure = run_until(proto, cfg, source, "partition_graph")
    macs = int(structure.metadata.get("macs", {}).get("total", 0))
    calib_idx, held_idx = split_calibration(n, cfg.seed, holdout_size(n, macs, T, cfg.search_budget))
    calib, held = source.take(calib_idx), source.take(held_idx)
    n_stats = stats_calibration_size(len(calib_idx), macs, cfg.search_budget)
    # a seeded subset (the calibration indices are sorted, and data files are often grouped by source)
    subset = np.sort(np.random.default_rng(cfg.seed).permutation(len(calib_idx))[:n_stats])
    stats_calib = calib if n_stats == len(calib_idx) else {k: v[subset] for k, v in calib.items()}
    has_cap = any(s.cap is not None for s in structure.sites)
    recipes = candidates(T, has_cap) if structure.sites else [Recipe(cfg.method, cfg.granularity, cfg.neuron,
                                                                     cfg.burst, cfg.keep_clip_cap, cfg.resolution)]
    name, ref = _ann_reference(proto, held, cfg.device)
    record: dict[str, Any] = {
        "target_T": T, "budget_s": cfg.search_budget, "min_agreement": cfg.min_agreement,
        "holdout": {"seed": cfg.seed, "held_out": len(held_idx), "calibration": len(calib_idx),
                    "stats_calibration": n_stats},
        "scored_output": name, "candidates": [],
    }
    base = dataclasses.replace(cfg, target_T=0, progress=False, batch=min(cfg.batch, len(calib_idx)))
    cache: dict[tuple[Any, ...], PassState] = {}
    spent: list[float] = []
    for recipe in progress(recipes, len(recipes), f"recipe search (T = {T})", cfg.progress):
        entry: dict[str, Any] = {"recipe": recipe.label, "options": recipe.options()}
        record["candidates"].append(entry)
        elapsed = time.perf_counter() - start
        # the longest candidate so far is the estimate: times vary with the calibration (cached or
        # not) and the machine's load, and a budget is better kept than used to the last second; a
        # candidate with a calibration not yet run may cost more (LTB feeds iters x batch samples)
        estimate = max(spent, default=0.0)
        if (recipe.method, recipe.granularity, recipe.keep_clip_cap) not in cache:
            estimate = max(estimate, calibration_seconds(recipe.method, macs, base.iters * base.batch, n_stats))
        if spent and elapsed + estimate > cfg.search_budget:
            entry["status"] = "skipped (budget)"  # would not finish in time: not started
            continue
        t = time.perf_counter()
        try:
            data = calib if recipe.method == "ltb" else stats_calib
            snn = emit_spiking(_calibrated(proto, dataclasses.replace(base, **recipe.options()), data, cache))
            entry["agreement"], entry["relative_error"] = _score(snn, held, name, ref, T, cfg.threads, cfg.device)
            entry["status"] = "scored"
        except Ann2SnnError as exc:  # e.g. a calibration that overflows: this recipe cannot work here
            entry["status"] = f"failed: {str(exc).splitlines()[0]}"
        entry["seconds"] = round(time.perf_counter() - t, 3)
        spent.append(entry["seconds"])
        log.info("recipe search: %s -> %s", recipe.label, _figures(entry))
    scored = [c for c in record["candidates"] if c["status"] == "scored"]
    record["seconds"] = round(time.perf_counter() - start, 3)
    if not scored:
        raise SearchError(f"recipe search at T = {T}: no candidate could be compiled and scored:\n"
                          f"{format_search(record)}\nfix the first failure above, or compile without --target-T",
                          record)
    best = choose(scored, len(held_idx))
    chosen = dataclasses.replace(cfg, target_T=0, **best["options"])
    record["chosen_recipe"] = best["recipe"]
    record["chosen"] = chosen.to_dict()
    if best["agreement"] < cfg.min_agreement:
        raise SearchError(
            f"recipe search at T = {T}: the best of {len(scored)} candidate(s), {best['recipe']}, agrees with the "
            f"ANN on {best['agreement']:.1%} of the {len(held_idx)} held-out samples (relative output error "
            f"{_fmt(best['relative_error'])}), below --min-agreement {cfg.min_agreement:g}; nothing was written.\n"
            f"{format_search(record)}\ntry a larger --target-T, a longer --search-budget or more calibration data; "
            "--target-T 0 compiles the default recipe without a search; "
            f"--min-agreement 0 writes the best recipe anyway (its options: {_cli(best['options'])})", record)
    return chosen, record


def choose(scored: list[dict[str, Any]], held_out: int) -> dict[str, Any]:
    """The best scored candidate: the highest top-1 agreement, then the lowest relative error.

    Agreements within one held-out sample of the best count as equal (on a few dozen held-out
    samples one answer is noise), so the output error decides between them; the earlier
    candidate wins a full tie."""
    top = max(c["agreement"] for c in scored)
    near = [c for c in scored if c["agreement"] >= top - 1.0 / held_out - 1e-9]
    return min(near, key=lambda c: c["relative_error"] if c["relative_error"] is not None else 0.0)


def model_record(record: dict[str, Any]) -> dict[str, Any]:
    """The search record as the compiled model keeps it: without timings, so that the
    model's bytes depend only on what was tried, not on how long it took."""
    out = {k: v for k, v in record.items() if k != "seconds"}
    out["candidates"] = [{k: v for k, v in c.items() if k != "seconds"} for c in record["candidates"]]
    return out


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _figures(entry: dict[str, Any]) -> str:
    if entry["status"] != "scored":
        return entry["status"]
    return f"agreement {entry['agreement']:.1%}, relative error {_fmt(entry['relative_error'])}"


def _cli(options: dict[str, Any]) -> str:
    flags = [f"--method {options['method']}", f"--granularity {options['granularity']}",
             f"--neuron {options['neuron']}", f"--burst {options['burst']}"]
    flags += [f"--resolution {options['resolution']}"] if options.get("resolution", 1) > 1 else []
    return " ".join(flags + ([] if options["keep_clip_cap"] else ["--drop-clip-cap"]))


def format_search(record: dict[str, Any]) -> str:
    """The search as a markdown table: each candidate's figures, seconds and status."""
    hold = record["holdout"]
    lines = [f"recipe search at T = {record['target_T']}: {hold['held_out']} held-out samples, "
             f"candidates calibrated on {hold['calibration']}"
             + (f" (max / percentile on {hold['stats_calibration']} of them)"
                if hold.get("stats_calibration", hold["calibration"]) < hold["calibration"] else "")
             + (f", {record['seconds']:.1f} s of {record['budget_s']:g} s" if "seconds" in record else ""),
             "", "| # | recipe | agreement | relative error | seconds | status |", "|---|---|---|---|---|---|"]
    for i, c in enumerate(record["candidates"], 1):
        chosen = c["recipe"] == record.get("chosen_recipe")
        agreement = f"{c['agreement']:.1%}" if "agreement" in c else "-"
        seconds = f"{c['seconds']:.1f}" if "seconds" in c else "-"
        lines.append(f"| {i} | {c['recipe']}{' (chosen)' if chosen else ''} | {agreement} | "
                     f"{_fmt(c.get('relative_error'))} | {seconds} | {c['status']} |")
    if "chosen" in record:
        lines += ["", f"chosen: {record['chosen_recipe']} ({_cli(record['chosen'])})"]
    return "\n".join(lines)


def budget_note(record: dict[str, Any]) -> str | None:
    """A line saying how many candidates the budget left untried, or None."""
    skipped = sum(c["status"] == "skipped (budget)" for c in record["candidates"])
    if not skipped:
        return None
    return (f"{skipped} of {len(record['candidates'])} candidate recipes were not tried within --search-budget "
            f"{record['budget_s']:g} s")
