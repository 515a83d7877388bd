"""The recipe search (issue 15): what ``compile --target-T`` tries and chooses, per model, and
how the chosen recipe compares with today's defaults on held-out evaluation data.

For each model: compile with ``target_T`` (the search holds out part of the calibration data),
print the candidates' figures and the search's seconds; then simulate the chosen recipe's model
and the default compile on the evaluation data (never seen by the search) and report top-1
agreement with the ANN and relative output error (mean |SNN - ANN| / mean |ANN|) at each T,
and the convergence ratio error(T = 256) / error(T = 64) (issue target: <= 0.5).

Run: ``python benchmarks/recipe_search.py [--models digits,fashion_resnet,old] [--target-T 64]
[--budget 120] [--limit 500]``; writes ``benchmarks/results/recipe_search.md`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from common import ROOT, command_line, md_row

import ann2snn
from ann2snn.runtime import SpikingSession
from ann2snn.search import format_search

OLD = ROOT / "models" / "old_exports"
MODELS = {
    "digits": (ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "data" / "digits_calib.npz",
               ROOT / "models" / "data" / "digits_test.npz"),
    "fashion_resnet": (ROOT / "models" / "fashion_resnet.onnx", ROOT / "models" / "data" / "fashion_calib.npz",
                       ROOT / "models" / "data" / "fashion_test.npz"),
    "fashion_vgg": (ROOT / "models" / "fashion_vgg.onnx", ROOT / "models" / "data" / "fashion_calib.npz",
                    ROOT / "models" / "data" / "fashion_test.npz"),
    # built by models/build_mobilenet.py (needs torch): real ImageNet weights, photo crops
    "mobilenet_v2": (ROOT / "models" / "mobilenet_v2.onnx", ROOT / "models" / "data" / "photos_calib.npz",
                     ROOT / "models" / "data" / "photos_eval.npz"),
    # built by models/build_efficientnet_lite.py --variant 1: the same photo crops at 240 x 240
    "efficientnet_lite1": (ROOT / "models" / "efficientnet_lite1.onnx", ROOT / "models" / "data" / "photos240_calib.npz",
                           ROOT / "models" / "data" / "photos240_eval.npz"),
    **{name: (OLD / f"{name}.onnx", OLD / "calib.npz", OLD / "test.npz")
       for name in ("squeezenet", "shufflenet", "inception", "densenet", "alexnet", "googlenet")},
}
GROUPS = {"old": ["squeezenet", "shufflenet", "inception", "densenet", "alexnet", "googlenet"]}


def ann_outputs(path, x: np.ndarray) -> np.ndarray:
    """The ANN's first output, in batches of its fixed batch size if it has one."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    step = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else 256
    return np.concatenate([sess.run(None, {inp.name: x[i:i + step]})[0] for i in range(0, len(x), step)])


def figures(snn, x: np.ndarray, ref: np.ndarray, Ts: list[int], batch: int = 64) -> dict[int, tuple[float, float]]:
    """(agreement, relative error) of the SNN against the ANN at each T."""
    session = SpikingSession(snn)
    name = session.output_names[0]
    outs = {T: [] for T in Ts}
    for i in range(0, len(x), batch):
        res = session.run_many({session.input_specs[0].name: x[i:i + batch]}, Ts)
        for T in Ts:
            outs[T].append(res[T][name])
    scale = float(np.abs(ref).mean())
    result = {}
    for T in Ts:
        y = np.concatenate(outs[T])
        result[T] = (float((y.argmax(1) == ref.argmax(1)).mean()), float(np.abs(y - ref).mean()) / scale)
    return result


