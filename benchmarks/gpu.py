"""SNN simulation on one GPU against the dense bound: SNN time for T steps / (T × ANN time on the
same GPU), at batch 1, 32 and 256, for the Fashion VGG and ResNet and MobileNetV2, with and
without CUDA graphs. Prints the table with the GPU's name and writes benchmarks/results/gpu.md.

* ANN: one onnxruntime CUDA session, input and output bound on the GPU (IOBinding), so a
  forward pass is the GPU's work alone: the bound at its best. With CUDA graphs, the same
  through onnxruntime's captured graph.
* SNN: ``SpikingSession(device="cuda")`` (the device-resident step form: states and readout
  sums stay on the GPU, one ``run_with_iobinding`` per step), ``run(x, T)`` end to end: the
  input's copy to the GPU, the prefix, T steps, the readout's copy back. With CUDA graphs:
  ``cuda_graph=True``.
* Each figure is the median of ``--repeats`` timed runs after warm-up runs (in which
  onnxruntime picks its cuDNN algorithms and captures the graphs).
* Models: models/fashion_vgg.onnx and models/fashion_resnet.onnx on the Fashion data;
  models/mobilenet_v2.onnx when it is built (models/build_mobilenet.py), else the same
  architecture with random weights, written here, on random images: dense simulation time does
  not depend on the weights. Compiled with few calibration batches (time does not depend on the
  thresholds either), on the benchmark's device.

Run on a machine with an NVIDIA GPU and onnxruntime-gpu (README "One GPU"); about 3-5 minutes
on one H200 (the script stops adding configurations past --budget seconds):

    .venv/bin/python benchmarks/gpu.py

Without a GPU it says so in one line and exits with status 2. ``--device cpu --quick`` runs the
whole script on the CPU on tiny settings (tests/test_device.py runs it), to check that it works.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, command_line

MODELS = ROOT / "models"
RESULTS = ROOT / "benchmarks" / "results"
#: model -> data set (models/data/<name>_calib.npz, _test.npz), None: random images
DATA = {"fashion_vgg": "fashion", "fashion_resnet": "fashion", "mobilenet_v2": None}
log = logging.getLogger("gpu")


def fail(message: str) -> None:
    """One line on stderr, exit status 2."""
    print(f"benchmarks/gpu.py: {message}", file=sys.stderr)
    sys.exit(2)


def gpu_name() -> str:
    """The GPU's name from nvidia-smi (the first GPU, the one the sessions use)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()
        return out[0].strip() if out else "unknown NVIDIA GPU"
    except (OSError, subprocess.SubprocessError):
        return "unknown NVIDIA GPU (nvidia-smi not found)"


def cpu_name() -> str:
    """The processor's model name and core count."""
    name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU: {name}, {os.cpu_count()} cores"


