"""Pictures of dense predictions: for a few test scenes, the input, the ground truth, the ANN's
prediction and the SNN's at several T side by side (masks colour-coded by class, boxes drawn
with their class and score). One PNG per model, under benchmarks/results/.

    .venv/bin/python benchmarks/dense_pictures.py [--models seg_fcn,seg_deeplab,det_fcos] \
        [--scenes 0,1,2,3] [-T 16,32,64,256] [--t0-frac 0.5]

Needs matplotlib (e.g. /tmp/torchenv/bin/python, or pip install matplotlib).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import ann2snn
import numpy as np
from ann2snn.runtime import SpikingSession
from ann2snn.analysis.metrics import detection_ap, segmentation_metrics
from ann2snn.analysis.tasks import Readout, evaluate_task

from common import ROOT, command_line, pyplot
from dense import CALIB, MODELS, TEST

FASHION = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


def palette(n: int) -> np.ndarray:
    """RGB colours in [0, 1]: black for class 0 (background), distinct hues for the others."""
    import matplotlib

    colours = np.zeros((max(n, 1), 3))
    cmap = matplotlib.colormaps["tab10"]
    for c in range(1, n):
        colours[c] = cmap((c - 1) % 10)[:3]
    return colours


def subset(arrays: dict[str, np.ndarray], idx: list[int], input_name: str) -> dict[str, np.ndarray]:
    """The chosen scenes of a scenes file, boxes renumbered to their position in ``idx``."""
    out = {input_name: arrays[input_name][idx]}
    if "mask" in arrays:
        out["mask"] = arrays["mask"][idx]
    if "boxes" in arrays:
        keep = np.isin(arrays["box_image"], idx)
        where = {int(i): k for k, i in enumerate(idx)}
        out["boxes"] = arrays["boxes"][keep]
        out["box_labels"] = arrays["box_labels"][keep]
        out["box_image"] = np.array([where[int(i)] for i in arrays["box_image"][keep]], np.int64)
    return out


def draw_boxes(ax: Any, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None,
               colours: np.ndarray) -> None:
    """The grey input with boxes (class colour) and their class (and score) written on top."""
    from matplotlib.patches import Rectangle

    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    for k, (b, c) in enumerate(zip(boxes, labels)):
        col = colours[int(c) + 1]  # the mask palette: box class c is mask class c + 1
        ax.add_patch(Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False, ec=col, lw=1.2))
        text = FASHION[int(c)] if int(c) < len(FASHION) else str(int(c))
        if scores is not None:
            text += f" {scores[k]:.2f}"
        ax.text(b[0] - 0.5, b[1] - 1.0, text, color=col, fontsize=5, va="bottom")


def picture(name: str, scenes: list[int], Ts: list[int], readout: Readout, score_thr: float, path: Path,
            threads: int, snn_dir: Path | None = None) -> None:
    """Compile ``name`` (or load ``snn_dir/<name>.snn.onnx``), predict the chosen scenes with the
    ANN and the SNN, and save the grid."""
    plt = pyplot()
    if plt is None:
        raise ImportError("dense_pictures.py needs matplotlib")
    ann, task, _ = MODELS[name]
    saved = snn_dir / f"{name}.snn.onnx" if snn_dir else None
    snn = saved if saved and saved.exists() else ann2snn.compile(ROOT / ann, ROOT / CALIB, threads=threads)
    session = SpikingSession(snn, threads=threads)
    input_name = session.input_specs[0].name
    with np.load(ROOT / TEST) as z:
        data = subset({k: z[k] for k in z.files}, scenes, input_name)
    res = evaluate_task(ROOT / ann, session, data, Ts, task, readouts=[readout], batch_size=len(scenes),
                        keep_predictions=True, threads=threads)
    preds = res["predictions"]
    columns = [("ANN", preds["ann"])] + [(f"SNN T={T} (t0={r['t0']})", preds[(readout.label, T)])
                                         for T, r in zip(Ts, res["snn"])]
    n_cls = 11 if task == "detection" else max(11, int(np.max(data["mask"])) + 1)
    colours = palette(n_cls)
    fig, axes = plt.subplots(len(scenes), 2 + len(columns), figsize=(1.9 * (2 + len(columns)), 2.0 * len(scenes)),
                             squeeze=False)
    for row, scene in enumerate(scenes):
        image = data[input_name][row, 0]
        axes[row, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_ylabel(f"scene {scene}", fontsize=7)
        if task == "segmentation":
            gt = data["mask"][row]
            axes[row, 1].imshow(colours[np.minimum(gt, n_cls - 1)])
            for col, (title, pred) in enumerate(columns):
                m = segmentation_metrics(pred[row], gt, n_cls)
                axes[row, 2 + col].imshow(colours[np.minimum(pred[row], n_cls - 1)])
                axes[row, 2 + col].set_xlabel(f"mIoU {m['miou'] * 100:.0f}%", fontsize=6)
                if row == 0:
                    axes[0, 2 + col].set_title(title, fontsize=7)
        else:
            sel = data["box_image"] == row
            draw_boxes(axes[row, 1], image, data["boxes"][sel], data["box_labels"][sel], None, colours)
            for col, (title, dets) in enumerate(columns):
                d = dets[(dets[:, 0] == row) & (dets[:, 2] >= score_thr)]
                draw_boxes(axes[row, 2 + col], image, d[:, 3:7], d[:, 1], d[:, 2], colours)
                one = dets[dets[:, 0] == row].copy()
                one[:, 0] = 0
                ap = detection_ap(one, data["boxes"][sel], data["box_labels"][sel], np.zeros(int(sel.sum()), int),
                                  iou_thresholds=[0.5])["map50"]
                axes[row, 2 + col].set_xlabel(f"AP@0.5 {ap * 100:.0f}%" if ap is not None else "", fontsize=6)
                if row == 0:
                    axes[0, 2 + col].set_title(title, fontsize=7)
    axes[0, 0].set_title("input", fontsize=7)
    axes[0, 1].set_title("ground truth", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    from matplotlib.patches import Patch

    names = ["background", *FASHION]
    fig.legend(handles=[Patch(color=colours[c], label=names[c] if c < len(names) else str(c))
                        for c in range(0 if task == "segmentation" else 1, n_cls)],
               loc="lower center", ncol=11, fontsize=6, frameon=False)
    what = "masks" if task == "segmentation" else f"boxes with score >= {score_thr}"
    fig.suptitle(f"{name}: {what}; readout {readout.label}", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    """Parse options and write one PNG per model."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--scenes", default="0,1,2,3", help="indices of test scenes")
    ap.add_argument("-T", default="16,32,64,256")
    ap.add_argument("--t0-frac", type=float, default=None, help="readout t0 = floor(F*T) (default: the model's t0)")
    ap.add_argument("--t0", type=int, default=None, help="fixed readout t0 (default: the model's)")
    ap.add_argument("--score-thr", type=float, default=0.45, help="detections drawn from this score up")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--snn-dir", type=Path, default=None,
                    help="load <name>.snn.onnx from here (dense.py --save-snn) instead of compiling")
    args = ap.parse_args()
    scenes = [int(s) for s in args.scenes.split(",")]
    Ts = sorted(int(t) for t in args.T.split(","))
    readout = Readout(args.t0, args.t0_frac)
    print(f"command: {command_line()}")
    for name in args.models.split(","):
        if not (ROOT / MODELS[name][0]).exists():
            print(f"[{name}] {MODELS[name][0]} is not built: skipped", file=sys.stderr)
            continue
        path = args.out_dir / f"pictures_{name}.png"
        picture(name, scenes, Ts, readout, args.score_thr, path, args.threads, args.snn_dir)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
