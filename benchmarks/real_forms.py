"""Issue 22 on real networks: every execution form against the reference, and repeated runs.

The three real pretrained networks of the issue (a MobileNetV3-class classifier, a YOLO-class
detector with SiLU and no neuron, an SVTR-class recogniser; models/fetch_real_models.py),
each compiled with the default method on synthetic inputs of the right kind (rendered text
lines for the OCR models, random shapes for the detector). Their symbolic input sizes are
fixed first (compiling symbolic spatial sizes is a separate issue). For each T: the largest
relative difference of every form from the reference (runtime/reference.py), the relative
output error against the ANN, and whether 3 consecutive `ann2snn run` processes wrote the
same bytes.

Run:  .venv/bin/python benchmarks/real_forms.py [--models ppocr_cls,yolo_det,ppocr_rec] [-T 16,32,128]
          [--iters 50] [--batch 16] [--samples 4]
"""
from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from common import ROOT

sys.path.insert(0, str(ROOT / "models"))

from fetch_real_models import fetch  # noqa: E402

#: name -> fixed input shape (batch symbolic)
SHAPES = {"ppocr_cls": (3, 48, 192), "ppocr_rec": (3, 48, 320), "yolo_det": (3, 416, 416), "ppocr_det": (3, 96, 96)}


def fixed_input(src: Path, dst: Path, shape: tuple[int, ...], batch: int | str) -> None:
    """``src`` with its input shape set to [batch, *shape] and the other shapes left to inference."""
    m = onnx.load(src)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (batch, *shape)):
        d.Clear()
        if isinstance(v, int):
            d.dim_value = v
        else:
            d.dim_param = v
    for o in m.graph.output:
        for d in o.type.tensor_type.shape.dim:
            d.Clear()
            d.dim_param = "?"
    del m.graph.value_info[:]
    onnx.save(m, dst)


def text_lines(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Rendered random text lines, RGB scaled to [-1, 1] as the PP-OCR models expect."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    c, h, w = shape
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", int(h * 0.6))
    except OSError:
        font = ImageFont.load_default()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    out = np.empty((n, c, h, w), np.float32)
    for i in range(n):
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(180, 256, 3)))
        text = "".join(rng.choice(list(alphabet), int(rng.integers(4, 14))))
        ImageDraw.Draw(img).text((int(rng.integers(0, 8)), int(h * 0.15)), text, font=font,
                                 fill=tuple(int(v) for v in rng.integers(0, 80, 3)))
        a = np.asarray(img, np.float32) / 255.0
        if rng.random() < 0.5:  # upside down: the classifier's other class
            a = a[::-1, ::-1]
        out[i] = ((a - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def shapes_scene(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random filled rectangles and discs on noise, in [0, 1]."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    out = rng.uniform(0, 0.3, (n, c, h, w)).astype(np.float32)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        for _ in range(6):
            y0, x0, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, h // 4)
            mask = ((yy - y0) ** 2 + (xx - x0) ** 2 < r * r) if rng.random() < 0.5 else \
                ((abs(yy - y0) < r) & (abs(xx - x0) < r // 2))
            out[i][:, mask] = rng.uniform(0.3, 1, (c, 1))
    return out


def main() -> None:
    import ann2snn
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.reference import reference_run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ppocr_cls,yolo_det,ppocr_rec")
    ap.add_argument("-T", default="16,32,128")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib", type=int, default=64, help="calibration inputs")
    ap.add_argument("--samples", type=int, default=4, help="evaluated inputs")
    ap.add_argument("--repeats", type=int, default=3, help="`ann2snn run` processes compared byte for byte")
    args = ap.parse_args()
    Ts = [int(t) for t in args.T.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            shape = SHAPES[name]
            # the YOLO export fixes batch 1; the recogniser's symbolic batch is folded into a Reshape
            # that then fails at other batch sizes, so it is given batch 1 too and ann2snn makes it dynamic
            batch_dim: int | str = 1 if name in ("yolo_det", "ppocr_rec") else "N"
            ann = Path(tmp) / f"{name}.onnx"
            fixed_input(fetch(name), ann, shape, batch_dim)
            make = shapes_scene if name.endswith("_det") else text_lines
            calib, x = make(args.calib, shape, 0), make(args.samples, shape, 1)
            in_name = onnx.load(ann, load_external_data=False).graph.input[0].name
            snn = Path(tmp) / f"{name}.snn.onnx"
            start = time.perf_counter()
            ann2snn.compile(ann, {in_name: calib}, snn, iters=args.iters, batch=args.batch)
            compile_s = time.perf_counter() - start
            sess = ort.InferenceSession(str(ann), providers=["CPUExecutionProvider"])
            feeds = {in_name: x}
            want = np.concatenate([sess.run(None, {in_name: x[i:i + 1]})[0] for i in range(len(x))])
            np.savez(Path(tmp) / f"{name}_x.npz", **feeds)
            forms = {"step (bound)": {"mode": "step"}, "step (unbound)": {"mode": "step", "bind": False},
                     "layered": {"mode": "layered", "chunk": 8}, "auto": {}, "compiled neuron ops":
                     {"mode": "step", "unit_thresholds": False}}
            for T in Ts:
                ref = next(iter(reference_run(snn, feeds, T).values()))
                scale = max(float(np.abs(ref).max()), 1e-12)
                diffs = {}
                for label, kw in forms.items():
                    try:
                        got = next(iter(SpikingSession(snn, guard=False, **kw).run(feeds, T).values()))
                        diffs[label] = float(np.abs(got - ref).max()) / scale
                    except ann2snn.ConfigError as exc:  # e.g. layered not available for this graph
                        diffs[label] = f"n/a ({str(exc)[:40]})"
                digests = set()
                for i in range(args.repeats):
                    out = Path(tmp) / f"{name}_{T}_{i}.npz"
                    subprocess.run([sys.executable, "-m", "ann2snn", "-q", "run", str(snn), "--input",
                                    str(Path(tmp) / f"{name}_x.npz"), "-T", str(T), "-o", str(out)], check=True,
                                   capture_output=True)
                    digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
                err = float(np.abs(ref - want).mean() / max(np.abs(want).mean(), 1e-12))
                rows.append((name, T, diffs, err, len(digests) == 1, compile_s))
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}\n")
    labels = list(rows[0][2]) if rows else []
    print("| model | T | " + " | ".join(f"{lb}: max diff / max ref" for lb in labels)
          + " | rel. error vs ANN | runs byte-identical | compile s |")
    print("|---|---|" + "---|" * (len(labels) + 3))
    for name, T, diffs, err, same, cs in rows:
        cells = [f"{d:.1e}" if isinstance(d, float) else d for d in diffs.values()]
        print(f"| {name} | {T} | " + " | ".join(cells) + f" | {err:.4f} | {'yes' if same else 'NO'} | {cs:.0f} |")


if __name__ == "__main__":
    main()
