"""What counting costs: `report` at T=64 against a plain T=64 run of the same model and data.

Both sides load the compiled model and simulate the same samples in the same batches; the
report also analyses the graph (fan-out maps), probes every spike tensor and counts spikes at
every step. The issue asks for at most 1.3x. Each side is timed ``--repeat`` times, alternating,
and the minimum is kept; CPU time (all threads of this process) is printed beside wall time,
as it moves less when the machine is shared. Run:

    .venv/bin/python benchmarks/report_overhead.py [--model mnist|digits] [--limit N] [-T 64] [--snn X]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import ann2snn
from ann2snn.analysis.report import report
from ann2snn.runtime import SpikingSession
from common import ROOT

MODELS = {
    "mnist": ("models/mnist_cnn.onnx", "models/data/mnist_calib.npz", "models/data/mnist_test.npz"),
    "digits": ("models/digits_cnn.onnx", "models/data/digits_calib.npz", "models/data/digits_test.npz"),
}


def plain(model: Path, x: np.ndarray, T: int, batch: int) -> None:
    session = SpikingSession(model)
    for i in range(0, len(x), batch):
        session.run_many({"input": x[i:i + batch]}, [T])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="mnist")
    ap.add_argument("--limit", type=int, default=2000, help="test samples to simulate (0: all)")
    ap.add_argument("-T", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--snn", default=None, help="an already compiled model (default: compile the reference model)")
    args = ap.parse_args()
    ann, calib, test = (ROOT / p for p in MODELS[args.model])
    with np.load(test) as z:
        x = z["input"][: args.limit or None]
    print(f"command: python benchmarks/report_overhead.py --model {args.model} --limit {args.limit} "
          f"-T {args.T} --batch-size {args.batch_size} --repeat {args.repeat}")
    with tempfile.TemporaryDirectory() as tmp:
        snn = Path(args.snn) if args.snn else Path(tmp) / "model.snn.onnx"
        if not args.snn:
            ann2snn.compile(ann, calib, snn)
        wall: dict[str, list[float]] = {"plain": [], "report": []}
        cpu: dict[str, list[float]] = {"plain": [], "report": []}
        runs = {"plain": lambda: plain(snn, x, args.T, args.batch_size),
                "report": lambda: report(snn, {"input": x}, [args.T], batch_size=args.batch_size)}
        for _ in range(args.repeat):
            for name, fn in runs.items():
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    print(f"model: {MODELS[args.model][0]}, samples: {len(x)}, T={args.T}")
    for name in runs:
        print(f"{name:>6} run: wall {min(wall[name]):.2f} s (runs: {', '.join(f'{t:.2f}' for t in wall[name])}), "
              f"CPU {min(cpu[name]):.2f} s (runs: {', '.join(f'{t:.2f}' for t in cpu[name])})")
    print(f"overhead: wall {min(wall['report']) / min(wall['plain']):.3f}x, "
          f"CPU {min(cpu['report']) / min(cpu['plain']):.3f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
