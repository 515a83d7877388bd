"""Where the recipe search's time goes (issue 15: at most 3 minutes on MobileNetV2 on 2 cores).

Runs ``ann2snn.search.search_recipe`` alone (no final compile, no evaluation) under cProfile at the
default budget and prints the candidates' table, the total, and the split between threshold
calibration (``calibrate_thresholds``) and scoring (``SpikingSession`` simulation), the process's
CPU time (less sensitive than the wall clock to other work on the machine) and the load average. Run: ``python benchmarks/search_time.py [--model mobilenet_v2] [--target-T 64] [--budget 120]``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import time

from common import ROOT

from ann2snn.config import CompileConfig
from ann2snn.data.arrays import CalibrationSource, input_specs
from ann2snn.modelio import load_model
from ann2snn import search
from ann2snn.search import format_search, search_recipe

MODELS = {
    "mobilenet_v2": ("mobilenet_v2.onnx", "photos_calib.npz"),
    "efficientnet_lite1": ("efficientnet_lite1.onnx", "photos240_calib.npz"),
}


def cumulative(stats: pstats.Stats, function: str) -> float:
    """Cumulative seconds of the profiled functions named ``function``."""
    return sum(v[3] for k, v in stats.stats.items() if k[2] == function)  # type: ignore[attr-defined]


def main() -> None:
    """Profile one search and print the breakdown."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2", choices=sorted(MODELS))
    p.add_argument("--target-T", type=int, default=64)
    p.add_argument("--budget", type=float, default=CompileConfig.search_budget)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--before", action="store_true", help="as the search was before the time cut: max / percentile "
                   "candidates calibrated on all the samples, held-out floor 16 (MIN_HOLDOUT) for costly models too")
    args = p.parse_args()
    if args.before:
        search.MIN_STATS_CALIBRATION = 10**9
        search.MIN_COSTLY_HOLDOUT = search.MIN_HOLDOUT
    model, calib = MODELS[args.model]
    proto = load_model(ROOT / "models" / model)
    cfg = CompileConfig(target_T=args.target_T, search_budget=args.budget, threads=args.threads)
    source = CalibrationSource(ROOT / "models" / "data" / calib, input_specs(proto), cfg.preprocess())
    load = os.getloadavg()[0]
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    _, record = search_recipe(proto, cfg, source)
    profile.disable()
    total = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = used.ru_utime - cpu.ru_utime + used.ru_stime - cpu.ru_stime
    stats = pstats.Stats(profile)
    print(format_search(record))
    print(f"\nsearch {total:.1f} s: threshold calibration {cumulative(stats, 'calibrate_thresholds'):.1f} s, "
          f"scoring (simulation) {cumulative(stats, '_score'):.1f} s; CPU time {cpu_s:.1f} s; load average "
          f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