def check_gpu() -> None:
    """Exit with one line unless onnxruntime has the CUDA provider and can put a session on the GPU."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from ann2snn.device import CUDA_EP, DeviceError, open_session, providers_for

    if CUDA_EP not in ort.get_available_providers():
        fail("no CUDA GPU here: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu as README 'One GPU' "
             "says); `--device cpu --quick` checks the script on the CPU")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    try:
        open_session(helper.make_model(graph).SerializeToString(), None, providers_for("cuda"), "a probe")
    except DeviceError as exc:
        fail(f"no CUDA GPU usable here: {exc}")


# -- MobileNetV2 with random weights ------------------------------------------------------------
def mobilenet_v2(size: int = 224, width: float = 1.0, classes: int = 1000, seed: int = 0) -> Any:
    """torchvision's MobileNetV2 architecture (inverted residuals, ReLU6 as Clip(0, 6), BatchNorm
    after every convolution) with He-initialised random weights: input ``input`` [N, 3, size,
    size], output ``output`` [N, classes]."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits: list[Any] = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                        numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    count = [0]

    def name(kind: str) -> str:
        count[0] += 1
        return f"{kind}{count[0]}"

    def const(prefix: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), prefix))
        return prefix

    def conv(x: str, cin: int, cout: int, k: int, stride: int, groups: int = 1, relu6: bool = True) -> str:
        p = name("conv")
        w = rng.normal(0, np.sqrt(2.0 / (k * k * cin // groups)), (cout, cin // groups, k, k))
        nodes.append(helper.make_node("Conv", [x, const(f"{p}.w", w)], [f"{p}.c"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4, group=groups))
        nodes.append(helper.make_node("BatchNormalization", [f"{p}.c", const(f"{p}.g", np.ones(cout)),
                                                              const(f"{p}.b", rng.normal(0, 0.1, cout)),
                                                              const(f"{p}.m", np.zeros(cout)),
                                                              const(f"{p}.v", np.ones(cout))], [f"{p}.n"]))
        if not relu6:
            return f"{p}.n"
        nodes.append(helper.make_node("Clip", [f"{p}.n", "zero", "six"], [f"{p}.r"]))
        return f"{p}.r"

    def channels(c: float) -> int:  # torchvision's _make_divisible(c, 8)
        v = max(8, int(c + 4) // 8 * 8)
        return v + 8 if v < 0.9 * c else v

    cin = channels(32 * width)
    x = conv("input", 3, cin, 3, 2)
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)]:
        cout = channels(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = conv(x, cin, hidden, 1, 1) if t != 1 else x
            y = conv(y, hidden, hidden, 3, stride, groups=hidden)
            y = conv(y, hidden, cout, 1, 1, relu6=False)
            if stride == 1 and cin == cout:
                out = name("add")
                nodes.append(helper.make_node("Add", [x, y], [out]))
                y = out
            x, cin = y, cout
    last = channels(1280 * max(1.0, width))
    x = conv(x, cin, last, 1, 1)
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", const("fc.w", rng.normal(0, 0.01, (classes, last))),
                                        const("fc.b", np.zeros(classes))], ["output"], transB=1)]
    graph = helper.make_graph(nodes, "mobilenet_v2_random",
                              [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def model_and_data(name: str, folder: Path, quick: bool, n_calib: int) -> tuple[Path, dict[str, np.ndarray], np.ndarray,
                                                                                  str]:
    """(ANN path, calibration inputs, test inputs, a note on the model)."""
    import onnx

    data = DATA[name]
    path = MODELS / f"{name}.onnx"
    note = ""
    if name == "mobilenet_v2" and (quick or not path.exists()):
        size = 64 if quick else 224
        path = folder / "mobilenet_v2_random.onnx"
        onnx.save(mobilenet_v2(size, 0.25 if quick else 1.0, 10 if quick else 1000), path)
        note = f"random weights, {size}²" + (", width 0.25" if quick else "")
    if not path.exists():
        fail(f"{path} is missing (models/README.md says how to build it)")
    if data is None:
        rng = np.random.default_rng(0)
        shape = [d.dim_value for d in onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]]
        calib = rng.random((n_calib, *shape), np.float32)
        test = rng.random((8, *shape), np.float32)
        note = note or "random images"
        return path, {"input": calib}, test, note
    with np.load(MODELS / "data" / f"{data}_calib.npz") as z:
        calib = {"input": z["input"][:n_calib]}
    with np.load(MODELS / "data" / f"{data}_test.npz") as z:
        test = np.ascontiguousarray(z["input"][:256])
    return path, calib, test, note


def batch_of(test: np.ndarray, B: int) -> np.ndarray:
    """B samples: the test inputs, repeated if there are fewer."""
    reps = -(-B // len(test))
    return np.ascontiguousarray(np.concatenate([test] * reps)[:B])


# -- timing --------------------------------------------------------------------------------------
class AnnTimer:
    """The ANN on the device, input and output bound there (IOBinding): one forward per call."""

    def __init__(self, path: Path, device: str, cuda_graph: bool, x: np.ndarray) -> None:
        import onnxruntime as ort

        from ann2snn.device import open_session, ort_device, providers_for

        providers = providers_for(device, cuda_graph=cuda_graph)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.sess = open_session(str(path), so, providers, "the ANN")
        kind, index = ort_device(providers)
        self.x = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), np.float32, kind, index)
        self.x.update_inplace(x)
        self.binding = self.sess.io_binding()
        self.binding.bind_ortvalue_input(self.sess.get_inputs()[0].name, self.x)
        self.binding.bind_output(self.sess.get_outputs()[0].name, kind, index)
        uncaptured = ort.RunOptions()
        uncaptured.add_run_config_entry("gpu_graph_id", "-1")  # this run's output buffer is not the one kept
        self.sess.run_with_iobinding(self.binding, uncaptured)
        self.y = self.binding.get_outputs()[0]  # onnxruntime's buffer of the right shape, bound from now on
        self.binding.bind_ortvalue_output(self.sess.get_outputs()[0].name, self.y)

    def __call__(self, n: int) -> float:
        """Seconds for ``n`` forward passes (run_with_iobinding waits for the device)."""
        start = time.perf_counter()
        for _ in range(n):
            self.sess.run_with_iobinding(self.binding)
        return time.perf_counter() - start


def time_snn(snn: Any, x: np.ndarray, T: int) -> float:
    """Seconds for one T-step run from rest, readout on the host."""
    start = time.perf_counter()
    snn.run({snn.input_specs[0].name: x}, T)
    return time.perf_counter() - start


def bench(name: str, args: argparse.Namespace, folder: Path, started: float) -> dict[str, Any]:
    """Every configuration of one model."""
    import ann2snn
    from ann2snn.runtime import SpikingSession

    path, calib, test, note = model_and_data(name, folder, args.quick, args.calib_batch * args.calib_iters)
    snn_path = folder / f"{name}.snn.onnx"
    began = time.perf_counter()
    ann2snn.compile(path, calib, snn_path, iters=args.calib_iters, batch=args.calib_batch, device=args.device)
    result: dict[str, Any] = {"model": name, "note": note, "compile_s": time.perf_counter() - began, "configs": []}
    graphs = [False, True] if args.device == "cuda" else [False]
    sessions = {g: SpikingSession(snn_path, device=args.device, cuda_graph=g) for g in graphs}
    for B in args.batches:
        if time.perf_counter() - started > args.budget:
            result["configs"].append({"batch": B, "skipped": f"past --budget {args.budget:.0f} s"})
            continue
        x = batch_of(test, B)
        cfg: dict[str, Any] = {"batch": B, "T": args.T}
        for g in graphs:
            ann = AnnTimer(path, args.device, g, x)
            ann(args.warmup + 2)  # cuDNN's algorithm search, the graph's capture
            snn = sessions[g]
            for _ in range(args.warmup):
                time_snn(snn, x, args.T)
            ann_s, snn_s = [], []
            for _ in range(args.repeats):  # interleaved: a drift of the clock or the device hits both
                ann_s.append(ann(args.T))
                snn_s.append(time_snn(snn, x, args.T))
            key = "graph" if g else "plain"
            cfg[key] = {"ann_ms": float(np.median(ann_s)) / args.T * 1e3,
                        "snn_ms_per_step": float(np.median(snn_s)) / args.T * 1e3,
                        "ratio": float(np.median(np.asarray(snn_s) / np.asarray(ann_s))),
                        "form": snn.last_form}
            del ann
        log.info("%s %s", name, cfg)
        result["configs"].append(cfg)
    return result


def table(results: list[dict[str, Any]], device: str, T: int) -> str:
    """The markdown table: one row per model and batch."""
    graph = device == "cuda"
    head = ["model", "B", "ANN ms/fwd", "SNN ms/step", f"SNN({T} steps) / ({T}·ANN)"]
    if graph:
        head += ["ANN ms/fwd, CUDA graph", "SNN ms/step, CUDA graph", "ratio, CUDA graphs (both)",
                 "SNN with / without CUDA graph"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        label = r["model"] + (f" ({r['note']})" if r["note"] else "")
        for c in r["configs"]:
            if "skipped" in c:
                lines.append(f"| {label} | {c['batch']} | skipped: {c['skipped']} |" + " |" * (len(head) - 3))
                continue
            p = c["plain"]
            row = [label, c["batch"], f"{p['ann_ms']:.3f}", f"{p['snn_ms_per_step']:.3f}", f"{p['ratio']:.2f}"]
            if graph:
                g = c["graph"]
                row += [f"{g['ann_ms']:.3f}", f"{g['snn_ms_per_step']:.3f}", f"{g['ratio']:.2f}",
                        f"{g['snn_ms_per_step'] / p['snn_ms_per_step']:.2f}"]
            lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, check the device, time every model, print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true",
                    help="tiny settings (batches 1 and 2, T = 4, one repeat, a small MobileNetV2): checks the script")
    ap.add_argument("--models", default=",".join(DATA), help="comma-separated, of " + ", ".join(DATA))
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("-T", "--T", dest="T", type=int, default=32, help="timesteps per run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calib-iters", type=int, default=8)
    ap.add_argument("--calib-batch", type=int, default=16)
    ap.add_argument("--budget", type=float, default=360.0,
                    help="seconds after which no further batch is started (the table says which were skipped)")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu.md")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.T, args.repeats, args.warmup, args.calib_iters, args.calib_batch = "1,2", 4, 1, 1, 2, 8
    args.batches = [int(b) for b in args.batches.split(",")]
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in DATA]
    if unknown:
        fail(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(DATA)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("ann2snn",):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.device == "cuda":
        check_gpu()
    import onnxruntime as ort

    import ann2snn

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ann2snn_gpu_") as tmp:
        results = [bench(m, args, Path(tmp), started) for m in models]
    machine = gpu_name() if args.device == "cuda" else cpu_name()
    text = "\n".join([
        f"# SNN on one {'GPU' if args.device == 'cuda' else 'CPU'}: SNN time for T steps / (T × ANN time)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Device: {machine}; onnxruntime {ort.__version__}, ann2snn {ann2snn.__version__}; T = {args.T}, median of "
        f"{args.repeats} runs after {args.warmup} warm-up runs; {time.perf_counter() - started:.0f} s in all.",
        "",
        table(results, args.device, args.T),
        "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command_line(), "device": machine,
                                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
