"""Segmentation (mIoU) and detection (mAP) of the scene models, ANN vs SNN against T and the
readout window, next to the paper's SNN/ANN ratios.

For each model: compile with the default options (LTB channel-wise, the default K and batch,
``--neuron`` IF or signed;
the compile time is recorded), then evaluate the ANN once and the SNN at every T and readout
window with ``ann2snn.analysis.tasks.evaluate_task`` on the first ``--limit`` scenes of
``models/data/scenes_test.npz``. Readouts: ``model`` (the compiled t0 estimate), fractions of T
(``0.5`` = the paper's t0 = T/2 for segmentation) and fixed delays (``t0=0``). One simulation
serves every T of a fixed t0; a fraction of T needs one simulation per T.

Writes a markdown table (stdout and ``--md``), JSON (``--json``) and, if matplotlib is
installed, a PNG of the metric against T (``--png``). Run one model at a time, then merge:

    nice -n 5 .venv/bin/python benchmarks/dense.py --models seg_fcn --json benchmarks/results/dense_seg_fcn.json
    .venv/bin/python benchmarks/dense.py --merge benchmarks/results/dense_*.json \
        --md benchmarks/results/dense.md --png benchmarks/results/dense.png
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import ann2snn
from ann2snn.analysis.tasks import Readout, evaluate_task
from ann2snn.runtime import SpikingSession
from common import ROOT, T_axis, T_header, command_line, pyplot, save_figure, write_results

CALIB = "models/data/scenes_calib.npz"
TEST = "models/data/scenes_test.npz"
# name: (ANN, task, the paper's networks it is compared with)
MODELS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "seg_fcn": ("models/seg_fcn.onnx", "segmentation", ("FCN-18",)),
    "seg_deeplab": ("models/seg_deeplab.onnx", "segmentation", ("DeepLab-34",)),
    "det_fcos": ("models/det_fcos.onnx", "detection", ("RetinaNet-50", "FCOS-50")),
}
# The paper's figures (VOC mIoU, COCO mAP@[.5:.95]): ANN, then SNN by T (arXiv 2409.03368 v2).
PAPER: dict[str, tuple[float, dict[int, float]]] = {
    "FCN-18": (47.30, {32: 43.49, 64: 47.02, 128: 47.26}),
    "DeepLab-34": (58.95, {32: 41.20, 64: 55.74, 128: 58.36}),
    "RetinaNet-50": (36.4, {32: 16.6, 64: 27.3, 128: 32.2, 256: 34.3}),
    "FCOS-50": (39.2, {32: 12.2, 64: 26.5, 128: 32.1, 256: 33.6}),
}


def parse_readout(spec: str) -> Readout:
    """'model', 't0=N' or a fraction of T such as '0.5'."""
    if spec == "model":
        return Readout()
    if spec.startswith("t0="):
        return Readout(t0=int(spec[3:]))
    return Readout(frac=float(spec))


def run_model(name: str, Ts: list[int], readouts: list[Readout], limit: int, batch: int,
              threads: int, save_dir: Path | None = None, neuron: str = "if") -> dict[str, Any]:
    """Compile one model (written to ``save_dir`` if given) and evaluate it at every T and readout."""
    ann, task, _ = MODELS[name]
    start = time.perf_counter()
    out = save_dir / f"{name}.snn.onnx" if save_dir else None
    snn = ann2snn.compile(ROOT / ann, ROOT / CALIB, out, threads=threads, neuron=neuron)
    compile_s = time.perf_counter() - start
    session = SpikingSession(snn, threads=threads)
    start = time.perf_counter()
    res = evaluate_task(ROOT / ann, session, ROOT / TEST, Ts, task, readouts=readouts, batch_size=batch,
                        limit=limit or None, threads=threads)
    eval_s = time.perf_counter() - start
    res.update({"ann_path": ann, "compile_s": compile_s, "evaluate_s": eval_s, "model_t0": session.t0, "neuron": neuron,
                "neuron_layers": len(session.meta["neurons"]),
                "neurons": sum(n["units"] for n in session.meta["neurons"])})
    key = res["metric"]
    best = ", ".join(f"T={r['T']} {r['readout']}: {r[key] * 100:.1f}" for r in res["snn"])
    print(f"[{name}] compile {compile_s:.1f} s, evaluate {eval_s:.1f} s; ANN {res['ann'][key] * 100:.1f}; {best}",
          file=sys.stderr, flush=True)
    return res


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def markdown(name: str, res: dict[str, Any]) -> str:
    """One model's tables: metric and SNN/ANN ratio by readout (rows) and T (columns), with the paper's ratios."""
    task = res["task"]
    Ts = sorted({r["T"] for r in res["snn"]})
    readouts = list(dict.fromkeys(r["readout"] for r in res["snn"]))
    by = {(r["readout"], r["T"]): r for r in res["snn"]}
    ann = res["ann"]
    if task == "segmentation":
        metrics = [("miou", "mIoU")]
        ann_text = f"mIoU {ann['miou'] * 100:.2f}%, pixel accuracy {ann['pixel_accuracy'] * 100:.2f}%"
    else:
        metrics = [("map50", "mAP@0.5"), ("map", "mAP@[.5:.95]")]
        ann_text = f"mAP@0.5 {ann['map50'] * 100:.2f}%, mAP@[.5:.95] {ann['map'] * 100:.2f}%"
    lines = [(f"**{name}** ({res['ann_path']}, {task}): {res['samples']} test scenes; compiled with the defaults"
              f"{', --neuron signed' if res.get('neuron') == 'signed' else ''} in "
             f"{res['compile_s']:.1f} s ({res['neuron_layers']} neuron layers, {res['neurons']:,} neurons, "
             f"model t0 = {res['model_t0']}); evaluation {res['evaluate_s']:.0f} s. ANN: {ann_text}."), ""]
    for key, label in metrics:
        lines += T_header([f"{label}: readout"], Ts)
        for ro in readouts:
            cells = []
            for T in Ts:
                r = by[(ro, T)]
                cells.append(f"{r[key] * 100:.2f} ({_ratio(r[key + '_ratio'])}, t0={r['t0']})")
            lines.append(f"| {ro} | " + " | ".join(cells) + " |")
        lines.append("")
    metric, key = ("mIoU", "miou") if task == "segmentation" else ("mAP@[.5:.95]", "map")
    lines += T_header([f"SNN/ANN {metric}"], Ts)
    for paper in MODELS[name][2]:
        p_ann, p_snn = PAPER[paper]
        cells = [f"{p_snn[T] / p_ann * 100:.1f}%" if T in p_snn else "-" for T in Ts]
        lines.append(f"| paper, {paper} | " + " | ".join(cells) + " |")
    for ro in readouts:
        lines.append(f"| ours, readout {ro} | " + " | ".join(_ratio(by[(ro, T)][key + "_ratio"]) for T in Ts) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Metric against T, one panel per model and one line per readout; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(4.4 * len(results), 3.7), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        Ts = sorted({r["T"] for r in res["snn"]})
        keys = [("miou", "mIoU", "-")] if res["task"] == "segmentation" else [("map50", "mAP@0.5", "-"),
                                                                              ("map", "mAP@[.5:.95]", ":")]
        for i, ro in enumerate(dict.fromkeys(r["readout"] for r in res["snn"])):
            rows = sorted((r for r in res["snn"] if r["readout"] == ro), key=lambda r: r["T"])
            for key, label, ls in keys:
                ax.plot([r["T"] for r in rows], [r[key] * 100 for r in rows], ls=ls, marker="o", ms=3, color=f"C{i}",
                        label=f"SNN {label}, {ro}")
        for key, label, ls in keys:
            ax.axhline(res["ann"][key] * 100, color="k", ls="--" if ls == "-" else ":", lw=1, label=f"ANN {label}")
        T_axis(ax, Ts, f"{name} ({res['samples']} scenes)", "mIoU (%)" if res["task"] == "segmentation" else "mAP (%)")
    save_figure(fig, path)
    return True


def main() -> None:
    """Parse options, run the models (or merge earlier runs), print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("-T", default="16,32,64,128,256")
    ap.add_argument("--readouts", default="model,0.5,0.25,t0=0",
                    help="comma-separated: model, t0=N, or a fraction of T (0.5 = T/2)")
    ap.add_argument("--limit", type=int, default=0, help="first N test scenes (0: all 500)")
    ap.add_argument("--batch", type=int, default=25, help="simulation batch size")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    ap.add_argument("--neuron", default="if", choices=["if", "signed"], help="neuron model (compile --neuron)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--save-snn", type=Path, default=None, help="write the compiled models here (for dense_pictures.py)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="do not run: combine earlier --json files")
    args = ap.parse_args()
    command = command_line()
    results: dict[str, Any] = {}
    commands: list[str] = []
    if args.merge:
        for path in args.merge:
            saved = json.loads(path.read_text())
            commands.append(saved["command"])
            results.update(saved["results"])
    else:
        Ts = sorted(int(t) for t in args.T.split(","))
        readouts = [parse_readout(s.strip()) for s in args.readouts.split(",") if s.strip()]
        for name in args.models.split(","):
            if not (ROOT / MODELS[name][0]).exists():
                print(f"[{name}] {MODELS[name][0]} is not built: skipped", file=sys.stderr)
                continue
            results[name] = run_model(name, Ts, readouts, args.limit, args.batch, args.threads, args.save_snn,
                                      args.neuron)
        commands = [command]
    text = "\n".join(f"command: `{c}`" for c in commands) + "\n\n" + "\n\n".join(
        markdown(n, r) for n, r in results.items())
    write_results(text, args.md, args.json, {"command": command, "results": results})
    if args.png and not plot(results, args.png):
        print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
