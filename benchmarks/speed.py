"""Speed and memory of ann2snn's runtime and calibration against the dense-arithmetic bounds.

For each reference model, on this machine and in this one run:

* simulation: SNN time for T steps / (T × ANN forward time), both through onnxruntime at the
  same batch, interleaved, median over repeats of the per-repeat ratio; for the runtime's
  ``step`` form and its default ``auto`` form (layered multi-step for small batches). The ANN
  time is the faster of two ANN sessions timed in the same repeat, one with onnxruntime's
  default thread spinning and one without (the runtime's sessions do not spin), so the bound
  is the ANN at its best on this machine;
* calibration: LTB time per iteration (the calibration loop's own timer, and the difference
  of two compiles with K and 2K iterations, in which session creation and the other passes
  cancel) / ANN forward time at the same batch;
* peak memory (max RSS of a fresh child process per configuration) of a T-step simulation
  vs the ANN's inference at the same batch, also net of the child's RSS after imports;
* SpikingJelly 2.0.0 (multi-step mode, CPU, torch threads = 2): the same torch architecture
  converted with its LTB recipe, timed in a persistent worker process between our repeats.
  The torch weights are freshly initialised (dense simulation time does not depend on them).

Run (needs a Python with torch and spikingjelly for the side-by-side, e.g. /tmp/torchenv):

    .venv/bin/python benchmarks/speed.py [--models mnist_cnn,mobilenet_v2] [--torch-python PY]

Models missing from models/ are reported as missing; fashion_vgg / fashion_resnet can be
exported untrained by the torch worker for timing (``--untrained-fashion``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, command_line

MODELS = ROOT / "models"
#: model -> (calibration data, test data, torch builder in the worker, input is 224² ImageNet)
REFERENCE = {
    "mnist_cnn": ("mnist_calib", "mnist_test"),
    "digits_cnn": ("digits_calib", "digits_test"),
    "fashion_vgg": ("fashion_calib", "fashion_test"),
    "fashion_resnet": ("fashion_calib", "fashion_test"),
    "mobilenet_v2": ("photos_calib", "photos_eval"),
}
#: 224² ImageNet models: compile and calibration measured with fewer, smaller batches
#: (dense simulation time does not depend on the thresholds), no layered-vs-step check
HEAVY = {"mobilenet_v2": {"compile_iters": 8, "compile_batch": 16, "calib_iters": 5, "calib_batch": 8, "calib_repeats": 1}}
#: the defaults of the options HEAVY overrides (an option given on the command line wins over both)
SIZES = {"compile_iters": 200, "compile_batch": 64, "calib_iters": 50, "calib_batch": 64, "calib_repeats": 3}
log = logging.getLogger("speed")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_mb() -> float:
    """Peak RSS since the last :func:`_reset_peak` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return _maxrss_mb()


