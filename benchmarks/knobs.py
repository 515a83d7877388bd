"""How the calibration and readout knobs move SNN accuracy on a reference model.

Prints a markdown table: one row per setting (LTB iterations K, batch B, max-pool mode,
readout delay t0), SNN accuracy at each T. One simulation per compiled model serves every T
and every t0. Run:  .venv/bin/python benchmarks/knobs.py [--model mnist|digits] [--limit N]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import ann2snn
from ann2snn.analysis.evaluate import evaluate
from ann2snn.runtime import SpikingSession

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "mnist": ("models/mnist_cnn.onnx", "models/data/mnist_calib.npz", "models/data/mnist_test.npz"),
    "digits": ("models/digits_cnn.onnx", "models/data/digits_calib.npz", "models/data/digits_test.npz"),
}
SETTINGS = [
    {"iters": 200, "batch": 64},
    {"iters": 50, "batch": 64},
    {"iters": 800, "batch": 64},
    {"iters": 200, "batch": 16},
    {"iters": 200, "batch": 64, "maxpool": "instant"},
    {"method": "max"},
    {"method": "percentile"},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="mnist")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N test samples (0: all)")
    ap.add_argument("-T", default="4,8,16,32,64")
    ap.add_argument("--t0", default="auto,0,4,8", help="readout delays to compare ('auto' = the compiled estimate)")
    args = ap.parse_args()
    ann, calib, test = (ROOT / p for p in MODELS[args.model])
    with np.load(test) as z:
        data = {k: z[k][: args.limit or None] for k in z.files}
    Ts = [int(t) for t in args.T.split(",")]
    print(f"command: python benchmarks/knobs.py --model {args.model} --limit {args.limit} -T {args.T} --t0 {args.t0}")
    print(f"model: {MODELS[args.model][0]}, test samples: {len(data['label'])}\n")
    print("| setting | t0 | " + " | ".join(f"T={T}" for T in Ts) + " | compile s |")
    print("|---|---|" + "---|" * len(Ts) + "---|")
    for setting in SETTINGS:
        start = time.perf_counter()
        session = SpikingSession(ann2snn.compile(ann, calib, **setting))
        secs = time.perf_counter() - start
        for t0 in args.t0.split(","):
            res = evaluate(ann, session, data, Ts, batch_size=1000, t0=None if t0 == "auto" else int(t0))
            label = ", ".join(f"{k}={v}" for k, v in setting.items())
            t0_txt = f"{res['t0']} (auto)" if t0 == "auto" else t0
            accs = " | ".join(f"{r['accuracy'] * 100:.2f}" for r in res["snn"])
            print(f"| {label} | {t0_txt} | {accs} | {secs:.1f} |", flush=True)
    print(f"\nANN accuracy: {res['ann_accuracy'] * 100:.2f}%")


if __name__ == "__main__":
    main()