def _number(text: str) -> int | float | str:
    """An option value from ``--options``: an int, a float, or the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="digits,fashion_resnet,old")
    parser.add_argument("--target-T", type=int, default=64)
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("-T", default="64,128,256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-default", action="store_true", help="do not simulate the default compile")
    parser.add_argument("--options", default="", help="no search: compile with these options instead, "
                        "e.g. method=percentile,neuron=signed,burst=2 (to re-measure a chosen recipe)")
    parser.add_argument("--limit", type=int, default=500, help="evaluation samples per model (0: all)")
    parser.add_argument("--spread", action="store_true", help="with --limit: samples evenly spread over the "
                        "evaluation set instead of the first ones (the photo crops are grouped by photo)")
    parser.add_argument("--sim-batch", type=int, default=64, help="samples simulated at once in the evaluation")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipe_search.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    Ts = [int(t) for t in args.T.split(",")]
    names = [m for g in args.models.split(",") for m in GROUPS.get(g, [g])]
    lines = [f"`{command_line()}`", "",
             f"Search at target T = {args.target_T}, budget {args.budget:g} s; evaluation on held-out test data "
             "(never seen by the search). agreement = top-1 agreement with the ANN, error = relative output error.", ""]
    summary = ["| model | recipe | search s | " + " | ".join(f"agree T={T}" for T in Ts) + " | "
               + " | ".join(f"error T={T}" for T in Ts) + f" | error {Ts[-1]}/{Ts[0]} |",
               "|---" * (3 + 2 * len(Ts) + 1) + "|"]
    payload = {}
    for name in names:
        model, calib, test = MODELS[name]
        x = np.load(test)["input"]
        if args.limit and args.spread:
            x = x[np.unique(np.linspace(0, len(x) - 1, min(args.limit, len(x))).round().astype(int))]
        elif args.limit:
            x = x[:args.limit]
        ref = ann_outputs(model, x)
        if args.options:
            opts = {k: _number(v) for k, v in (o.split("=") for o in args.options.split(","))}
            snn = ann2snn.compile(model, calib, threads=args.threads, **{"target_T": 0, **opts})
            f = figures(snn, x, ref, Ts, args.sim_batch)
            summary.append(md_row([name, f"given: {args.options}", "-", *(f"{f[T][0]:.1%}" for T in Ts),
                                   *(f"{f[T][1]:.4f}" for T in Ts), f"{f[Ts[-1]][1] / f[Ts[0]][1]:.2f}"]))
            print(summary[-1], file=sys.stderr)
            payload[name] = {"options": opts, **{str(T): f[T] for T in Ts}}
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            snn = ann2snn.compile(model, calib, target_T=args.target_T, search_budget=args.budget, min_agreement=0.0,
                                  threads=args.threads, report=report)
            record = json.loads(report.read_text())["search"]  # with each candidate's seconds
        seconds = time.perf_counter() - start
        lines += [f"### {name} ({len(x)} evaluation samples)", "", format_search(record),
                  f"(compile with search: {seconds:.1f} s, of which the search {record['seconds']:.1f} s; load average "
                  f"{os.getloadavg()[0]:.1f} at the end)", ""]
        rows = {f"chosen: {record['chosen_recipe']}": (snn, seconds)}
        if not args.skip_default:
            rows = {"no search (ltb/channel if)": (ann2snn.compile(model, calib, target_T=0, threads=args.threads), 0.0),
                    **rows}
        payload[name] = {"search": record, "seconds": seconds}
        for label, (m, s) in rows.items():
            f = figures(m, x, ref, Ts, args.sim_batch)
            payload[name][label] = {str(T): f[T] for T in Ts}
            ratio = f[Ts[-1]][1] / f[Ts[0]][1] if f[Ts[0]][1] > 0 else float("nan")
            summary.append(md_row([name, label, f"{s:.1f}" if s else "-", *(f"{f[T][0]:.1%}" for T in Ts),
                                   *(f"{f[T][1]:.4f}" for T in Ts), f"{ratio:.2f}"]))
            print(summary[-1], file=sys.stderr)
    text = "\n".join(lines[:4] + ["## Summary", ""] + summary + ["", "## Searches", ""] + lines[4:]) + "\n"
    out = ROOT / args.out if not args.out.startswith("/") else args.out
    with open(out, "w") as fh:
        fh.write(text)
    print(text)
    with open(str(out).replace(".md", ".json"), "w") as fh:
        json.dump(payload, fh, indent=1, sort_keys=True)
    print(out)


if __name__ == "__main__":
    main()
