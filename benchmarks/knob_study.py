"""The compile and readout knobs on one reference model: why the defaults are what they are.

Each setting changes the compile options (default: K=200, B=64, v0=0.5, channel-wise LTB),
compiles once and simulates the first ``--limit`` test samples once, up to the largest T.

Readout rules (the default mode). The sum of the output over the steps [0, t) is kept for
every t, so every T and every readout rule (where the averaging window starts) are read
out of that one simulation:

* ``auto``: the compiled estimate t0 (METHOD.md), or the last 4 steps when T < t0 + 4
  (what ``SpikingSession.run`` does);
* ``auto_w2``, ``auto_w1``: the same with a minimum window of 2 or 1 steps instead of 4;
* ``0``: no delay; ``T/16``, ``T/8``, ``T/4``, ``T/2``: a fixed fraction of T;
* ``auto_max_T/8``, ``auto_max_T/4``: the ``auto`` start, but never later than T/8 or T/4.

Fixed readout delays (``--t0 auto,0,2``; it was benchmarks/knobs.py): each setting is
compiled with nothing but its own options and every delay is read out by
``ann2snn.analysis.evaluate`` (the runtime's readout, as ``ann2snn eval`` prints it); one
row per setting and delay, with the compile time. ``--settings calibration`` gives the
settings of the README's first tables (K, B, max pooling, calibration method).

Run (``--settings`` is a ``;``-separated list of ``key=value,...`` option sets, empty = defaults,
or the name of a preset in ``PRESETS``):

    .venv/bin/python benchmarks/knob_study.py --model fashion_vgg --limit 1000 -T 128 \\
        --settings ";iters=10;iters=50;iters=1000;batch=16;batch=256;v0=0.0;v0=0.25"
    .venv/bin/python benchmarks/knob_study.py --model mnist --limit 0 -T 64 --settings calibration --t0 auto,0,2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ann2snn
import numpy as np
from ann2snn.analysis.evaluate import evaluate
from ann2snn.runtime import SpikingSession
from ann2snn.runtime.reference import window_start

from accuracy import MODELS as ACCURACY_MODELS
from accuracy import ann_logits
from common import ROOT, T_header, command_line

#: the reference models of benchmarks/accuracy.py, and the digits CNN
MODELS = {**ACCURACY_MODELS,
          "digits": ("models/digits_cnn.onnx", "models/data/digits_calib.npz", "models/data/digits_test.npz", {})}
DEFAULTS = {"iters": 200, "batch": 64, "v0": 0.5}
#: named --settings
PRESETS = {
    "ltb": ";iters=10;iters=50;iters=1000;batch=16;batch=256;v0=0.0;v0=0.25",
    "calibration": ("iters=200,batch=64;iters=50,batch=64;iters=800,batch=64;iters=200,batch=16;"
                    "iters=200,batch=64,maxpool=instant;method=max;method=percentile"),
}
TS = (4, 8, 16, 32, 64, 128, 256)
RULES: dict[str, Callable[[int, int, int], int]] = {  # (T, compiled t0, min window) -> first step of the window
    "auto": lambda T, t0, w: window_start(T, t0, w),
    "auto_w2": lambda T, t0, w: window_start(T, t0, 2),
    "auto_w1": lambda T, t0, w: window_start(T, t0, 1),
    "0": lambda T, t0, w: 0,
    "T/16": lambda T, t0, w: T // 16,
    "T/8": lambda T, t0, w: T // 8,
    "T/4": lambda T, t0, w: T // 4,
    "T/2": lambda T, t0, w: T // 2,
    "auto_max_T/8": lambda T, t0, w: min(window_start(T, t0, w), T // 8),
    "auto_max_T/4": lambda T, t0, w: min(window_start(T, t0, w), T // 4),
}


def parse_settings(spec: str) -> list[dict[str, Any]]:
    """``"iters=10;batch=16,iters=50;"`` -> [{"iters": 10}, {"batch": 16, "iters": 50}, {}];
    a name in PRESETS stands for its spec."""
    out = []
    for part in PRESETS.get(spec, spec).split(";"):
        setting: dict[str, Any] = {}
        for kv in filter(None, (p.strip() for p in part.split(","))):
            key, value = kv.split("=")
            setting[key] = float(value) if "." in value else (int(value) if value.lstrip("-").isdigit() else value)
        out.append(setting)
    return out


def cumulative_outputs(session: SpikingSession, x: np.ndarray, T: int, batch: int) -> np.ndarray:
    """``[N, T + 1, C]``: the sum of the (single) output over the steps [0, t) for t = 0..T."""
    name = session.output_names[0]
    parts = []
    for i in range(0, len(x), batch):
        res = session.run_many(x[i:i + batch], list(range(1, T + 1)), t0=0)  # mean over [0, t)
        cum = [np.zeros_like(res[1][name], dtype=np.float64)]
        cum += [res[t][name].astype(np.float64) * t for t in range(1, T + 1)]
        parts.append(np.stack(cum, 1))
    return np.concatenate(parts)


def accuracy_table(cums: np.ndarray, labels: np.ndarray, Ts: list[int], t0: int, min_window: int,
                   rules: list[str]) -> dict[str, dict[int, float]]:
    """Accuracy of each readout rule at each T from the cumulative outputs."""
    table: dict[str, dict[int, float]] = {}
    for rule in rules:
        row = {}
        for T in Ts:
            s = RULES[rule](T, t0, min_window)
            row[T] = float(((cums[:, T] - cums[:, s]).argmax(1) == labels).mean())
        table[rule] = row
    return table


def tabulate_saved(folder: Path, model: str, T_max: int, rules: list[str]) -> None:
    """Print the table of every saved setting of ``model`` (``--save-cums`` files) for ``rules``."""
    files = sorted(folder.glob(f"{model}_*.npz"), key=lambda f: (f.stem != f"{model}_defaults", f.stem))
    print(f"command: `python benchmarks/knob_study.py --model {model} --from-cums DIR -T {T_max} --rules {','.join(rules)}`\n")
    header = False
    for f in files:
        with np.load(f) as z:
            cums, y, t0 = z["cums"].astype(np.float64), z["label"], int(z["t0"])
        Ts = [T for T in TS if T <= min(T_max, cums.shape[1] - 1)]
        if not header:
            print(f"model: {model}, {len(y)} test samples\n")
            print("\n".join(T_header(["setting", "readout start"], Ts)))
            header = True
        for rule, accs in accuracy_table(cums, y, Ts, t0, 4, rules).items():
            shown = f"{rule} (t0={t0})" if rule.startswith("auto") else rule
            print(f"| {f.stem[len(model) + 1:]} | {shown} | " + " | ".join(f"{accs[T] * 100:.2f}" for T in Ts) + " |")


def fixed_delays(args: argparse.Namespace, command: str) -> None:
    """One row per setting and fixed readout delay (``--t0``), read out by ``evaluate``."""
    ann, calib, test, _ = (ROOT / p if isinstance(p, str) else p for p in MODELS[args.model])
    with np.load(test) as z:
        data = {k: z[k][: args.limit or None] for k in z.files}
    Ts = [T for T in TS if T <= args.T]
    print(f"command: {command}")
    print(f"model: {MODELS[args.model][0]}, test samples: {len(data['label'])}\n")
    print("\n".join(T_header(["setting", "t0"], Ts, ["compile s"])))
    rows = []
    for setting in parse_settings(args.settings):
        start = time.perf_counter()
        session = SpikingSession(ann2snn.compile(ann, calib, **setting))
        secs = time.perf_counter() - start
        for t0 in args.t0.split(","):
            res = evaluate(ann, session, data, Ts, batch_size=1000, t0=None if t0 == "auto" else int(t0))
            label = ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"
            t0_txt = f"{res['t0']} (auto)" if t0 == "auto" else t0
            accs = " | ".join(f"{r['accuracy'] * 100:.2f}" for r in res["snn"])
            print(f"| {label} | {t0_txt} | {accs} | {secs:.1f} |", flush=True)
            rows.append({"setting": setting, "t0": res["t0"], "t0_option": t0, "compile_s": secs,
                         "accuracy": {r["T"]: r["accuracy"] for r in res["snn"]}})
    print(f"\nANN accuracy: {res['ann_accuracy'] * 100:.2f}%")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "model": args.model, "samples": len(data["label"]),
                                         "ann_accuracy": res["ann_accuracy"], "T": Ts, "rows": rows},
                                        indent=1) + "\n")


def main() -> None:
    """Run every setting and print one markdown table (and JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="fashion_vgg")
    ap.add_argument("--limit", type=int, default=1000, help="first N test samples")
    ap.add_argument("-T", type=int, default=128, help="largest T; the table shows 4, 8, ... up to it")
    ap.add_argument("--settings", default="ltb",
                    help=f"option sets 'key=value,...;...' or a preset: {', '.join(PRESETS)}")
    ap.add_argument("--rules", default=",".join(RULES), help="readout rules to tabulate")
    ap.add_argument("--t0", default=None,
                    help="instead of --rules: fixed readout delays, e.g. auto,0,2 (auto = the compiled estimate)")
    ap.add_argument("--from-cums", type=Path, default=None,
                    help="no simulation: tabulate the --save-cums files of --model in this folder")
    ap.add_argument("--sim-batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--save-cums", type=Path, default=None,
                    help="also write each setting's cumulative outputs and the labels here (.npz, for other readout rules)")
    args = ap.parse_args()
    if args.from_cums:
        tabulate_saved(args.from_cums, args.model, args.T, args.rules.split(","))
        return
    command = command_line()
    if args.t0:
        fixed_delays(args, command)
        return
    ann, calib, test, common = MODELS[args.model]
    with np.load(ROOT / test) as z:
        x, y = z["input"][: args.limit or None], z["label"][: args.limit or None]
    ann_acc = float((ann_logits(ROOT / ann, x, args.sim_batch).argmax(1) == y).mean())
    Ts = [T for T in TS if T <= args.T]
    rules = args.rules.split(",")
    print(f"command: `{command}`\n")
    print(f"model: {ann}, first {len(x)} test samples, ANN accuracy {ann_acc * 100:.2f}%. "
          f"Defaults: LTB channel-wise, K={DEFAULTS['iters']}, B={DEFAULTS['batch']}, v0={DEFAULTS['v0']}.\n")
    print("\n".join(T_header(["setting", "readout start"], Ts)), flush=True)
    rows = []
    for setting in parse_settings(args.settings):
        options = {**common, **setting}
        start = time.perf_counter()
        session = SpikingSession(ann2snn.compile(ROOT / ann, ROOT / calib, threads=args.threads, **options),
                                 threads=args.threads)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        cums = cumulative_outputs(session, x, Ts[-1], args.sim_batch)
        sim_s = time.perf_counter() - start
        label = ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"
        if args.save_cums:
            args.save_cums.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.save_cums / f"{args.model}_{label.replace(', ', '_')}.npz",
                                cums=cums.astype(np.float32), label=y, t0=session.t0)
        table = accuracy_table(cums, y, Ts, session.t0, session.min_window, rules)
        for rule, accs in table.items():
            shown = f"auto (t0={session.t0})" if rule == "auto" else rule
            print(f"| {label} | {shown} | " + " | ".join(f"{accs[T] * 100:.2f}" for T in Ts) + " |", flush=True)
        print(f"[{label}] compile {compile_s:.1f} s, simulate {sim_s:.1f} s", file=sys.stderr, flush=True)
        rows.append({"setting": setting, "t0": session.t0, "compile_s": compile_s, "simulate_s": sim_s,
                     "accuracy": table})
    if args.json:
        args.json.write_text(json.dumps({"command": command, "model": args.model, "samples": len(x),
                                         "ann_accuracy": ann_acc, "defaults": DEFAULTS, "T": Ts, "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
