"""Does the compiled neuron kernel library (``make kernels``, runtime/kernels) pay for itself?

For each model (compiled as benchmarks/speed.py compiles it) and batch, in one run: the time
of T ANN forward passes through onnxruntime (the faster of two sessions, with and without
thread spinning, as speed.py takes it) and the SNN's time for T steps in each runtime form,
with the kernels (``kernels=True``) and without (``kernels=False``), interleaved; each ratio
SNN / (T × ANN) is the median over repeats of the per-repeat ratio.

    .venv/bin/python benchmarks/kernels.py [--models fashion_vgg,fashion_resnet] [--batches 1,32] [-T 32]

Forms: ``auto`` (the runtime's default rule), ``step`` (one call per step, states bound),
``layered`` (``chunk`` steps per call; default: T at batch 1, LAYERED_ROWS / B otherwise; and
``--extra-chunk`` at B > 1). The last column is the dense floor of the layered form: the ANN
run on the chunk's rows at once (batch chunk·B), T / chunk times, over T ANN passes at B; the
layered form's convolutions do that much work. Process CPU time is given beside the wall
clock: on a shared machine a process waits for a core, and the CPU time does not count the
wait (``--threads 1`` keeps the ratio of the two meaningful). Needs ``make kernels``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, command_line, md_row, md_rule, write_results
from speed import REFERENCE, SIZES, ann_sessions, time_ann, time_snn

MODELS = ROOT / "models"


def timed(fn: Any) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of one model: per batch, the ANN time and every form's ratio with and without kernels."""
    import onnx

    import ann2snn
    import ann2snn.runtime.forms as forms_module
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.session import LAYERED_ROWS

    calib_name, test_name = REFERENCE[name]
    path = MODELS / f"{name}.onnx"
    compiled = ann2snn.compile(path, MODELS / "data" / f"{calib_name}.npz", iters=args.compile_iters,
                               batch=args.compile_batch, neuron=args.neuron)
    snn_path = Path(tempfile.mkdtemp(prefix="ann2snn_kernels_")) / f"{name}.snn.onnx"
    onnx.save(compiled, snn_path)
    with np.load(MODELS / "data" / f"{test_name}.npz") as z:
        xs = np.ascontiguousarray(z["input"][:max(args.batches)])
    anns = ann_sessions(path, args.threads)
    rows = []
    for B in args.batches:
        x, T = xs[:B], args.T
        chunk = T if B == 1 else max(1, -(-LAYERED_ROWS // B))
        forms = {"auto": {"mode": "auto"}, "step": {"mode": "step"}, "layered": {"mode": "layered", "chunk": chunk}}
        if B > 1 and args.extra_chunk:  # larger batches: does a layered chunk pay with the kernels?
            forms["layered+"] = {"mode": "layered", "chunk": args.extra_chunk}
        sessions = {(f, k): SpikingSession(snn_path, kernels=k, threads=args.threads or None, **kw)
                    for f, kw in forms.items() for k in (False, True)}
        if args.without_shapes:  # the layered form as before the spikes' shapes were declared (no kernels)
            sessions[("unshaped", False)] = SpikingSession(snn_path, kernels=False, threads=args.threads or None,
                                                           mode="layered", chunk=chunk)
            forms_module.SHAPE_SPIKES = False
            time_snn(sessions[("unshaped", False)], x, T)  # builds its chunk sessions now, without the shapes
            forms_module.SHAPE_SPIKES = True
        for s in sessions.values():  # warm-up: chunk sessions are built on first use, the guard runs once
            time_snn(s, x, T)
        for a in anns:
            time_ann(a, x, 3)
        times: dict[Any, list[tuple[float, float]]] = {key: [] for key in sessions}
        ann_t: list[tuple[float, float]] = []
        # the dense floor of the layered form: the ANN on the chunk's rows at once, T / chunk times
        rows_x = np.ascontiguousarray(np.concatenate([x] * chunk))
        dense_t: list[tuple[float, float]] = []
        for _ in range(args.repeats):
            ann_t.append(min((timed(lambda: time_ann(a, x, T)) for a in anns), key=lambda wc: wc[0]))
            dense_t.append(min((timed(lambda: time_ann(a, rows_x, -(-T // chunk))) for a in anns), key=lambda wc: wc[0]))
            for key, s in sessions.items():
                times[key].append(timed(lambda: time_snn(s, x, T)))
        ann = np.asarray(ann_t)
        row: dict[str, Any] = {"model": name, "batch": B, "T": T, "chunk": chunk, "extra_chunk": args.extra_chunk,
                               "ann_ms": float(np.median(ann[:, 0]) / T * 1e3),
                               "ann_cpu_ms": float(np.median(ann[:, 1]) / T * 1e3)}
        dense = np.asarray(dense_t) / ann
        row["floor"], row["floor/cpu"] = float(np.median(dense[:, 0])), float(np.median(dense[:, 1]))
        for (f, k), t in times.items():
            ratio = np.asarray(t) / ann  # per repeat: wall / wall, CPU / CPU
            row[f"{f}/{'on' if k else 'off'}"] = float(np.median(ratio[:, 0]))
            row[f"{f}/{'on' if k else 'off'}/cpu"] = float(np.median(ratio[:, 1]))
        row["auto_form"] = {"off": sessions[("auto", False)].last_form, "on": sessions[("auto", True)].last_form}
        logging.getLogger("kernels").info("%s", row)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: ratios SNN / (T × ANN) without → with the kernels, wall clock (CPU time)."""
    def cell(r: dict[str, Any], form: str) -> str:
        if f"{form}/on" not in r:
            return "-"
        return (f"{r[form + '/off']:.2f} → {r[form + '/on']:.2f} "
                f"({r[form + '/off/cpu']:.2f} → {r[form + '/on/cpu']:.2f})")

    unshaped = any("unshaped/off" in r for r in rows)

    head = ["model", "B", "T", "ANN ms / pass (CPU ms)", "auto form", "auto", "step", "layered, chunk",
            "layered, chunk", "ANN on the chunk's rows"] + (["layered without the spikes' shapes, off"] if unshaped else [])
    lines = [md_row(head), md_rule(len(head))]
    for r in rows:
        lines.append(md_row([r["model"], r["batch"], r["T"], f"{r['ann_ms']:.3f} ({r['ann_cpu_ms']:.3f})",
                             f"{r['auto_form']['off']} / {r['auto_form']['on']}", cell(r, "auto"), cell(r, "step"),
                             f"{r['chunk']}: {cell(r, 'layered')}",
                             f"{r['extra_chunk']}: {cell(r, 'layered+')}" if "layered+/on" in r else "-",
                             f"{r['floor']:.2f} ({r['floor/cpu']:.2f})"]
                            + ([f"{r['unshaped/off']:.2f} ({r['unshaped/off/cpu']:.2f})"] if unshaped else [])))
    return "\n".join(lines)


def main() -> None:
    """Parse options, run, print (and with --md, write) the table with the command."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fashion_vgg,fashion_resnet")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("-T", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    ap.add_argument("--neuron", default="if", choices=["if", "signed"])
    ap.add_argument("--compile-iters", type=int, default=SIZES["compile_iters"])
    ap.add_argument("--compile-batch", type=int, default=SIZES["compile_batch"])
    ap.add_argument("--extra-chunk", type=int, default=4, help="also time the layered form with this chunk at B > 1")
    ap.add_argument("--without-shapes", action="store_true",
                    help="also time the layered form without kernels and without its spikes' declared shapes")
    ap.add_argument("--md", type=Path, help="write the table here too")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from ann2snn.runtime.kernels import library

    if library() is None:
        sys.exit("the kernel library is not built: run `make kernels` first")
    began = time.perf_counter()
    rows = [r for name in args.models.split(",") for r in bench(name, args)]
    text = (f"    {command_line()}\n\nSNN time for T steps / (T × ANN forward passes), without → with the kernels, "
            f"wall clock (process CPU time in brackets), medians of {args.repeats} interleaved repeats "
            f"({time.perf_counter() - began:.0f} s in all):\n\n" + table(rows))
    write_results(text, args.md, None, {})


if __name__ == "__main__":
    main()
