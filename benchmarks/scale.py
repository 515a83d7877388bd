"""One process against a local Ray cluster: same results, wall time (issue 17's Ray target).

The MNIST CNN (compiled into build/ if missing) runs T = 32 over N MNIST test images (default
10,000): ``run_file`` in this process with one onnxruntime thread, against
``run_file_ray`` on a local cluster of W workers with one thread each (``ray.init(num_cpus=W)``,
started before timing; its start-up is reported apart). Both write their outputs through the
same NpzWriter; the files must be identical. Repeats alternate the two; medians.
Classification ``eval`` is compared the same way (its result must be equal, float for float).

``--cases calibration``: threshold calibration of the MNIST CNN on mnist_calib.npz, one process
(one onnxruntime thread) against ``compile(..., ray=...)`` with W actors of one thread, each
batch split over them (LTB: one round trip per site and batch), for LTB at the default
K = 200, B = 64 and at K = 25, B = 512, and for max-norm. The thresholds must agree to 1e-6
relative (LTB) or exactly (max). Each case measured writes its own section of ``--md``; the
others are kept.

    .venv/bin/python benchmarks/scale.py [--images 10000] [--workers 2] [--repeats 3] [--cases run-eval,calibration]
        [--md benchmarks/results/scale.md]

Needs Ray: pip install 'ann2snn[ray]'.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, command_line, md_row, md_rule

MODEL = ROOT / "models" / "mnist_cnn.onnx"
SNN = ROOT / "build" / "mnist_cnn.snn.onnx"
T = 32


RUN_EVAL = "One process vs a local Ray cluster: run and eval"
CALIBRATION = "One process vs a local Ray cluster: threshold calibration (compile --ray)"


def main() -> None:
    """Measure and print the tables; write the measured sections into ``--md``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="run-eval,calibration", help="comma-separated: run-eval, calibration")
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    import ray

    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    unknown = cases - {"run-eval", "calibration"}
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; the cases are run-eval, calibration")
    t = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    start_s = time.perf_counter() - t
    sections = {}
    if "run-eval" in cases:
        sections[RUN_EVAL] = run_eval(args, start_s)
    if "calibration" in cases:
        sections[CALIBRATION] = calibration(args, start_s)
    for title, text in sections.items():
        print(f"## {title}\n\n{text}\n")
    if args.md:
        write_sections(args.md, sections)
    ray.shutdown()


def write_sections(path: Path, sections: dict[str, str]) -> None:
    """Replace (or add) the ``## title`` sections of the markdown file at ``path``, keeping the others."""
    head = "# One process vs a local Ray cluster (benchmarks/scale.py)"
    old: dict[str, str] = {}
    if path.exists():
        for part in path.read_text().split("\n## ")[1:]:
            title, _, body = part.partition("\n")
            old[title.strip()] = body.strip("\n")
    merged = {**old, **sections}
    path.write_text(head + "\n\n" + "\n\n".join(f"## {t}\n\n{b}" for t, b in merged.items()) + "\n")


def calibration(args: argparse.Namespace, start_s: float) -> str:
    """Calibration of the MNIST CNN, one process against the cluster: seconds and threshold agreement."""
    import onnx.numpy_helper

    import ann2snn

    calib = str(ROOT / "models" / "data" / "mnist_calib.npz")
    lines = [f"`{command_line()}`", "", f"load average at the start: {os.getloadavg()[0]:.2f}", ""]
    cases = [("ltb", 200, 64), ("ltb", 25, 512), ("max", 200, 64)]
    lines += [f"MNIST CNN ({MODEL.name}, 3 neuron layers), {calib.split('/')[-1]} (1000 samples); whole compile "
              f"(the other passes take the same in both); local Ray cluster of {args.workers} CPUs started in "
              f"{start_s:.1f} s (not in the times; the actors are); medians of {args.repeats}", "",
              md_row(["method", "K x B", "one process s", f"Ray x{args.workers} s", "/ one process",
                      "largest relative threshold difference"]), md_rule(6)]
    for method, iters, batch in cases:
        times: dict[str, list[float]] = {"one": [], "ray": []}
        thetas: dict[str, list[np.ndarray]] = {}
        for _ in range(args.repeats):
            for name, ray in (("one", ""), ("ray", "local")):
                t = time.perf_counter()
                snn = ann2snn.compile(str(MODEL), calib, method=method, iters=iters, batch=batch, threads=1, ray=ray)
                times[name].append(time.perf_counter() - t)
                thetas[name] = [onnx.numpy_helper.to_array(i) for i in snn.graph.initializer
                                if i.name.endswith("/threshold")]
        diff = max(float(np.max(np.abs(r - o) / np.maximum(np.abs(o), 1e-30)))
                   for o, r in zip(thetas["one"], thetas["ray"]))
        one, ray_s = statistics.median(times["one"]), statistics.median(times["ray"])
        lines.append(md_row([method, f"{iters} x {batch}", f"{one:.2f}", f"{ray_s:.2f}", f"{ray_s / one:.2f}",
                             f"{diff:.1e}"]))
    lines += ["", f"load average at the end: {os.getloadavg()[0]:.2f}"]
    return "\n".join(lines)


