"""Where the time and memory of ``ann2snn run`` go, end to end, against the ANN's own passes.

In one run, on this machine:

1. start-up: ``ann2snn --help`` and the imports of the run path, in fresh processes;
2. the phases of one ``run`` in-process (the same functions the CLI calls): loading the
   compiled model into a session, opening and checking the data file, the simulation, and
   writing the outputs;
3. the CLI end to end (``ann2snn -q run MODEL --input DATA -T 32 -o OUT``, start-up included)
   at the default batch and at fixed ones, interleaved with the bound it is held to: 32 ANN
   passes over the same images at batch 32 in one onnxruntime session (the same threads);
   medians over the repeats of the per-repeat ratio;
4. peak memory (VmHWM of each fresh process) of ``run``, ``eval`` and ``report`` on 500 and on
   50,000 inputs;
5. with ``--rules``, the measurements behind the runtime's two size rules, on the reference
   models (compiled into build/ if missing): SNN time per image against the batch (the
   default batch, ``runtime.batches.default_batch_size``), and the layered form's time
   against the step form's at small batches (the ``auto`` rule,
   ``runtime.session.LAYERED_MAX_BATCH``); medians of interleaved repeats.

Run from the repository root (the MNIST CNN is compiled into build/ first if missing):

    .venv/bin/python benchmarks/cli_profile.py [--repeats 3] [--images 4096] [--rules] [--md benchmarks/results/cli_profile.md]
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
CALIB = ROOT / "models" / "data" / "mnist_calib.npz"
TEST = ROOT / "models" / "data" / "mnist_test.npz"
SNN = ROOT / "build" / "mnist_cnn.snn.onnx"
T = 32
#: a child that reports its own peak RSS (VmHWM) on stderr at exit: the rusage of a child
#: carries the address space it had before exec (the parent's, under vfork)
CHILD = ("import atexit, sys\n"
         "def hwm():\n"
         "    kb = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
         "    sys.stderr.write(f'\\nVmHWM {kb}\\n')\n"
         "atexit.register(hwm)\n"
         "from ann2snn.cli import main\n"
         "sys.argv = ['ann2snn', *sys.argv[1:]]\n"
         "main()\n")


def cli(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak MB of ``ann2snn ARGS`` in a fresh process."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"ann2snn {' '.join(args)} failed:\n{proc.stderr}")
    return wall, int(proc.stderr.rsplit("VmHWM ", 1)[1].split()[0]) / 1024


def fresh(code: str) -> float:
    """Wall seconds of ``python -c CODE`` in a fresh process."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t


