"""What the runtime's guard costs (issue 22: at most 5 % of a T = 32 run).

Before a fast form is first used for a batch size, SpikingSession runs its first
GUARD_STEPS steps through the reference form (the whole step graph, built on first use) and
compares. Measured side by side in one run, interleaved, medians over repeats:

* load: the session's construction (with the guard it also builds the reference session);
* first run: a fresh session's first ``run(x, T)`` at batch B, guard on vs off, and the
  guard's own time inside it (its reference steps on two samples and the comparison);
* dataset: one session over N inputs in batches of B (what ``ann2snn run`` / ``eval`` do),
  guard on vs off, session construction included in both.

Run:  .venv/bin/python benchmarks/guard_cost.py [--models digits_cnn,mnist_cnn,fashion_vgg,fashion_resnet]
          [--batches 1,32] [-T 32] [--inputs 1024] [--repeats 5]
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT

MODELS = ROOT / "models"
DATA = {"digits_cnn": ("digits_calib", "digits_test"), "mnist_cnn": ("mnist_calib", "mnist_test"),
        "fashion_vgg": ("fashion_calib", "fashion_test"), "fashion_resnet": ("fashion_calib", "fashion_test")}


def _inputs(name: str, n: int) -> dict[str, np.ndarray]:
    with np.load(MODELS / "data" / f"{DATA[name][1]}.npz") as z:
        return {k: z[k][:n] for k in z.files if k != "label"}


def main() -> None:
    import ann2snn
    from ann2snn.runtime import SpikingSession

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DATA))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("-T", type=int, default=32)
    ap.add_argument("--inputs", type=int, default=1024, help="inputs of the dataset pass (batch 1: a 32nd of it)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            snn = Path(tmp) / f"{name}.snn.onnx"
            ann2snn.compile(MODELS / f"{name}.onnx", MODELS / "data" / f"{DATA[name][0]}.npz", snn, iters=50)
            for B in (int(b) for b in args.batches.split(",")):
                n = args.inputs if B > 1 else max(args.inputs // 32, 2)
                data = _inputs(name, n)
                n = min(n, len(next(iter(data.values()))))
                first = {True: [], False: []}
                whole = {True: [], False: []}
                share = {"first": [], "whole": []}  # the guard's own time / the guarded run's time
                load = {True: [], False: []}  # session construction (with the guard: the reference session too)
                for _ in range(args.repeats):
                    for guard in (True, False):
                        t = time.perf_counter()
                        s = SpikingSession(snn, guard=guard)
                        load[guard].append(time.perf_counter() - t)
                        x = {k: v[:B] for k, v in data.items()}
                        t = time.perf_counter()
                        s.run(x, args.T)
                        first[guard].append(time.perf_counter() - t)
                        if guard:
                            share["first"].append(s.guard_seconds / first[guard][-1])
                    for guard in (True, False):
                        t = time.perf_counter()
                        s = SpikingSession(snn, guard=guard)
                        for i in range(0, n, B):
                            s.run({k: v[i:i + B] for k, v in data.items()}, args.T)
                        whole[guard].append(time.perf_counter() - t)
                        if guard:
                            share["whole"].append(s.guard_seconds / whole[guard][-1])
                med = {k: {g: float(np.median(v[g])) for g in v} for k, v in (("first", first), ("whole", whole))}
                med["share"] = {k: float(np.median(v)) for k, v in share.items()}
                med["load"] = {g: float(np.median(v)) for g, v in load.items()}
                rows.append((name, B, n, med, s.last_form))
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"T = {args.T}, medians of {args.repeats} interleaved repeats\n")
    print("'guard's own time' is the time the session spent in the guard (its reference steps and the "
          "comparison, timed inside the run) over the run's time: a share of the same run, less exposed to "
          "the machine's noise than the difference of two runs.\n")
    print("| model | batch | form | load, guard off | on | first run, guard off | on | difference | guard's own time "
          "| inputs | dataset pass (load included), guard off | on | difference | guard's own time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, B, n, med, form in rows:
        f, w, sh, ld = med["first"], med["whole"], med["share"], med["load"]
        print(f"| {name} | {B} | {form} | {ld[False] * 1e3:.0f} ms | {ld[True] * 1e3:.0f} ms | "
              f"{f[False] * 1e3:.1f} ms | {f[True] * 1e3:.1f} ms | "
              f"{100 * (f[True] / f[False] - 1):+.1f}% | {100 * sh['first']:.1f}% | {n} | {w[False]:.2f} s | "
              f"{w[True]:.2f} s | {100 * (w[True] / w[False] - 1):+.1f}% | {100 * sh['whole']:.2f}% |")


if __name__ == "__main__":
    main()
