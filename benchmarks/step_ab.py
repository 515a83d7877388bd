"""Side-by-side step time of compiled models (e.g. the same network compiled by two revisions):
each model's step form, in one process, rounds alternating between the models, median ms per
step by batch.

    git worktree add /tmp/ann2snn-old <rev> && (cd /tmp/ann2snn-old && make .venv/.installed)
    /tmp/ann2snn-old/.venv/bin/ann2snn compile models/fashion_vit_dynamo.onnx --calib models/data/fashion_calib.npz \\
        --nonlinear compensate --signed-sites output -o /tmp/old.snn.onnx
    .venv/bin/ann2snn compile ... -o /tmp/new.snn.onnx
    .venv/bin/python benchmarks/step_ab.py /tmp/old.snn.onnx /tmp/new.snn.onnx --batches 8,150 --md out.md

The step form runs the step graph as compiled (its functions inlined by onnxruntime), so a
model compiled by an older revision runs under this runtime as it did under its own.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import ROOT, command_line


def main() -> None:
    """Parse options, time, print (and write) the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT / "models" / "data" / "fashion_test.npz")
    ap.add_argument("--batches", default="8,150")
    ap.add_argument("-T", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    import onnx

    from ann2snn.runtime import SpikingSession

    with np.load(args.data) as z:
        data = z["input"]
    lines = [f"command: `{command_line()}`", "", "| batch | " + " | ".join(f"`{m.name}` (ms/step)" for m in args.models)
             + " | " + " | ".join(f"`{m.name}` ÷ `{args.models[0].name}`" for m in args.models[1:]) + " |",
             "|---|" + "---|" * (2 * len(args.models) - 1)]
    for batch in (int(b) for b in args.batches.split(",")):
        x = np.ascontiguousarray(data[:batch])
        sessions = [SpikingSession(onnx.load(str(m)), mode="step", guard=False, threads=args.threads)
                    for m in args.models]
        name = sessions[0].input_specs[0].name
        for s in sessions:  # warm-up, not timed
            s.run({name: x}, T=4)
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(args.rounds):
            for k, s in enumerate(sessions):
                start = time.perf_counter()
                s.run({name: x}, T=args.T)
                times[k].append((time.perf_counter() - start) / args.T * 1e3)
        med = [float(np.median(t)) for t in times]
        lines.append(f"| {batch} | " + " | ".join(f"{m:.3f}" for m in med) + " | "
                     + " | ".join(f"{m / med[0]:.2f}" for m in med[1:]) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
