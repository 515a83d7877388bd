"""The LeakyReLU YOLO-style detector (models/build_yolo.py), ANN vs SNN mAP by T, both exports.

For each export (``det_yolo.onnx``, legacy; ``det_yolo_dynamo.onnx``, dynamo) and each
``--compile-options`` string (default: ``""``, the default compile): ``ann2snn compile`` with
the calibration scenes, ``ann2snn inspect --json`` with the same graph options (which ops became
neuron sites, which stay analog and why), then mAP@0.5 and mAP@[.5:.95] of the ANN and of the SNN
at each T on the first ``--limit`` scenes of ``models/data/scenes_test.npz``, with
``ann2snn.analysis.tasks.evaluate_task`` (what ``ann2snn eval --task detection`` runs) and the
model's readout window. The issue's target: SNN mAP@[.5:.95] >= 95 % of the ANN's at T = 64.

Run: ``.venv/bin/python benchmarks/yolo.py [--limit 250] [-T 16,32,64,128]
[--compile-options "" --compile-options "--method max"] [--md benchmarks/results/yolo.md]``
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ann2snn.analysis.tasks import evaluate_task
from ann2snn.runtime import SpikingSession
from common import ROOT, T_header, command_line, md_row, write_results
from vit import inspect_summary

CALIB = ROOT / "models" / "data" / "scenes_calib.npz"
TEST = ROOT / "models" / "data" / "scenes_test.npz"
MODELS = {"legacy": ROOT / "models" / "det_yolo.onnx", "dynamo": ROOT / "models" / "det_yolo_dynamo.onnx"}
TARGET_T, TARGET_RATIO = 64, 0.95


def run_one(export: str, opts: str, Ts: list[int], limit: int, batch: int, threads: int) -> dict[str, Any]:
    """Compile one export with one option string, inspect it, and score ANN and SNN on the test scenes."""
    path = MODELS[export]
    row: dict[str, Any] = {"export": export, "options": opts, "inspect": inspect_summary(path, opts)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "snn.onnx"
        cmd = [sys.executable, "-m", "ann2snn", "compile", str(path), "--calib", str(CALIB), "-o", str(out),
               "--threads", str(threads), *shlex.split(opts)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        row["compile_s"] = time.perf_counter() - start
        if done.returncode != 0:
            row["error"] = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            return row
        session = SpikingSession(str(out), threads=threads)
        start = time.perf_counter()
        res = evaluate_task(path, session, TEST, Ts, "detection", batch_size=batch, limit=limit or None,
                            threads=threads)
        row["evaluate_s"] = time.perf_counter() - start
    row.update(samples=res["samples"], ann=res["ann"], snn=res["snn"], model_t0=session.t0,
               neuron_layers=len(session.meta["neurons"]),
               tail=sorted(session.meta["tail"]["nodes"]) if session.meta.get("tail") else [])
    at = {r["T"]: r for r in res["snn"]}
    print(f"[{export} {opts or '(defaults)'}] ANN mAP {res['ann']['map'] * 100:.2f}; "
          + ", ".join(f"T={T} {at[T]['map'] * 100:.2f}" for T in Ts), file=sys.stderr, flush=True)
    return row


def _pct(v: float) -> str:
    return f"{v * 100:.2f}"


def markdown(rows: list[dict[str, Any]], Ts: list[int]) -> str:
    """mAP tables (mAP@[.5:.95], mAP@0.5; SNN/ANN in brackets) and what inspect shows per run."""
    lines: list[str] = []
    for key, label in (("map", "mAP@[.5:.95]"), ("map50", "mAP@0.5")):
        lines += T_header(["export", "options", "neuron layers", f"ANN {label}"], Ts,
                          [f"SNN/ANN at T={TARGET_T} >= {TARGET_RATIO:.0%}"] if key == "map" else [])
        for r in rows:
            if "error" in r:
                lines.append(md_row([r["export"], f"`{r['options'] or '(defaults)'}`", f"compile failed: {r['error']}"]))
                continue
            at = {s["T"]: s for s in r["snn"]}
            cells = [f"{_pct(at[T][key])} ({at[T][key + '_ratio'] * 100:.1f}%)" for T in Ts]
            extra = []
            if key == "map":
                ratio = at[TARGET_T][key + "_ratio"] if TARGET_T in at else None
                extra = ["-" if ratio is None else ("yes" if ratio >= TARGET_RATIO else "no")]
            lines.append(md_row([r["export"], f"`{r['options'] or '(defaults)'}`", r["neuron_layers"],
                                 _pct(r["ann"][key]), *cells, *extra]))
        lines.append("")
    lines.append("What `ann2snn inspect` shows (ops by role, folded ops left out) and the compiled model's tail:")
    lines.append("")
    for r in rows:
        info = r["inspect"]
        if "error" in info:
            lines.append(f"- {r['export']}, `{r['options'] or '(defaults)'}`: inspect failed: {info['error']}")
            continue
        roles = "; ".join(f"**{role}**: " + ", ".join(f"{op} {n}" for op, n in sorted(ops.items()))
                          for role, ops in info["roles"].items())
        lines.append(f"- {r['export']}, `{r['options'] or '(defaults)'}`: {info['neuron_layers']} neuron layers; "
                     f"{roles}.")
        if "error" not in r:
            lines.append(f"  Compiled in {r['compile_s']:.1f} s, model t0 = {r['model_t0']}, {r['samples']} scenes "
                         f"evaluated in {r['evaluate_s']:.0f} s; tail ({len(r['tail'])} nodes): "
                         f"{', '.join(r['tail'])}.")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run every export and option string, write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-T", default="16,32,64,128")
    ap.add_argument("--limit", type=int, default=250, help="first N test scenes (0: all 500)")
    ap.add_argument("--exports", default=",".join(MODELS))
    ap.add_argument("--compile-options", action="append", default=None,
                    help='options for `ann2snn compile`, one string per configuration (repeatable); default: ""')
    ap.add_argument("--batch", type=int, default=25, help="simulation batch size")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    Ts = sorted(int(t) for t in args.T.split(","))
    rows = [run_one(export, opts, Ts, args.limit, args.batch, args.threads)
            for opts in (args.compile_options if args.compile_options is not None else [""])
            for export in args.exports.split(",")]
    command = command_line()
    text = f"command: `{command}`\n\n" + markdown(rows, Ts)
    write_results(text, args.md, args.json, {"command": command, "rows": rows})


if __name__ == "__main__":
    main()
