"""The runtime's choices, each timed in isolation: IF neurons in units of θ or as compiled, and
onnxruntime intra-op threads spinning or not, against the ANN with and without spinning;
with ``--layouts``, also the ANN and the default SNN without onnxruntime's blocked NCHWc
layout (graph optimisation level EXTENDED instead of ALL). With ``--forms``, instead: the
step form against the layered form (``mode="step"`` / ``"layered"``, the automatic chunk)
on networks whose step graphs hold symmetric neurons and expectation-compensated ops
(issue 16: the ViT compiled with ``--nonlinear compensate --signed-sites output``, the
activation CNNs with ``--signed-sites output``), with the form ``auto`` mode picks.

Every configuration runs in its own child process (so that no other session's threads are
alive beside it), warms up twice, then times ``--repeats`` simulations of T steps; the median
is printed in ms per step. The whole set of configurations is run ``--rounds`` times in turn
and the table gives the median over rounds, with each SNN configuration's ratio to the
faster ANN configuration.

    .venv/bin/python benchmarks/runtime_options.py [--models fashion_vgg,fashion_resnet] [--batches 1,32]
    .venv/bin/python benchmarks/runtime_options.py --forms [--models fashion_vit,fashion_gelu] [--batches 1,8]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, command_line, extra_options

MODELS = ROOT / "models"
DATA = {"mnist_cnn": ("mnist_calib", "mnist_test"), "fashion_vgg": ("fashion_calib", "fashion_test"),
        "fashion_resnet": ("fashion_calib", "fashion_test"), "mobilenet_v2": ("photos_calib", "photos_eval"),
        **{f"fashion_{a}": ("fashion_calib", "fashion_test") for a in ("vit", "gelu", "silu", "lrelu", "hswish")}}
#: ``--forms``: the compile options of each model (the others: signed sites on the activations' outputs)
FORM_OPTIONS = {"fashion_vit": {"nonlinear": "compensate", "signed_sites": "output"}}
#: ``--forms``: (label, SpikingSession mode (None: the ANN, T passes), intra-op threads spinning)
FORM_CONFIGS = [("ANN", None, False), ("SNN step", "step", False), ("SNN layered", "layered", False)]
#: ``--forms --spinning``: the same with spinning threads
SPIN_CONFIGS = [("ANN, spinning", None, True), ("SNN step, spinning", "step", True),
                ("SNN layered, spinning", "layered", True)]
#: (label, what, unit thresholds, spinning, NCHWc layout)
CONFIGS = [("ANN, spinning", "ann", None, True, True), ("ANN, not spinning", "ann", None, False, True),
           ("SNN compiled neurons, spinning", "snn", False, True, True),
           ("SNN compiled neurons, not spinning", "snn", False, False, True),
           ("SNN unit θ, spinning", "snn", True, True, True), ("SNN unit θ, not spinning (default)", "snn", True, False, True)]
LAYOUT_CONFIGS = [("ANN, spinning, no NCHWc", "ann", None, True, False),
                  ("SNN default, no NCHWc", "snn", True, False, False)]


def worker(spec: dict) -> None:
    """Child process: time one configuration, print ms per step."""
    import onnxruntime as ort

    with np.load(MODELS / "data" / f"{DATA[spec['model']][1]}.npz") as z:
        x = np.ascontiguousarray(z["input"][:spec["batch"]])
    T, spin = spec["T"], "1" if spec["spin"] else "0"
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if spec["nchwc"] else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if spec["what"] == "ann":
        so = ort.SessionOptions()
        so.intra_op_num_threads = spec["threads"]
        so.graph_optimization_level = level
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        sess = ort.InferenceSession(str(MODELS / f"{spec['model']}.onnx"), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def run() -> None:
            for _ in range(T):
                sess.run(None, {name: x})
    else:
        import ann2snn.runtime.session as session_module
        from ann2snn.runtime import SpikingSession

        plain = session_module._session_options

        def options(threads: int | None) -> ort.SessionOptions:
            so = plain(threads)
            so.graph_optimization_level = level
            so.add_session_config_entry("session.intra_op.allow_spinning", spin)
            return so

        session_module._session_options = options  # the runtime's options, with spinning as asked
        snn = SpikingSession(spec["snn"], threads=spec["threads"], unit_thresholds=spec["unit"],
                             mode=spec.get("mode", "auto"))

        def run() -> None:
            snn.run({snn.input_specs[0].name: x}, T)
    run()
    run()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"ms_per_step": float(np.median(times)) / T * 1e3}))


def agreement(snn_path: Path, model: str, batch: int, T: int) -> str:
    """Readouts of the unit-threshold form against the compiled arithmetic, on the same inputs."""
    from ann2snn.runtime import SpikingSession

    with np.load(MODELS / "data" / f"{DATA[model][1]}.npz") as z:
        x = np.ascontiguousarray(z["input"][:batch])
    out = {}
    for unit in (False, True):
        snn = SpikingSession(snn_path, mode="step", unit_thresholds=unit)
        out[unit] = snn.run({snn.input_specs[0].name: x}, T)[snn.output_names[0]]
    diff = float(np.abs(out[True] - out[False]).max() / max(float(np.abs(out[False]).max()), 1e-12))
    same = float((out[True].reshape(batch, -1).argmax(1) == out[False].reshape(batch, -1).argmax(1)).mean())
    return f"{diff:.1e}, {same * 100:.0f}%"


def _child(spec: dict) -> float:
    """ms per step of one configuration, timed in a fresh child process."""
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["ms_per_step"]


def forms(args: argparse.Namespace, tmp: Path) -> list[str]:
    """The ``--forms`` table: step vs layered form, each in its own child processes."""
    import onnx

    import ann2snn
    from ann2snn.runtime import SpikingSession

    configs = FORM_CONFIGS + (SPIN_CONFIGS if args.spinning else [])
    lines = ["| model | compile options | B | T | " + " | ".join(f"{c[0]} (ms/step)" for c in configs)
             + " | layered / step | auto picks | auto ÷ ANN pass |"
             + (" auto, spinning ÷ faster ANN |" if args.spinning else ""),
             "|---|---|---|---|" + "---|" * (len(configs) + 3 + int(args.spinning))]
    for model in args.models.split(","):
        options = {**FORM_OPTIONS.get(model, {"signed_sites": "output"}), **extra_options(args.extra)}
        with np.load(MODELS / "data" / f"{DATA[model][0]}.npz") as z:
            calib = z["input"][:args.calib_images]
        snn_path = tmp / f"{model}.snn.onnx"
        onnx.save(ann2snn.compile(MODELS / f"{model}.onnx", calib, iters=args.iters, batch=16, progress=False,
                                  **options), snn_path)
        for batch in (int(b) for b in args.batches.split(",")):
            got: dict[str, list[float]] = {c[0]: [] for c in configs}
            for _ in range(args.rounds):
                for label, mode, spin in configs:
                    got[label].append(_child({"model": model, "batch": batch, "T": args.T,
                                              "what": "ann" if mode is None else "snn", "unit": True,
                                              "spin": spin, "nchwc": True, "repeats": args.repeats,
                                              "threads": args.threads, "snn": str(snn_path), "mode": mode}))
            med = {k: float(np.median(v)) for k, v in got.items()}
            auto = SpikingSession(snn_path, threads=args.threads)
            picks = auto.choose_form(batch, args.T)
            form = "SNN layered" if picks[0] == "layered" else "SNN step"
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
            lines.append(f"| {model} | {flags} | {batch} | {args.T} | "
                         + " | ".join(f"{med[c[0]]:.3f}" for c in configs)
                         + f" | {med['SNN layered'] / med['SNN step']:.2f} | {_describe_form(picks)} | "
                         f"{med[form] / med['ANN']:.2f} |"
                         + (f" {med[form + ', spinning'] / min(med['ANN'], med['ANN, spinning']):.2f} |"
                            if args.spinning else ""))
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def _describe_form(form: tuple[str, int | None]) -> str:
    return f"{form[0]}(chunk={form[1]})" if form[0] == "layered" else form[0]


def main() -> None:
    """Parse options, run every configuration in a child process, print the table."""
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fashion_vgg,fashion_resnet")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("-T", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layouts", action="store_true", help="also time ANN and SNN without the NCHWc layout")
    ap.add_argument("--forms", action="store_true", help="time the step and layered forms instead (see above)")
    ap.add_argument("--iters", type=int, default=50, help="--forms: LTB iterations of the compile")
    ap.add_argument("--calib-images", type=int, default=1000, help="--forms: calibration images")
    ap.add_argument("--spinning", action="store_true", help="--forms: also time everything with spinning threads")
    ap.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                    help="--forms: a compile option added to every model's (e.g. resolution=8); repeatable")
    ap.add_argument("--md", type=Path, default=None, help="also write the table, the command on top, here")
    args = ap.parse_args()
    configs = CONFIGS + (LAYOUT_CONFIGS if args.layouts else [])
    import onnx

    import ann2snn

    command = command_line()
    tmp = Path(tempfile.mkdtemp(prefix="ann2snn_options_"))
    if args.forms:
        text = "\n".join([f"command: `{command}`", "", *forms(args, tmp)])
        print(text)
        if args.md:
            args.md.write_text(text + "\n")
        return
    lines = [f"command: `{command}`", "",
             "| model | B | T | " + " | ".join(c[0] + " (ms/step)" for c in configs)
             + " | SNN default / best ANN | unit θ vs compiled: max diff / max, argmax agreement |",
             "|---|---|---|" + "---|" * (len(configs) + 2)]
    for model in args.models.split(","):
        snn_path = tmp / f"{model}.snn.onnx"
        onnx.save(ann2snn.compile(MODELS / f"{model}.onnx", MODELS / "data" / f"{DATA[model][0]}.npz",
                                  iters=50, batch=16 if model == "mobilenet_v2" else 64, progress=False), snn_path)
        for batch in (int(b) for b in args.batches.split(",")):
            got: dict[str, list[float]] = {c[0]: [] for c in configs}
            for _ in range(args.rounds):
                for label, what, unit, spin, nchwc in configs:
                    spec = {"model": model, "batch": batch, "T": args.T, "what": what, "unit": unit, "spin": spin,
                            "nchwc": nchwc, "repeats": args.repeats, "threads": args.threads, "snn": str(snn_path)}
                    got[label].append(_child(spec))
            med = {k: float(np.median(v)) for k, v in got.items()}
            agree = agreement(snn_path, model, batch, args.T)
            best_ann = min(med[CONFIGS[0][0]], med[CONFIGS[1][0]])
            row = " | ".join(f"{med[c[0]]:.3f}" + (f" ({med[c[0]] / best_ann:.2f})" if c[1] == "snn" else "")
                             for c in configs)
            lines.append(f"| {model} | {batch} | {args.T} | {row} | {med[CONFIGS[-1][0]] / best_ann:.2f} | {agree} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
