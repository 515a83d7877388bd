"""ANN vs SNN accuracy against T on the reference models, for four threshold calibrations.

For each model and calibration (LTB channel-wise, LTB layer-wise, max-norm, 99.99 %
percentile norm) the model is compiled once and simulated once; the readout is taken at
every T. The first ``--limit`` test samples are simulated up to T = 64 and the first
``--large-limit`` of them up to the largest T (one simulation: the subset is the first chunk),
so T <= 64 columns are over ``--limit`` samples and T > 64 columns over ``--large-limit``.
Calibration data (train split / calibration crops) and test data are disjoint.

Writes a markdown table (stdout and ``--md``), JSON (``--json``) and, if matplotlib is
installed, a PNG plot of accuracy against T (``--png``). Run:

    .venv/bin/python benchmarks/accuracy.py [--models mnist,fashion_vgg,...] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import ann2snn
import numpy as np
import onnxruntime as ort
from ann2snn.runtime import SpikingSession
from common import ROOT, T_axis, T_header, command_line, pyplot, save_figure, write_results

# name: (ANN, calibration data, test data, calibration options common to all methods)
MODELS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "mnist": ("models/mnist_cnn.onnx", "models/data/mnist_calib.npz", "models/data/mnist_test.npz", {}),
    "fashion_vgg": ("models/fashion_vgg.onnx", "models/data/fashion_calib.npz", "models/data/fashion_test.npz", {}),
    "fashion_resnet": ("models/fashion_resnet.onnx", "models/data/fashion_calib.npz", "models/data/fashion_test.npz", {}),
    # Labels of photos_eval.npz are the ANN's own top-1 answers: accuracy = agreement.
    "mobilenet_v2": ("models/mobilenet_v2.onnx", "models/data/photos_calib.npz", "models/data/photos_eval.npz",
                     {"batch": 16, "iters": 20}),
}
METHODS: dict[str, dict[str, Any]] = {
    "ltb-channel": {"method": "ltb", "granularity": "channel"},
    "ltb-layer": {"method": "ltb", "granularity": "layer"},
    "max": {"method": "max"},
    "percentile": {"method": "percentile", "percentile": 99.99},
    # the same calibrations with signed neurons (--neuron signed, read out from t = 0)
    "ltb-channel+signed": {"method": "ltb", "granularity": "channel", "neuron": "signed"},
    "max+signed": {"method": "max", "neuron": "signed"},
    "percentile+signed": {"method": "percentile", "percentile": 99.99, "neuron": "signed"},
    "percentile+signed+burst2": {"method": "percentile", "percentile": 99.99, "neuron": "signed", "burst": 2},
    "ltb-channel+signed+burst2": {"method": "ltb", "granularity": "channel", "neuron": "signed", "burst": 2},
}
#: the methods run when --methods is not given (the paper's four calibrations)
DEFAULT_METHODS = ("ltb-channel", "ltb-layer", "max", "percentile")
SMALL_T_MAX = 64


def ann_logits(path: Path, x: np.ndarray, batch: int) -> np.ndarray:
    """The ANN's output on ``x`` with onnxruntime."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def simulate(session: SpikingSession, x: np.ndarray, Ts: list[int], large: int, batch: int,
             t0: int | None, split: int = SMALL_T_MAX) -> dict[int, np.ndarray]:
    """SNN outputs: T <= ``split`` on all of ``x``, larger T on its first ``large`` rows."""
    small = [T for T in Ts if T <= split]
    big = [T for T in Ts if T > split]
    out_name = session.output_names[0]
    outs: dict[int, list[np.ndarray]] = {T: [] for T in Ts}
    i = 0
    while i < len(x):
        n = min(batch, large - i) if big and i < large else min(batch, len(x) - i)
        res = session.run_many(x[i:i + n], (small + big) if big and i < large else small, t0)
        for T, r in res.items():
            outs[T].append(r[out_name])
        i += n
    return {T: np.concatenate(v) for T, v in outs.items() if v}


def run_model(name: str, Ts: list[int], limit: int, large: int, batch: int, methods: list[str],
              t0: int | None, threads: int = 2, split: int = SMALL_T_MAX) -> dict[str, Any]:
    """Compile the model with each method, simulate, and collect accuracies."""
    ann, calib, test, common = MODELS[name]
    with np.load(ROOT / test) as z:
        x, labels = z["input"][: limit or None], z["label"][: limit or None]
    large = min(large or len(x), len(x))
    ref = ann_logits(ROOT / ann, x, batch)
    ann_pred = ref.argmax(1)
    result: dict[str, Any] = {
        "ann": ann, "calib": calib, "test": test, "samples": len(x), "large_T_samples": large, "split_T": split,
        "ann_accuracy": float((ann_pred == labels).mean()),
        "ann_accuracy_large_subset": float((ann_pred[:large] == labels[:large]).mean()),
        "methods": {},
    }
    for method in methods:
        options = {**common, **METHODS[method]}
        start = time.perf_counter()
        snn = ann2snn.compile(ROOT / ann, ROOT / calib, threads=threads, **options)
        compile_s = time.perf_counter() - start
        session = SpikingSession(snn, threads=threads)
        start = time.perf_counter()
        outs = simulate(session, x, Ts, large, batch, t0, split)
        sim_s = time.perf_counter() - start
        rows = {}
        for T, y in outs.items():
            pred = y.argmax(1)
            n = len(y)
            rows[T] = {"samples": n, "accuracy": float((pred == labels[:n]).mean()),
                       "agreement": float((pred == ann_pred[:n]).mean())}
        result["methods"][method] = {"options": options, "compile_s": compile_s, "simulate_s": sim_s,
                                     "t0": session.t0 if t0 is None else t0, "T": rows}
        accs = ", ".join(f"T={T}: {r['accuracy'] * 100:.2f}" for T, r in rows.items())
        print(f"[{name} {method}] compile {compile_s:.1f} s, simulate {sim_s:.1f} s; {accs}", file=sys.stderr, flush=True)
    return result