def run_eval(args: argparse.Namespace, start_s: float) -> str:
    """run and classification eval, one process against the cluster: seconds and identity."""
    from ann2snn.analysis.evaluate import evaluate
    from ann2snn.data.npyfile import NpzWriter
    from ann2snn.distributed import evaluate_ray, run_file_ray
    from ann2snn.runtime.batches import run_file

    from ann2snn.analysis.evaluate import evaluate
    from ann2snn.data.npyfile import NpzWriter
    from ann2snn.distributed import evaluate_ray, run_file_ray
    from ann2snn.runtime.batches import run_file

    if not SNN.exists():
        subprocess.run([sys.executable, "-m", "ann2snn", "-q", "compile", str(MODEL), "--calib",
                        str(ROOT / "models" / "data" / "mnist_calib.npz"), "-o", str(SNN), "--no-progress"], check=True)
    test = np.load(ROOT / "models" / "data" / "mnist_test.npz")
    lines = [f"`{command_line()}`", "", f"load average at the start: {os.getloadavg()[0]:.2f}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "test.npz"
        np.savez(data, input=np.resize(test["input"], (args.images, *test["input"].shape[1:])),
                 label=np.resize(test["label"], args.images))
        times: dict[str, list[float]] = {"run, one process": [], f"run, Ray x{args.workers}": [],
                                         "eval, one process": [], f"eval, Ray x{args.workers}": []}
        same_run = same_eval = True
        for _ in range(args.repeats):
            outs = {}
            for name in ("run, one process", f"run, Ray x{args.workers}"):
                out = Path(tmp) / f"{len(outs)}.npz"
                t = time.perf_counter()
                with NpzWriter(out) as w:
                    if "Ray" in name:
                        run = run_file_ray(str(SNN), str(data), T, address=None, t0=None, batch_size=None, form="auto",
                                           allow_nonfinite=False, threads=1, show_progress=False, sink=w.append)
                    else:
                        run = run_file(str(SNN), str(data), T, threads=1, sink=w.append)
                    w.put("ann2snn_run", np.array(str(sorted(run.info.items()))))
                times[name].append(time.perf_counter() - t)
                outs[name] = out.read_bytes()
            same_run &= len(set(outs.values())) == 1
            results = []
            for name in ("eval, one process", f"eval, Ray x{args.workers}"):
                t = time.perf_counter()
                if "Ray" in name:
                    results.append(evaluate_ray(str(MODEL), str(SNN), str(data), [T], address=None, threads=1))
                else:
                    results.append(evaluate(str(MODEL), str(SNN), str(data), [T], threads=1))
                times[name].append(time.perf_counter() - t)
            same_eval &= results[0] == results[1]
    med = {k: statistics.median(v) for k, v in times.items()}
    lines += [f"{args.images} MNIST test images (resized to that count), T = {T}, default batch; local Ray cluster "
              f"of {args.workers} CPUs started in {start_s:.1f} s (not in the times); medians of {args.repeats}", "",
              md_row(["what", "seconds", "/ one process", "identical to one process"]), md_rule(4)]
    for k, v in med.items():
        base = med["run, one process"] if k.startswith("run") else med["eval, one process"]
        same = "-" if "one process" in k else ("yes" if (same_run if k.startswith("run") else same_eval) else "NO")
        lines.append(md_row([k, f"{v:.2f}", f"{v / base:.2f}", same]))
    lines += ["", f"load average at the end: {os.getloadavg()[0]:.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
