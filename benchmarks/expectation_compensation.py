"""Expectation compensation (issue 16, first step): ``--nonlinear analog`` (nonlinear ops end the
spiking part; the analog tail runs them once on the readout) against ``--nonlinear compensate``
(they stay in the step graph), per network: where the ANN's weighted work (MACs) runs, and the
SNN's top-1 agreement with its ANN (and accuracy, where labels exist) at each T.

Networks: the exporter-matrix cells with nonlinear ops (MobileNetV3 block and transformer block,
every exporter; the CNN and embedding cells have none and are left out), on the 300 test images;
and the real PP-OCR direction classifier if ``models/fetch_real_models.py`` has cached it (rendered
text lines as in benchmarks/real_forms.py; no labels, agreement only).

Run: ``.venv/bin/python benchmarks/expectation_compensation.py [--real] [-T 16,32,64,128]``
(writes benchmarks/results/expectation_compensation.md).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from common import ROOT, command_line, mac_share_cell, md_row, md_rule, write_results
from exporter_matrix import load_matrix

MODES = ("analog", "compensate")


def shares(snn: Any) -> dict[str, float]:
    """Shares (%) of the ANN's MACs per sample: on spikes, on compensated increments, prefix, tail
    and on another weighted op's current (0 for models compiled before that was counted apart)."""
    import json

    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    m = meta["macs"]
    total = max(m.get("total", 0), 1)
    return {k: 100.0 * m.get(k, 0) / total for k in ("spiking", "compensated", "prefix", "tail", "analog_current")}


def measure(path: Path, calib: dict[str, np.ndarray], test: dict[str, np.ndarray], labels: np.ndarray | None,
            Ts: list[int], eval_batch: int, **options: Any) -> dict[str, Any]:
    """Both modes on one network: MAC shares, agreement (and accuracy) per T, compile time."""
    import ann2snn
    from ann2snn.runtime import SpikingSession

    ann = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ann_out = np.concatenate([ann.run(None, {k: v[i:i + eval_batch] for k, v in test.items()})[0]
                              for i in range(0, len(next(iter(test.values()))), eval_batch)])
    ann_top = ann_out.reshape(len(ann_out), -1).argmax(1)
    out: dict[str, Any] = {"ann_accuracy": float((ann_top == labels).mean()) if labels is not None else None}
    for mode in MODES:
        start = time.perf_counter()
        snn = ann2snn.compile(path, calib, nonlinear=mode, **options)
        seconds = time.perf_counter() - start
        session = SpikingSession(snn)
        name = ann.get_outputs()[0].name
        by_T: dict[int, list[np.ndarray]] = {T: [] for T in Ts}
        n = len(next(iter(test.values())))
        for i in range(0, n, eval_batch):
            got = session.run_many({k: v[i:i + eval_batch] for k, v in test.items()}, Ts)
            for T in Ts:
                by_T[T].append(got[T][name])
        rows = {}
        for T in Ts:
            y = np.concatenate(by_T[T])
            top = y.reshape(len(y), -1).argmax(1)
            err = float(np.abs(y - ann_out).mean() / max(np.abs(ann_out).mean(), 1e-12))
            rows[T] = {"agreement": float((top == ann_top).mean()), "relative_error": err,
                       "accuracy": float((top == labels).mean()) if labels is not None else None}
        out[mode] = {"macs": shares(snn), "by_T": rows, "compile_s": seconds,
                     "compensated_ops": len(json_meta(snn).get("compensated") or [])}
    return out


def json_meta(snn: Any) -> dict[str, Any]:
    import json

    return json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])


def real_classifier(Ts: list[int]) -> dict[str, Any] | None:
    """The PP-OCR direction classifier, if cached: fixed input 3x48x192, text-line images."""
    import sys

    sys.path.insert(0, str(ROOT / "models"))
    from fetch_real_models import cached
    from real_forms import SHAPES, fixed_input, text_lines

    src = cached("ppocr_cls")
    if src is None:
        return None
    shape = SHAPES["ppocr_cls"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ppocr_cls.onnx"
        fixed_input(src, path, shape, "N")
        import onnx

        name = onnx.load(str(path), load_external_data=False).graph.input[0].name
        calib = {name: text_lines(64, shape, seed=0)}
        test = {name: text_lines(100, shape, seed=1)}
        return measure(path, calib, test, None, Ts, 25, iters=50, batch=16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-T", default="16,32,64,128", help="timesteps, comma-separated")
    ap.add_argument("--real", action="store_true", help="also the PP-OCR classifier (if cached)")
    ap.add_argument("--nets", default="mbv3,transformer")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "expectation_compensation.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    Ts = [int(t) for t in args.T.split(",")]
    matrix = load_matrix()
    results: dict[str, dict[str, Any]] = {}
    for net, exporter in matrix.cells():
        if net not in args.nets.split(","):
            continue
        path = matrix.cell_path(net, exporter)
        results[f"{net} / {exporter}"] = measure(path, matrix.cell_inputs(path, "calib"),
                                                 matrix.cell_inputs(path, "test"), matrix.labels(), Ts,
                                                 matrix.batch_size(path, 300))
    if args.real:
        real = real_classifier(Ts)
        if real is not None:
            results["PP-OCR classifier (real; K = 50, B = 16)"] = real
    lines = [f"`{command_line()}`", "",
             "Agreement: top-1 of the SNN equal to its ANN's, % of the test inputs (accuracy against the labels "
             "in brackets where there are labels). MACs: shares of the ANN's weighted work per sample on spikes / "
             "on the real-valued increments of compensated ops (dense MACs at every step) / in the time-constant "
             "prefix / in the analog tail (+ on another weighted op's current, where a weighted op reads one).", "",
             md_row(["network", "ANN acc.", "mode", "MACs spikes / compensated / prefix / tail",
                     *(f"T={T}" for T in Ts), "rel. error T=" + str(Ts[-1])]),
             md_rule(5 + len(Ts))]
    for name, r in results.items():
        for mode in MODES:
            m = r[mode]["macs"]
            cells = []
            for T in Ts:
                row = r[mode]["by_T"][T]
                cells.append(f"{100 * row['agreement']:.1f}"
                             + (f" ({100 * row['accuracy']:.1f})" if row["accuracy"] is not None else ""))
            acc = "-" if r["ann_accuracy"] is None else f"{100 * r['ann_accuracy']:.1f}"
            lines.append(md_row([name, acc, mode, mac_share_cell(m, ("spiking", "compensated", "prefix", "tail")),
                                 *cells, f"{r[mode]['by_T'][Ts[-1]]['relative_error']:.3f}"]))
    write_results("\n".join(lines), Path(args.out), None, {})


if __name__ == "__main__":
    main()
