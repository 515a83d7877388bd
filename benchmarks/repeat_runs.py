"""Issue 22 target: 20 repeated `ann2snn run` calls give byte-identical outputs, on every
reference model in models/.

Each model is compiled once with the defaults (iterations lowered with --iters to keep the
run short; the outputs' repeatability does not depend on them), then `ann2snn run` runs
--repeats times as separate processes on the same inputs (--samples test inputs, batch size
--batch-size so that the rule picks both forms where it can), and the sha256 of every
output file is compared.

Run:  .venv/bin/python benchmarks/repeat_runs.py [--repeats 20] [-T 32] [--samples 40] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT

MODELS = ROOT / "models"
#: model -> (calibration data, test data)
REFERENCE = {
    "mnist_cnn": ("mnist_calib", "mnist_test"), "digits_cnn": ("digits_calib", "digits_test"),
    "digits_cnn_dynamo": ("digits_calib", "digits_test"), "digits_cnn_opset11": ("digits_calib", "digits_test"),
    "fashion_vgg": ("fashion_calib", "fashion_test"), "fashion_resnet": ("fashion_calib", "fashion_test"),
    "keras_cnn": ("keras_calib", "keras_test"), "sklearn_mlp": ("sklearn_calib", "sklearn_test"),
    "seg_fcn": ("scenes_calib", "scenes_test"), "seg_deeplab": ("scenes_calib", "scenes_test"),
    "det_fcos": ("scenes_calib", "scenes_test"),
}
NOT_INPUTS = {"label", "mask", "boxes", "box_labels", "box_image"}


def main() -> None:
    import ann2snn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(REFERENCE))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("-T", type=int, default=32)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            calib, test = REFERENCE[name]
            snn = Path(tmp) / f"{name}.snn.onnx"
            ann2snn.compile(MODELS / f"{name}.onnx", MODELS / "data" / f"{calib}.npz", snn, iters=args.iters)
            with np.load(MODELS / "data" / f"{test}.npz") as z:
                x = {k: z[k][:args.samples] for k in z.files if k not in NOT_INPUTS}
            np.savez(Path(tmp) / "x.npz", **x)
            digests, forms, start = [], None, time.perf_counter()
            for i in range(args.repeats):
                out = Path(tmp) / f"{name}_{i}.npz"
                subprocess.run([sys.executable, "-m", "ann2snn", "-q", "run", str(snn), "--input", str(Path(tmp) / "x.npz"),
                                "-T", str(args.T), "--batch-size", str(args.batch_size), "-o", str(out)],
                               check=True, capture_output=True)
                digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
                if forms is None:
                    with np.load(out) as z:
                        forms = json.loads(str(z["ann2snn_run"]))["forms"]
                out.unlink()
            rows.append((name, len(set(digests)), digests[0][:12], forms, time.perf_counter() - start))
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}\n")
    print(f"{args.repeats} `ann2snn run` processes per model, T = {args.T}, {args.samples} inputs, "
          f"--batch-size {args.batch_size}\n")
    print("| model | distinct outputs | sha256 | forms used | seconds |")
    print("|---|---|---|---|---|")
    for name, distinct, sha, forms, secs in rows:
        print(f"| {name} | {distinct} | {sha} | {', '.join(forms or [])} | {secs:.0f} |")
    if any(r[1] != 1 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