def _reset_peak() -> None:
    """Restart the peak RSS count (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# -- child process: peak memory of one configuration --------------------------------------------
def mem_worker(kind: str, model: str, data: str, batch: int, T: int, mode: str) -> None:
    """Run one configuration and print {"peak_mb", "base_mb"}: the peak RSS from after the
    imports and the input batch were loaded, and the RSS at that point."""
    import onnxruntime as ort

    from ann2snn.runtime import SpikingSession  # noqa: F401 - same imports in both children

    with np.load(data) as z:
        x = np.ascontiguousarray(z["input"][:batch])
    base = _current_rss_mb()
    _reset_peak()
    if kind == "ann":
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, {sess.get_inputs()[0].name: x})
    else:
        snn = SpikingSession(model, mode=mode)
        snn.run({snn.input_specs[0].name: x}, T)
    print(json.dumps({"peak_mb": _peak_mb(), "base_mb": base}))


def measure_memory(kind: str, model: Path, data: Path, batch: int, T: int, mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--worker", "mem", kind, str(model), str(data), str(batch), str(T), mode],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- torch worker: SpikingJelly side by side ------------------------------------------------------
def sj_worker() -> None:
    """Line protocol on stdin/stdout: JSON commands, one JSON answer per line."""
    import torch
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based import ann2snn as sj

    sys.path.insert(0, str(MODELS))
    torch.set_num_threads(2)
    nets: dict[str, Any] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "load":
                torch.manual_seed(0)
                net, norm = _torch_net(cmd["model"])
                net.eval()
                with np.load(cmd["calib"]) as z:
                    calib = [norm(torch.from_numpy(z["input"][i * 16:(i + 1) * 16])) for i in range(4)]
                snn = sj.Converter(sj.recipes.LocalThresholdBalancingRecipe(calib)).convert(net)
                functional.set_step_mode(snn, "m")
                with torch.no_grad():  # warm-up
                    functional.reset_net(snn)
                    snn(calib[0][:1].unsqueeze(0).expand(2, *calib[0][:1].shape).contiguous())
                    functional.reset_net(snn)
                nets[cmd["model"]] = (net, snn, norm)
                answer: dict[str, Any] = {"ok": True}
            elif cmd["op"] == "export":  # an untrained export of a fashion architecture
                from build_fashion import ARCHS, FASHION_MEAN, FASHION_STD, Normalised, export_onnx
                torch.manual_seed(0)
                export_onnx(Normalised(ARCHS[cmd["arch"]]().eval(), FASHION_MEAN, FASHION_STD).eval(), Path(cmd["path"]))
                answer = {"ok": True}
            elif cmd["op"] == "time":
                net, snn, norm = nets[cmd["model"]]
                with np.load(cmd["data"]) as z:
                    x = norm(torch.from_numpy(z["input"][:cmd["batch"]]))
                T = cmd["T"]
                with torch.no_grad():
                    start = time.perf_counter()
                    functional.reset_net(snn)
                    snn(x.unsqueeze(0).expand(T, *x.shape).contiguous()).mean(0)
                    t_snn = time.perf_counter() - start
                    start = time.perf_counter()
                    for _ in range(T):
                        net(x)
                    t_ann = time.perf_counter() - start
                answer = {"ok": True, "snn_s": t_snn, "ann_s": t_ann, "peak_mb": _maxrss_mb()}
            else:
                answer = {"ok": False, "error": f"unknown op {cmd['op']}"}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which carries on
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(answer), flush=True)


def _torch_net(name: str) -> tuple[Any, Any]:
    """The bare torch network (normalisation applied outside, as SpikingJelly's recipe needs)."""
    import torch

    def by(mean: Any, std: Any) -> Any:
        m, s = torch.tensor(mean).reshape(1, -1, 1, 1), torch.tensor(std).reshape(1, -1, 1, 1)
        return lambda x: (x - m) / s

    if name == "mnist_cnn":
        from build_mnist_cnn import MNIST_MEAN, MNIST_STD, MNISTNet
        return MNISTNet(), by([MNIST_MEAN], [MNIST_STD])
    if name == "digits_cnn":
        from build_digits_cnn import DigitsCNN
        return DigitsCNN(), lambda x: x
    if name.startswith("fashion_"):
        from build_fashion import ARCHS, FASHION_MEAN, FASHION_STD
        return ARCHS[name.split("_", 1)[1]](), by([FASHION_MEAN], [FASHION_STD])
    from build_mobilenet import MEAN, STD, MobileNetV2
    net = MobileNetV2()
    # SpikingJelly's LTB recipe rejects ReLU6; ReLU costs the same dense arithmetic
    for parent in list(net.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, torch.nn.ReLU6):
                setattr(parent, child_name, torch.nn.ReLU())
    return net, by(list(MEAN), list(STD))


class TorchWorker:
    """The parent's handle on the persistent SpikingJelly worker."""

    def __init__(self, python: str) -> None:
        self.proc = subprocess.Popen([python, __file__, "--worker", "sj"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# -- the measurements ------------------------------------------------------------------------------
def ann_sessions(path: Path, threads: int = 0) -> tuple[Any, Any]:
    """Two onnxruntime sessions of the ANN: with the default intra-op thread spinning, and without."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    spinning = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return spinning, ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_ann(sess: Any, x: np.ndarray, T: int) -> float:
    name = sess.get_inputs()[0].name
    start = time.perf_counter()
    for _ in range(T):
        sess.run(None, {name: x})
    return time.perf_counter() - start


def time_snn(snn: Any, x: np.ndarray, T: int) -> float:
    start = time.perf_counter()
    snn.run({snn.input_specs[0].name: x}, T)
    return time.perf_counter() - start


class _LoopTimes(logging.Handler):
    """Collects the LTB loop timings that passes/calibrate_thresholds.py logs at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "ltb_seconds"):
            self.seen.append((int(record.ltb_iterations), float(record.ltb_seconds)))


def calibration_ratio(path: Path, calib: Path, K: int, B: int, repeats: int) -> dict[str, float]:
    """LTB seconds per iteration / ANN forward at batch B (the faster of spinning or not, timed
    between the compiles): from the calibration loop's own timer, and from the difference of
    whole compiles with K and 2K iterations (session creation and the other passes cancel)."""
    import ann2snn

    with np.load(calib) as z:
        x = np.ascontiguousarray(z["input"][:B])
    anns = ann_sessions(path)
    timer = _LoopTimes()
    logger = logging.getLogger("ann2snn.passes.calibrate_thresholds")
    level = logger.level
    logger.addHandler(timer)
    logger.setLevel(logging.DEBUG)
    ratios, loop_ratios, per_iter, totals = [], [], [], []
    try:
        for _ in range(repeats):
            times = {}
            for k in (K, 2 * K):
                start = time.perf_counter()
                ann2snn.compile(path, calib, iters=k, batch=B)
                times[k] = time.perf_counter() - start
            fwd = min(time_ann(a, x, K) / K for a in anns)
            it = (times[2 * K] - times[K]) / K
            ratios.append(it / fwd)
            loop_ratios += [seconds / iters / fwd for iters, seconds in timer.seen[-2:]]
            per_iter.append(it)
            totals.append(times[K] / (K * fwd))
    finally:
        logger.removeHandler(timer)
        logger.setLevel(level)
    return {"per_iter_ms": float(np.median(per_iter)) * 1e3, "ratio": float(np.median(ratios)),
            "loop_ratio": float(np.median(loop_ratios)), "total_ratio": float(np.median(totals))}


def equivalence(snn_step: Any, snn_auto: Any, x: np.ndarray, y: np.ndarray | None, T: int) -> dict[str, float]:
    """Layered (``snn_auto``: a mode="layered" session) vs step readouts at T on the given
    samples (batch 1 each, the layered case)."""
    a = np.concatenate([snn_step.run({"input": x[i:i + 1]}, T)[snn_step.output_names[0]] for i in range(len(x))])
    b = np.concatenate([snn_auto.run({"input": x[i:i + 1]}, T)[snn_auto.output_names[0]] for i in range(len(x))])
    out = {"max_rel_diff": float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)),
           "argmax_agree": float((a.argmax(1) == b.argmax(1)).mean())}
    if y is not None:
        out["acc_step"], out["acc_auto"] = float((a.argmax(1) == y).mean()), float((b.argmax(1) == y).mean())
    return out