def markdown(name: str, res: dict[str, Any], Ts: list[int]) -> str:
    """One model's table: a row per method, a column per T (the Ts that were simulated)."""
    Ts = [T for T in Ts if all(T in m["T"] for m in res["methods"].values())]
    is_agree = name == "mobilenet_v2"
    what = "top-1 agreement with the ANN" if is_agree else "accuracy"
    split = res.get("split_T", SMALL_T_MAX)
    head = (f"**{name}** ({res['ann']}): SNN {what} in %, T <= {split} over {res['samples']} samples, "
            f"T > {split} over the first {res['large_T_samples']}. ANN accuracy "
            f"{res['ann_accuracy'] * 100:.2f}% (first {res['large_T_samples']}: {res['ann_accuracy_large_subset'] * 100:.2f}%)"
            + (" (labels are the ANN's answers)" if is_agree else "") + ".")
    lines = [head, "", *T_header(["method", "t0"], Ts, ["compile s"])]
    for method, m in res["methods"].items():
        cells = " | ".join(f"{m['T'][T]['accuracy'] * 100:.2f}" for T in Ts)
        lines.append(f"| {method} | {m['t0']} | {cells} | {m['compile_s']:.1f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], Ts: list[int], path: Path) -> bool:
    """SNN accuracy minus the ANN's on the same test images, against T, one panel per model
    (runs over different subsets stay comparable); False if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        lows = []
        for part in [res, *res.get("parts", [])]:
            split = part.get("split_T", SMALL_T_MAX)
            for method, m in part["methods"].items():
                ts = [T for T in Ts if T in m["T"]]
                ann = [part["ann_accuracy"] if T <= split else part["ann_accuracy_large_subset"] for T in ts]
                # MobileNetV2's labels are the ANN's answers: plot the agreement itself
                gap = [(m["T"][T]["accuracy"] - (0.0 if name == "mobilenet_v2" else a)) * 100 for T, a in zip(ts, ann)]
                n = f"{part['samples']}/{part['large_T_samples']}"
                ax.plot(ts, gap, marker="o", ms=3, label=f"{method} ({n} imgs)")
                lows += [g for T, g in zip(ts, gap) if T >= 16]
        ax.axhline(100.0 if name == "mobilenet_v2" else 0.0, color="k", ls="--", lw=1, label="ANN")
        T_axis(ax, Ts, name, "agreement with ANN (%)" if name == "mobilenet_v2" else "SNN - ANN accuracy (points)")
        if name == "mobilenet_v2":
            ax.set_ylim(0.0, 101.0)
        else:
            ax.set_ylim(max(-100.0, min(lows, default=-5) - 1), max(1.0, max(lows, default=0) + 0.5))
    save_figure(fig, path)
    return True


def main() -> None:
    """Parse options, run every model, print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist,fashion_vgg,fashion_resnet,mobilenet_v2")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("-T", default="4,8,16,32,64,128,256")
    ap.add_argument("--limit", type=int, default=0, help="first N test samples for T <= 64 (0: all)")
    ap.add_argument("--large-limit", type=int, default=1000, help="first N test samples for T > 64 (0: same as --limit)")
    ap.add_argument("--batch", type=int, default=500, help="simulation batch size")
    ap.add_argument("--t0", type=int, default=None, help="readout delay (default: the compiled estimate)")
    ap.add_argument("--split-T", type=int, default=SMALL_T_MAX,
                    help="T up to this over --limit samples, larger T over --large-limit")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (calibration and simulation)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="do not simulate: combine earlier --json files (per model, methods are merged) into one table/plot")
    args = ap.parse_args()
    Ts = sorted(int(t) for t in args.T.split(","))
    command = command_line()
    results: dict[str, Any] = {}
    commands = []
    if args.merge:
        for path in args.merge:
            saved = json.loads(path.read_text())
            commands.append(saved["command"])
            for name, res in saved["results"].items():
                for m in res["methods"].values():
                    m["T"] = {int(T): r for T, r in m["T"].items()}
                if name in results:
                    results[name].setdefault("parts", []).append(res)
                else:
                    results[name] = res
    else:
        for name in args.models.split(","):
            results[name] = run_model(name, Ts, args.limit, args.large_limit, args.batch, args.methods.split(","), args.t0,
                                      args.threads, args.split_T)
    parts = [markdown(n, r, Ts) + "".join("\n\n" + markdown(n, p, Ts) for p in r.get("parts", []))
             for n, r in results.items()]
    text = "\n".join(f"command: `{c}`" for c in commands or [command]) + "\n\n" + "\n\n".join(parts)
    write_results(text, args.md, args.json, {"command": command, "T": Ts, "results": results})
    if args.png and not plot(results, Ts, args.png):
        print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
