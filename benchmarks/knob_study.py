"""The LTB knobs on one reference model: iterations K, batch size B, v(0) and the readout delay t0.

Each setting changes one knob from the defaults (K=200, B=64, v0=0.5, t0 = compiled estimate),
compiles once and simulates once; every T and every t0 are read out of that one simulation.
Uses the first ``--limit`` test samples. Run:

    .venv/bin/python benchmarks/knob_study.py [--model fashion_vgg] [--limit 1000]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import ann2snn
from ann2snn.runtime import SpikingSession

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from accuracy import MODELS, ann_logits  # noqa: E402

SETTINGS: list[dict[str, Any]] = [
    {}, {"iters": 10}, {"iters": 50}, {"iters": 800}, {"batch": 16}, {"batch": 256},
    {"v0": 0.0}, {"v0": 0.3}, {"v0": 0.7},
]


def main() -> None:
    """Run every setting and print one markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="fashion_vgg")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("-T", default="4,8,16,32,64,128")
    ap.add_argument("--t0", default="auto,0", help="readout delays: 'auto', an integer, or 'T/4' (a quarter of T)")
    ap.add_argument("--batch", type=int, default=500, help="simulation batch")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ann, calib, test, common = MODELS[args.model]
    with np.load(ROOT / test) as z:
        x, y = z["input"][: args.limit], z["label"][: args.limit]
    ann_acc = float((ann_logits(ROOT / ann, x, args.batch).argmax(1) == y).mean())
    Ts = sorted(int(t) for t in args.T.split(","))
    print(f"command: `python benchmarks/knob_study.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`")
    print(f"model: {ann}, first {len(x)} test samples, ANN accuracy {ann_acc * 100:.2f}%\n")
    print("| setting | t0 | " + " | ".join(f"T={T}" for T in Ts) + " | compile s |")
    print("|---|---|" + "---|" * len(Ts) + "---|", flush=True)
    rows = []
    for setting in SETTINGS:
        options = {**common, **setting}
        start = time.perf_counter()
        session = SpikingSession(ann2snn.compile(ROOT / ann, ROOT / calib, **options))
        secs = time.perf_counter() - start
        for t0_spec in args.t0.split(","):
            accs = []
            # one simulation per t0 family: T/4 depends on T, so read each T separately from run_many
            outs: dict[int, list[np.ndarray]] = {T: [] for T in Ts}
            for i in range(0, len(x), args.batch):
                if t0_spec == "T/4":
                    for T in Ts:
                        outs[T].append(session.run(x[i:i + args.batch], T, T // 4)["logits"])
                else:
                    t0 = None if t0_spec == "auto" else int(t0_spec)
                    for T, r in session.run_many(x[i:i + args.batch], Ts, t0).items():
                        outs[T].append(r["logits"])
            accs = [float((np.concatenate(outs[T]).argmax(1) == y).mean()) for T in Ts]
            label = ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults (K=200, B=64, v0=0.5)"
            t0_txt = f"{session.t0} (auto)" if t0_spec == "auto" else t0_spec
            print(f"| {label} | {t0_txt} | " + " | ".join(f"{a * 100:.2f}" for a in accs) + f" | {secs:.1f} |", flush=True)
            rows.append({"setting": setting, "t0": t0_txt, "accuracy": dict(zip(Ts, accs)), "compile_s": secs})
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "samples": len(x), "ann_accuracy": ann_acc,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