def bench_model(name: str, path: Path, args: argparse.Namespace, worker: TorchWorker | None) -> dict[str, Any]:
    import onnx

    import ann2snn
    from ann2snn.runtime import SpikingSession

    sizes = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in {**SIZES, **HEAVY.get(name, {})}.items()}
    args = argparse.Namespace(**{**vars(args), **sizes})
    result_opts = {k: getattr(args, k) for k in ("compile_iters", "compile_batch", "calib_iters", "calib_batch", "neuron")}
    calib_name, test_name = REFERENCE[name]
    calib, test = MODELS / "data" / f"{calib_name}.npz", MODELS / "data" / f"{test_name}.npz"
    with np.load(test) as z:
        xs = np.ascontiguousarray(z["input"][:max(args.batches)])
        ys = z["label"][:args.equiv_samples] if "label" in z else None
        xe = np.ascontiguousarray(z["input"][:args.equiv_samples])
    result: dict[str, Any] = {"model": name, "configs": [], "options": result_opts}
    tmp = Path(tempfile.mkdtemp(prefix="ann2snn_speed_"))
    snn_path = tmp / f"{name}.snn.onnx"
    compiled = ann2snn.compile(path, calib, iters=args.compile_iters, batch=args.compile_batch, neuron=args.neuron)
    onnx.save(compiled, snn_path)
    ann, ann_quiet = ann_sessions(path, args.threads)
    step = SpikingSession(snn_path, mode="step", threads=args.threads or None)
    auto = SpikingSession(snn_path, mode="auto", threads=args.threads or None)
    result["layered"] = auto._plan.refusal or "available"
    if args.equiv_samples and (name not in HEAVY or args.equiv_heavy) and auto._plan.cuts is not None:
        layered = SpikingSession(snn_path, mode="layered", threads=args.threads or None)
        result["equivalence"] = equivalence(step, layered, xe, ys, args.equiv_T)
    sj_ok = False
    if worker is not None:
        answer = worker.ask(op="load", model=name, calib=str(calib))
        sj_ok = answer["ok"]
        if not sj_ok:
            result["spikingjelly"] = answer["error"]
    for B in args.batches:
        x = xs[:B]
        one = time_ann(ann, x, 3) / 3
        for T in args.T:  # warm-up: the layered form builds its chunk sessions on first use
            if one * T <= args.budget:
                time_snn(auto, x, min(T, 8)), time_snn(auto, x, T), time_snn(step, x, 2)
        for T in args.T:
            cfg: dict[str, Any] = {"batch": B, "T": T}
            if one * T > args.budget:
                cfg["skipped"] = f"T × ANN ≈ {one * T:.0f} s > --budget {args.budget:.0f} s"
                result["configs"].append(cfg)
                continue
            runs: dict[str, list[float]] = {"ann": [], "ann_spin": [], "ann_quiet": [], "step": [], "auto": [],
                                            "sj": [], "sj_ann": []}
            for _ in range(args.repeats):
                runs["ann_spin"].append(time_ann(ann, x, T))
                runs["ann_quiet"].append(time_ann(ann_quiet, x, T))
                runs["ann"].append(min(runs["ann_spin"][-1], runs["ann_quiet"][-1]))
                runs["step"].append(time_snn(step, x, T))
                runs["auto"].append(time_snn(auto, x, T))
                if sj_ok and T * B * (1 if name != "mobilenet_v2" else 128) <= args.sj_max_rows:
                    answer = worker.ask(op="time", model=name, data=str(test), batch=B, T=T)  # type: ignore[union-attr]
                    if answer["ok"]:
                        runs["sj"].append(answer["snn_s"])
                        runs["sj_ann"].append(answer["ann_s"])
                        cfg["sj_peak_mb"] = answer["peak_mb"]
            ann_t = np.asarray(runs["ann"])
            for key in ("step", "auto", "sj"):
                if runs[key]:
                    cfg[f"{key}_ratio"] = float(np.median(np.asarray(runs[key]) / ann_t))
                    cfg[f"{key}_steps_per_s"] = float(T / np.median(runs[key]))
            if runs["sj_ann"]:
                cfg["sj_vs_torch_ann"] = float(np.median(np.asarray(runs["sj"]) / np.asarray(runs["sj_ann"])))
            cfg["ann_ms"] = float(np.median(ann_t) / T * 1e3)
            cfg["ann_ms_spinning"] = float(np.median(runs["ann_spin"]) / T * 1e3)
            cfg["ann_ms_not_spinning"] = float(np.median(runs["ann_quiet"]) / T * 1e3)
            cfg["auto_form"] = (auto.last_form or "step").split("(")[0]
            if args.memory:
                a = measure_memory("ann", path, test, B, T, "auto")
                s = measure_memory("snn", snn_path, test, B, T, "auto")
                cfg["mem"] = {"ann_peak_mb": a["peak_mb"], "snn_peak_mb": s["peak_mb"],
                              "ratio": s["peak_mb"] / a["peak_mb"],
                              "net_ratio": (s["peak_mb"] - s["base_mb"]) / max(a["peak_mb"] - a["base_mb"], 1e-9)}
            log.info("%s %s", name, cfg)
            result["configs"].append(cfg)
    if args.calib_iters:
        result["calibration"] = calibration_ratio(path, calib, args.calib_iters, args.calib_batch, args.calib_repeats)
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | B | T | ANN ms/fwd (best of spinning / not) | step: SNN/(T·ANN) | auto: SNN/(T·ANN) (form) | auto steps/s | "
             "SJ: SNN/(T·ANN) | SJ/(T·torch ANN) | peak MB ANN / SNN (ratio; net) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for c in r["configs"]:
            if "skipped" in c:
                lines.append(f"| {r['model']} | {c['batch']} | {c['T']} | skipped: {c['skipped']} |||||||")
                continue
            mem = c.get("mem")
            m = (f"{mem['ann_peak_mb']:.0f} / {mem['snn_peak_mb']:.0f} ({mem['ratio']:.2f}; {mem['net_ratio']:.2f})"
                 if mem else "-")
            sj = f"{c['sj_ratio']:.2f}" if "sj_ratio" in c else ("n/a" if "spikingjelly" in r else "-")
            sjt = f"{c['sj_vs_torch_ann']:.2f}" if "sj_vs_torch_ann" in c else "-"
            lines.append(f"| {r['model']} | {c['batch']} | {c['T']} | {c['ann_ms']:.2f} | {c['step_ratio']:.2f} | "
                         f"{c['auto_ratio']:.2f} ({c.get('auto_form', '?')}) | {c['auto_steps_per_s']:.0f} | {sj} | {sjt} | {m} |")
    lines += ["", "| model | layered form | calibration ms/iter (2-compile difference) | LTB iter / ANN fwd: loop timer "
              "(2-compile difference) | whole compile / (K·ANN fwd) | "
              "layered vs step (max rel. diff, argmax agreement, acc step / layered) |", "|---|---|---|---|---|---|"]
    for r in results:
        cal = r.get("calibration")
        eq = r.get("equivalence")
        eqs = (f"{eq['max_rel_diff']:.1e}, {eq['argmax_agree'] * 100:.1f}%"
               + (f", {eq['acc_step'] * 100:.1f}% / {eq['acc_auto'] * 100:.1f}%" if "acc_step" in eq else "")) if eq else "-"
        opts = r["options"]
        lines.append(f"| {r['model']} (K={opts['calib_iters']}, B={opts['calib_batch']}) | {r['layered']} | "
                     + (f"{cal['per_iter_ms']:.2f} | {cal.get('loop_ratio', float('nan')):.2f} ({cal['ratio']:.2f}) | "
                     f"{cal['total_ratio']:.1f}" if cal else "- | - | -") + f" | {eqs} |")
    return "\n".join(lines)


