"""Where the time goes, by onnxruntime's own profiler: kernel time per op type of the ANN's
forward pass, of one SNN step (the runtime's reduced step graph, as ``run`` executes it) and
of one LTB calibration iteration, at the same batch.

    .venv/bin/python benchmarks/profile_ops.py --model fashion_resnet --batch 32

Profiling adds overhead to every kernel, so read the shares, not the absolute times. The LTB
rows also give the calibration loop's wall time per iteration (its own timer), to show how
much of it is onnxruntime's kernels.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT

MODELS = ROOT / "models"
DATA = {"mnist_cnn": ("mnist_calib", "mnist_test"), "fashion_vgg": ("fashion_calib", "fashion_test"),
        "fashion_resnet": ("fashion_calib", "fashion_test"), "mobilenet_v2": ("photos_calib", "photos_eval")}


def kernel_times(sess: Any, runs: int) -> dict[str, tuple[float, int]]:
    """op type -> (kernel µs per run, nodes per run), from the session's profile."""
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    total: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    return {op: (total[op] / runs, count[op] // runs) for op in total}


def table(title: str, times: dict[str, tuple[float, int]], extra: str = "") -> str:
    """A markdown table of ``times``, largest first."""
    whole = sum(t for t, _ in times.values())
    lines = [f"**{title}**: {whole:.0f} µs of kernels per run{extra}", "",
             "| op | µs per run | share | nodes per run |", "|---|---|---|---|"]
    for op, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {op} | {t:.0f} | {100 * t / whole:.1f}% | {n} |")
    return "\n".join(lines)


def main() -> None:
    """Profile the three graphs and print their tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fashion_resnet", choices=sorted(DATA))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--calib-iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort

    import ann2snn
    import ann2snn.passes.calibrate_thresholds as calibration
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.forms import _subgraph_model

    tmp = Path(tempfile.mkdtemp(prefix="ann2snn_profile_"))

    def options(tag: str) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp / tag)
        so.log_severity_level = 4
        return so

    calib_file, test_file = (MODELS / "data" / f"{n}.npz" for n in DATA[args.model])
    with np.load(test_file) as z:
        x = np.ascontiguousarray(z["input"][:args.batch])
    path = MODELS / f"{args.model}.onnx"
    ann = ort.InferenceSession(str(path), options("ann"), providers=["CPUExecutionProvider"])
    for _ in range(args.runs):
        ann.run(None, {"input": x})
    out = [f"command: `python benchmarks/profile_ops.py {' '.join(sys.argv[1:])}`", "",
           table(f"ANN forward, batch {args.batch}", kernel_times(ann, args.runs)), ""]

    # the LTB session, profiled through the compiler's own session factory
    sessions, loop = [], []

    def profiled(model: onnx.ModelProto, threads: int = 0, basic: bool = False) -> ort.InferenceSession:
        sessions.append(ort.InferenceSession(model.SerializeToString(), options("ltb"),
                                             providers=["CPUExecutionProvider"]))
        return sessions[-1]

    class LoopTimer(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "ltb_seconds"):
                loop.append(record.ltb_seconds / record.ltb_iterations)

    logger = logging.getLogger("ann2snn.passes.calibrate_thresholds")
    logger.addHandler(LoopTimer())
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    plain, calibration.make_session = calibration.make_session, profiled
    try:
        snn = ann2snn.compile(path, calib_file, iters=args.calib_iters, batch=args.batch, progress=False)
    finally:
        calibration.make_session = plain
    ltb = kernel_times(sessions[-1], args.calib_iters)
    wall = f" (the loop's wall time: {loop[-1] * 1e6:.0f} µs per iteration, profiled)" if loop else ""
    out += [table(f"LTB calibration iteration, batch {args.batch}", ltb, wall), ""]

    # one SNN step: the reduced step graph the runtime runs (unit-threshold neurons)
    session = SpikingSession(snn, threads=args.threads)
    plan = session._plan
    model = _subgraph_model(plan.proto, plan.rest_nodes, plan.reduced_inputs, plan.reduced_outputs, plan.types,
                            "step")
    so = options("step")
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    step = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    const = dict(zip(plan.prefix_outputs, plan.prefix.run(plan.prefix_outputs, {"input": x})))
    session.reset(args.batch)
    states = session._states
    feeds = {i.name: const[i.name] if i.name in const else states[i.name] for i in step.get_inputs()}
    for _ in range(args.runs):
        step.run(None, feeds)
    out += [table(f"SNN step (reduced step graph), batch {args.batch}", kernel_times(step, args.runs))]
    print("\n".join(out))


if __name__ == "__main__":
    main()
