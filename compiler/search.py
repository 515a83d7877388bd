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
calibration run: only the neuron and its emission differ.
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

from .config import CompileConfig
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
#: samples left to calibrate each candidate on, at least
MIN_CALIBRATION = 16
#: multiply-accumulates per second a simulation was assumed to reach on 2 cores (the MobileNetV2
#: SNN ran at about 2.9x the ANN's time per step, README "Speed and memory"); with it the held-out
#: part is sized so that scoring one candidate takes about a quarter of the budget. A constant, not
#: a timing: the split must not depend on the machine's load
SCORE_MACS_PER_S = 5e9
#: samples simulated at once when scoring (a model compiled for a fixed batch takes that batch)
SCORE_BATCH = 64
#: the options a recipe sets; every other option is the caller's
RECIPE_FIELDS = ("method", "granularity", "neuron", "burst", "keep_clip_cap")


@dataclass(frozen=True)
class Recipe:
    """One candidate: the options the search varies."""

    method: str
    granularity: str
    neuron: str
    burst: int
    keep_clip_cap: bool = True

    @property
    def label(self) -> str:
        """A short name, e.g. ``percentile/channel signed burst 2``."""
        neuron = self.neuron + (f" burst {self.burst}" if self.burst > 1 else "")
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
    Recipes that drop the ReLU6 cap come last and only when the model has a cap; a capped
    (mobile) network starts with percentile thresholds, the recipe measured on MobileNetV2.
    """
    ltb, pct, mx, layer = ("ltb", "channel"), ("percentile", "channel"), ("max", "channel"), ("ltb", "layer")
    s2, if_, s1 = ("signed", 2), ("if", 1), ("signed", 1)
    if target_T < 128:
        order = [(ltb, s2), (pct, s2), (ltb, if_), (mx, s2), (pct, if_), (ltb, s1), (pct, s1), (mx, if_), (mx, s1)]
        if has_cap:
            order[0], order[1] = order[1], order[0]
    else:
        order = [(mx, s2), (pct, s2), (mx, if_), (ltb, s2), (pct, if_), (ltb, if_), (mx, s1), (pct, s1), (ltb, s1)]
    order += [(layer, s2), (layer, if_), (layer, s1)]
    recipes = [Recipe(c[0], c[1], n[0], n[1]) for c, n in order]
    if has_cap:
        recipes += [dataclasses.replace(r, keep_clip_cap=False) for r in recipes]
    return recipes


def holdout_size(n: int, macs_per_sample: int, target_T: int, budget: float) -> int:
    """How many of ``n`` calibration samples the search holds out: a quarter (at most
    MAX_HOLDOUT), fewer when simulating them at ``target_T`` would take more than a quarter of
    the budget (see SCORE_MACS_PER_S), never fewer than MIN_HOLDOUT."""
    held = min(MAX_HOLDOUT, int(round(n * HOLDOUT_FRACTION)))
    if macs_per_sample > 0:
        held = min(held, int(budget / 4 * SCORE_MACS_PER_S / (macs_per_sample * max(1, target_T))))
    return max(MIN_HOLDOUT, held)


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
        cache[key] = run_until(proto, dataclasses.replace(cfg, neuron="if", burst=1, ray=""), calib,
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
    has_cap = any(s.cap is not None for s in structure.sites)
    recipes = candidates(T, has_cap) if structure.sites else [Recipe(cfg.method, cfg.granularity, cfg.neuron,
                                                                     cfg.burst, cfg.keep_clip_cap)]
    name, ref = _ann_reference(proto, held, cfg.device)
    record: dict[str, Any] = {
        "target_T": T, "budget_s": cfg.search_budget, "min_agreement": cfg.min_agreement,
        "holdout": {"seed": cfg.seed, "held_out": len(held_idx), "calibration": len(calib_idx)},
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
        # not) and the machine's load, and a budget is better kept than used to the last second
        if spent and elapsed + max(spent) > cfg.search_budget:
            entry["status"] = "skipped (budget)"  # would not finish in time: not started
            continue
        t = time.perf_counter()
        try:
            snn = emit_spiking(_calibrated(proto, dataclasses.replace(base, **recipe.options()), calib, cache))
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
    return " ".join(flags + ([] if options["keep_clip_cap"] else ["--drop-clip-cap"]))


def format_search(record: dict[str, Any]) -> str:
    """The search as a markdown table: each candidate's figures, seconds and status."""
    hold = record["holdout"]
    lines = [f"recipe search at T = {record['target_T']}: {hold['held_out']} held-out samples, "
             f"candidates calibrated on {hold['calibration']}"
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
