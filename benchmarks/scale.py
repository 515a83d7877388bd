"""One process against a local Ray cluster: same results, wall time (issue 17's Ray target).

The MNIST CNN (compiled into build/ if missing) runs T = 32 over N MNIST test images (default
10,000): ``run_file`` in this process with one onnxruntime thread, against
``run_file_ray`` on a local cluster of W workers with one thread each (``ray.init(num_cpus=W)``,
started before timing; its start-up is reported apart). Both write their outputs through the
same NpzWriter; the files must be identical. Repeats alternate the two; medians.
Classification ``eval`` is compared the same way (its result must be equal, float for float).

    .venv/bin/python benchmarks/scale.py [--images 10000] [--workers 2] [--repeats 3] [--md benchmarks/results/scale.md]

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


def main() -> None:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    import ray

    from ann2snn.analysis.evaluate import evaluate
    from ann2snn.data.npyfile import NpzWriter
    from ann2snn.distributed import evaluate_ray, run_file_ray
    from ann2snn.runtime.batches import run_file

    if not SNN.exists():
        subprocess.run([sys.executable, "-m", "ann2snn", "-q", "compile", str(MODEL), "--calib",
                        str(ROOT / "models" / "data" / "mnist_calib.npz"), "-o", str(SNN), "--no-progress"], check=True)
    test = np.load(ROOT / "models" / "data" / "mnist_test.npz")
    lines = [f"`{command_line()}`", "", f"load average at the start: {os.getloadavg()[0]:.2f}", ""]
    t = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    start_s = time.perf_counter() - t
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
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text("# One process vs a local Ray cluster (benchmarks/scale.py)\n\n" + text + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