def main() -> None:
    """Parse options, run the benchmarks, print the tables with the command."""
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        if sys.argv[2] == "mem":
            kind, model, data, batch, T, mode = sys.argv[3:9]
            mem_worker(kind, model, data, int(batch), int(T), mode)
        else:
            sj_worker()
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(REFERENCE))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("-T", default="32,128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=60.0, help="skip configurations whose T × ANN time exceeds this (s)")
    ap.add_argument("--torch-python", default="/tmp/torchenv/bin/python", help="'' to skip SpikingJelly")
    ap.add_argument("--sj-max-rows", type=int, default=4096, help="largest T·B SpikingJelly simulates (mobilenet: ×128)")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--compile-iters", type=int, default=None, help="LTB iterations of the timed SNN (default 200; mobilenet_v2 8)")
    ap.add_argument("--neuron", default="if", choices=["if", "signed"], help="neuron model of the simulated SNN")
    ap.add_argument("--compile-batch", type=int, default=None, help="their batch (default 64; mobilenet_v2 16)")
    ap.add_argument("--calib-iters", type=int, default=None,
                    help="K for the calibration ratio (0: skip; default 50, mobilenet_v2 5)")
    ap.add_argument("--calib-batch", type=int, default=None, help="its batch (default 64; mobilenet_v2 8)")
    ap.add_argument("--calib-repeats", type=int, default=None, help="repeats of it (default 3; mobilenet_v2 1)")
    ap.add_argument("--equiv-samples", type=int, default=200)
    ap.add_argument("--equiv-T", type=int, default=32)
    ap.add_argument("--equiv-heavy", action="store_true", help="also check layered vs step on mobilenet_v2")
    ap.add_argument("--untrained-fashion", action="store_true",
                    help="export untrained fashion_vgg / fashion_resnet for timing when they are missing")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads for ANN and SNN (0: default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.T = [int(t) for t in args.T.split(",")]
    command = command_line()
    worker = TorchWorker(args.torch_python) if args.torch_python and Path(args.torch_python).exists() else None
    results, notes = [], []
    tmp = Path(tempfile.mkdtemp(prefix="ann2snn_speed_models_"))
    try:
        for name in args.models.split(","):
            path = MODELS / f"{name}.onnx"
            if not path.exists() and name.startswith("fashion_") and args.untrained_fashion and worker is not None:
                path = tmp / f"{name}.onnx"
                answer = worker.ask(op="export", arch=name.split("_", 1)[1], path=str(path))
                if not answer["ok"]:
                    notes.append(f"{name}: untrained export failed: {answer['error']}")
                    continue
                notes.append(f"{name}: not in models/; an untrained export of the same architecture was timed")
            elif not path.exists():
                notes.append(f"{name}: not present in models/ (skipped)")
                continue
            results.append(bench_model(name, path, args, worker))
            print(table(results[-1:]), file=sys.stderr, flush=True)
    finally:
        if worker is not None:
            worker.close()
    import onnxruntime

    print(f"command: `{command}`\n\nonnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print(table(results))
    for r in results:
        if "spikingjelly" in r:
            notes.append(f"{r['model']}: SpikingJelly could not convert it: {r['spikingjelly']}")
    for n in notes:
        print(f"\n- {n}")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "results": results, "notes": notes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