def ann_passes(x: np.ndarray, batch: int, passes: int) -> float:
    """Seconds of ``passes`` ANN passes over ``x`` at ``batch`` (one session, created untimed)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x[:batch]})
    t = time.perf_counter()
    for _ in range(passes):
        for i in range(0, len(x), batch):
            sess.run(None, {name: x[i:i + batch]})
    return time.perf_counter() - t


def phases(data: Path, out: Path) -> dict[str, float]:
    """Seconds of each phase of one ``run`` at the default batch, in this process."""
    from ann2snn.data.arrays import as_array_dict, check_arrays
    from ann2snn.data.npyfile import NpzWriter
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.batches import default_batch_size

    times: dict[str, float] = {}
    t = time.perf_counter()
    session = SpikingSession(str(SNN))
    times["load the compiled model (session, forms, guard)"] = time.perf_counter() - t
    t = time.perf_counter()
    arrays = as_array_dict(data, session.input_specs, "input", lazy=True)
    check_arrays(arrays, session.input_specs, "input")
    batch = default_batch_size(session)
    times["open and check the data file; choose the batch"] = time.perf_counter() - t
    x = arrays[session.input_specs[0].name]
    writer = NpzWriter(out)
    sim = read = 0.0
    for i in range(0, len(x), batch):
        t = time.perf_counter()
        feeds = {session.input_specs[0].name: x[i:i + batch]}
        read += time.perf_counter() - t
        t = time.perf_counter()
        res = session.run(feeds, T)
        sim += time.perf_counter() - t
        t = time.perf_counter()
        for k, v in res.items():
            writer.append(k, v)
        read += time.perf_counter() - t
    times[f"read batches and append outputs (batch {batch})"] = read
    times[f"simulate T = {T} ({session.last_form})"] = sim
    t = time.perf_counter()
    writer.close()
    times["write the output file"] = time.perf_counter() - t
    return times


RULE_MODELS = {"mnist_cnn": ("mnist_calib", "mnist_test"), "fashion_vgg": ("fashion_calib", "fashion_test"),
               "fashion_resnet": ("fashion_calib", "fashion_test"), "digits_cnn": ("digits_calib", "digits_test")}


def compiled(name: str) -> Path:
    """build/NAME.snn.onnx, compiled with the defaults if missing."""
    path = ROOT / "build" / f"{name}.snn.onnx"
    if not path.exists():
        calib = ROOT / "models" / "data" / f"{RULE_MODELS[name][0]}.npz"
        subprocess.run([sys.executable, "-m", "ann2snn", "-q", "compile", str(ROOT / "models" / f"{name}.onnx"),
                        "--calib", str(calib), "-o", str(path), "--no-progress"], check=True)
    return path


def rules(repeats: int) -> list[str]:
    """Tables behind the default batch and the auto rule."""
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.batches import default_batch_size

    batches = (16, 32, 64, 128, 256)
    lines = ["", f"## Default batch: SNN seconds per image at T = {T} (step form), relative to the best batch "
             f"(medians of {repeats}; 512 images)", "",
             md_row(["model", "KB of step tensors + states per image", *[f"B={b}" for b in batches], "default"]),
             md_rule(len(batches) + 3)]
    small = (1, 2, 4, 8, 16)
    auto_rows = []
    for name, (_, test) in RULE_MODELS.items():
        path = compiled(name)
        x = np.load(ROOT / "models" / "data" / f"{test}.npz")["input"][:512]
        step = SpikingSession(str(path), mode="step")
        key = step.input_specs[0].name
        per: dict[int, list[float]] = {b: [] for b in batches}
        for _ in range(repeats):
            for b in batches:
                t = time.perf_counter()
                for i in range(0, len(x), b):
                    step.run({key: x[i:i + b]}, T)
                per[b].append((time.perf_counter() - t) / len(x))
        med = {b: statistics.median(v) for b, v in per.items()}
        best = min(med.values())
        from ann2snn.resources import estimate_simulation_bytes

        est = estimate_simulation_bytes(step.model, 1)
        lines.append(md_row([name, f"{(est['states'] + est['activations']) / 1024:.0f}",
                             *[f"{med[b] / best:.2f}" for b in batches], str(default_batch_size(step))]))
        layered = SpikingSession(str(path), mode="layered")
        ratio: dict[int, list[float]] = {b: [] for b in small}
        for _ in range(repeats):
            for b in small:
                n = min(len(x), 16 * b)
                spent = {}
                for form, s in (("step", step), ("layered", layered)):
                    t = time.perf_counter()
                    for i in range(0, n, b):
                        s.run({key: x[i:i + b]}, T)
                    spent[form] = time.perf_counter() - t
                ratio[b].append(spent["layered"] / spent["step"])
        auto_rows.append(md_row([name, *[f"{statistics.median(ratio[b]):.2f}" for b in small]]))
    lines += ["", f"## Auto rule: layered form's time / step form's time at T = {T} (chunk of about 32 rows; "
              f"medians of {repeats})", "", md_row(["model", *[f"B={b}" for b in small]]), md_rule(len(small) + 1),
              *auto_rows]
    return lines


def main() -> None:
    """Measure and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--rules", action="store_true", help="Also measure the default-batch and auto-mode rules.")
    ap.add_argument("--md", type=Path, default=None, help="Also write the tables to this markdown file.")
    args = ap.parse_args()
    if not SNN.exists():
        subprocess.run([sys.executable, "-m", "ann2snn", "-q", "compile", str(MODEL), "--calib", str(CALIB),
                        "-o", str(SNN), "--no-progress"], check=True)
    x_all = np.load(TEST)["input"]
    x = x_all[:args.images]
    lines = [f"`{command_line()}`", "", f"load average at the start: {os.getloadavg()[0]:.2f}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "test.npz"
        np.savez(data, input=x)
        out = Path(tmp) / "out.npz"

        # 1. start-up
        help_s = statistics.median(cli(["--help"])[0] for _ in range(5))
        imports = {what: statistics.median(fresh(code) for _ in range(5)) for what, code in [
            ("python alone", "pass"),
            ("import ann2snn.cli (ann2snn --help)", "import ann2snn.cli"),
            ("+ the run path (runtime, onnx, onnxruntime)", "import ann2snn.cli, ann2snn.runtime.batches"),
            ("import ann2snn; ann2snn.compile (the compiler)", "import ann2snn; ann2snn.compile")]}
        lines += ["## Start-up (fresh processes, medians of 5)", "", md_row(["what", "seconds"]), md_rule(2),
                  md_row(["`ann2snn --help`", f"{help_s:.2f}"])]
        lines += [md_row([k, f"{v:.2f}"]) for k, v in imports.items()]

        # 2. phases of one run
        ph = phases(data, out)
        total = sum(ph.values())
        lines += ["", f"## Phases of one run ({args.images} images, T = {T}, in-process)", "",
                  md_row(["phase", "seconds", "share"]), md_rule(3)]
        lines += [md_row([k, f"{v:.3f}", f"{v / total:.1%}"]) for k, v in ph.items()]

        # 3. end to end vs 32 ANN passes, interleaved
        configs = {"default batch": [], "--batch-size 32": ["--batch-size", "32"],
                   "--batch-size 256": ["--batch-size", "256"]}
        walls: dict[str, list[float]] = {k: [] for k in configs}
        peaks: dict[str, float] = {}
        ratios: dict[str, list[float]] = {k: [] for k in configs}
        bounds: list[float] = []
        for _ in range(args.repeats):
            bound = ann_passes(x, 32, T)
            bounds.append(bound)
            for name, extra in configs.items():
                wall, peak = cli(["-q", "run", str(SNN), "--input", str(data), "-T", str(T), "-o", str(out), *extra])
                walls[name].append(wall)
                ratios[name].append(wall / bound)
                peaks[name] = peak
        lines += ["", f"## `ann2snn run` end to end vs {T} ANN passes at batch 32 ({args.images} images; "
                  f"medians of {args.repeats})", "",
                  f"{T} ANN passes at batch 32: {statistics.median(bounds):.2f} s", "",
                  md_row(["command", "seconds", f"/ ({T} ANN passes)", "peak MB"]), md_rule(4)]
        for name in configs:
            lines.append(md_row([f"`run -T {T}` {name}", f"{statistics.median(walls[name]):.2f}",
                                 f"{statistics.median(ratios[name]):.2f}", f"{peaks[name]:.0f}"]))

        # 4. memory against the number of inputs
        lines += ["", "## Peak memory against the number of inputs (fresh processes)", "",
                  md_row(["command", "500 inputs MB", "50,000 inputs MB", "input file MB (50,000)"]), md_rule(4)]
        labels = np.load(TEST)["label"]
        files = {}
        for n in (500, 50_000):
            files[n] = Path(tmp) / f"in{n}.npz"
            np.savez(files[n], input=np.resize(x_all, (n, *x_all.shape[1:])), label=np.resize(labels, n))
        for name, argv in [("run -T 1", ["run", str(SNN), "-T", "1", "-o", str(out), "--input"]),
                           ("eval -T 1,2", ["eval", str(MODEL), str(SNN), "-T", "1,2", "--no-progress", "--data"]),
                           ("report -T 1,2", ["report", str(SNN), "-T", "1,2", "--no-progress", "--data"])]:
            mb = {n: cli(["-q", *argv, str(f)])[1] for n, f in files.items()}
            lines.append(md_row([f"`{name}`", f"{mb[500]:.0f}", f"{mb[50_000]:.0f}",
                                 f"{files[50_000].stat().st_size / 2**20:.0f}"]))
    if args.rules:
        lines += rules(args.repeats)
    lines += ["", f"load average at the end: {os.getloadavg()[0]:.2f}"]
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text("# ann2snn run: start-up, phases, end to end, memory (benchmarks/cli_profile.py)\n\n"
                           + text + "\n")


if __name__ == "__main__":
    main()
