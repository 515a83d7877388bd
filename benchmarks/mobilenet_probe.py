"""MobileNetV2: top-1 agreement between the SNN and the ANN on real photo crops, by T.

Needs models/mobilenet_v2.onnx and models/data/photos_*.npz, which models/build_mobilenet.py
builds (they are not committed). Run:
    .venv/bin/python benchmarks/mobilenet_probe.py --method max --calib 128 --eval 8
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import ann2snn
import numpy as np
import onnxruntime as ort
from ann2snn.runtime import SpikingSession

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="ltb", choices=["ltb", "max", "percentile"])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calib", type=int, default=128, help="calibration crops used")
    ap.add_argument("--eval", type=int, default=8, help="evaluation crops used")
    ap.add_argument("--stride", type=int, default=1,
                    help="use every stride-th evaluation crop (the crops are ordered by photo: the first 8 are 6 "
                         "astronaut and 2 cat crops, on which the ANN itself is unsure)")
    ap.add_argument("-T", default="32,64,128,256")
    ap.add_argument("--t0", type=int, default=None)
    args = ap.parse_args()
    model = ROOT / "models" / "mobilenet_v2.onnx"
    with np.load(ROOT / "models" / "data" / "photos_calib.npz") as z:
        calib = z["input"][: args.calib]
    with np.load(ROOT / "models" / "data" / "photos_eval.npz") as z:
        x = z["input"][:: args.stride][: args.eval]
    ann = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    start = time.perf_counter()
    snn = ann2snn.compile(model, {"input": calib}, method=args.method, iters=args.iters, batch=args.batch)
    secs = time.perf_counter() - start
    session = SpikingSession(snn)
    Ts = [int(t) for t in args.T.split(",")]
    res = session.run_many({"input": x}, Ts, t0=args.t0)
    print(f"command: python benchmarks/mobilenet_probe.py --method {args.method} --iters {args.iters} "
          f"--batch {args.batch} --calib {args.calib} --eval {args.eval} --stride {args.stride} -T {args.T}"
          + (f" --t0 {args.t0}" if args.t0 is not None else ""))
    print(f"compile {secs:.0f} s, readout t0 {session.t0 if args.t0 is None else args.t0}\n")
    print("| T | top-1 agreement with the ANN | relative output error |\n|---|---|---|")
    for T in Ts:
        y = res[T][session.output_names[0]]
        agree = float((y.argmax(1) == ann.argmax(1)).mean())
        print(f"| {T} | {agree * 100:.1f}% | {float(np.abs(y - ann).mean() / np.abs(ann).mean()):.3f} |")


if __name__ == "__main__":
    main()
