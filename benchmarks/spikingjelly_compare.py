"""ann2snn against SpikingJelly 2.0.0 on the same trained torch model, calibration and test data.

The Fashion-MNIST networks of ``models/build_fashion.py`` (torch state dicts written with
``--save-torch DIR``) are converted twice:

* SpikingJelly: ``Converter(LocalThresholdBalancingRecipe(batches))`` on the bare network
  with the input normalisation applied outside (the recipe cannot trace the in-graph
  division; the function computed is identical): channel-wise LTB,
  ``HalfThresholdIFNode`` (v(0) = θ/2), pre-spike max pooling; read out by summing the output
  over the steps from ``estimate_delay_start`` (SpikingJelly's delayed readout) or from 0.
* ann2snn: the same model exported to ONNX (legacy exporter), ``ann2snn.compile`` with LTB
  channel-wise on the same list of calibration batches, read out with its own t0 estimate;
  with ``--neurons if,signed`` once per neuron model.

For every ann2snn row, SpikingJelly row and T, the per-image predictions are compared in
pairs: the images only ann2snn classifies right, those only SpikingJelly does, and the exact
two-sided McNemar p-value of the difference (``--json`` keeps them; the table lists them).

Both see the same K calibration batches (drawn once with a seeded generator from
``models/data/fashion_calib.npz``, a training-set subset) and the same test images. Conversion
wall-clock times are measured. Needs torch and spikingjelly (benchmark extras). Run:

    /tmp/torchenv/bin/python benchmarks/spikingjelly_compare.py [--weights DIR] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT

sys.path.insert(0, str(ROOT / "models"))
from build_fashion import ARCHS, FASHION_MEAN, FASHION_STD, Normalised, export_onnx

SMALL_T_MAX = 64


def calib_batches(n_batches: int, batch: int, seed: int) -> list[np.ndarray]:
    """K batches from the committed calibration subset, drawn exactly as ``ann2snn.compile``
    draws them from an .npz (a seeded permutation per epoch, the remainder of an epoch
    dropped, indices sorted within a batch), so that both converters see the same batches
    and the ann2snn model equals the one ``benchmarks/accuracy.py`` builds."""
    with np.load(ROOT / "models/data/fashion_calib.npz") as z:
        x = z["input"]
    batch = min(batch, len(x))
    rng = np.random.default_rng(seed)
    order, pos, out = rng.permutation(len(x)), 0, []
    for _ in range(n_batches):
        if pos + batch > len(x):
            order, pos = rng.permutation(len(x)), 0
        out.append(x[np.sort(order[pos:pos + batch])])
        pos += batch
    return out


def normalise(x: np.ndarray) -> torch.Tensor:
    """The input normalisation, done outside the network for SpikingJelly (its LTB recipe
    rejects the ``truediv`` graph node of the in-graph normalisation)."""
    return (torch.from_numpy(x) - FASHION_MEAN) / FASHION_STD


def sj_convert(net: torch.nn.Module, batches: list[np.ndarray]) -> tuple[torch.nn.Module, float]:
    """SpikingJelly LTB conversion of the bare network; returns the SNN and the wall-clock seconds."""
    from spikingjelly.activation_based import ann2snn as sj

    start = time.perf_counter()
    snn = sj.Converter(sj.recipes.LocalThresholdBalancingRecipe([normalise(b) for b in batches])).convert(net)
    return snn, time.perf_counter() - start


def windows(cums: np.ndarray, reads: dict[str, dict[int, int]]) -> dict[str, dict[int, np.ndarray]]:
    """Predictions from cumulative outputs ``cums[:, t]`` = sum over steps [0, t): for each
    readout label and T, argmax of the sum over the steps [start, T)."""
    return {label: {T: (cums[:, T] - cums[:, s]).argmax(1) for T, s in starts.items() if T < cums.shape[1]}
            for label, starts in reads.items()}


def sj_simulate(snn: torch.nn.Module, x: np.ndarray, Ts: list[int], large: int, batch: int,
                reads: dict[str, dict[int, int]]) -> dict[str, dict[int, np.ndarray]]:
    """Run the SpikingJelly SNN once per batch and read it out over every window of ``reads``."""
    from spikingjelly.activation_based import functional

    preds: dict[str, dict[int, list[np.ndarray]]] = {label: {T: [] for T in Ts} for label in reads}
    i = 0
    with torch.no_grad():
        while i < len(x):
            n = min(batch, large - i, len(x) - i) if i < large else min(batch, len(x) - i)
            steps = max(Ts) if i < large else max(T for T in Ts if T <= SMALL_T_MAX)
            xb = normalise(x[i:i + n])
            functional.reset_net(snn)
            cums = [torch.zeros((n, 10), dtype=torch.float64)]
            for _ in range(steps):
                cums.append(cums[-1] + snn(xb).double())
            for label, by_T in windows(torch.stack(cums, 1).numpy(), reads).items():
                for T, p in by_T.items():
                    preds[label][T].append(p)
            i += n
    return {label: {T: np.concatenate(v) for T, v in by_T.items() if v} for label, by_T in preds.items()}


def mcnemar(ours: np.ndarray, theirs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Paired comparison on the same images: how many only ``ours`` / only ``theirs`` classify
    right, and the exact two-sided McNemar (binomial) p-value of that split."""
    n = min(len(ours), len(theirs))
    a, b = ours[:n] == labels[:n], theirs[:n] == labels[:n]
    only_ours, only_theirs = int((a & ~b).sum()), int((~a & b).sum())
    k, m = min(only_ours, only_theirs), only_ours + only_theirs
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
    return {"images": n, "only_ann2snn": only_ours, "only_spikingjelly": only_theirs, "p": p}


def ann2snn_simulate(snn: Any, x: np.ndarray, Ts: list[int], large: int, batch: int,
                     threads: int) -> dict[int, np.ndarray]:
    """Run the compiled model with ann2snn's runtime (its own readout delay)."""
    from ann2snn.runtime import SpikingSession

    session = SpikingSession(snn, threads=threads)
    outs: dict[int, list[np.ndarray]] = {T: [] for T in Ts}
    i = 0
    while i < len(x):
        n = min(batch, large - i) if i < large else batch
        these = Ts if i < large else [T for T in Ts if T <= SMALL_T_MAX]
        for T, r in session.run_many(x[i:i + n], these).items():
            outs[T].append(r["logits"])
        i += n
    return {T: np.concatenate(v) for T, v in outs.items() if v}


def same_weights(a: Any, b: Any) -> bool:
    """True if two compiled models carry identical initializers (thresholds, folded weights)."""
    from onnx import numpy_helper

    ia = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    return ia.keys() == ib.keys() and all(ia[k].shape == ib[k].shape and np.allclose(ia[k], ib[k], rtol=1e-5, atol=1e-6)
                                          for k in ia)


def compare(arch: str, weights: Path, Ts: list[int], limit: int, large: int, iters: int, batch: int,
            sim_batch: int, threads: int, reuse: Path | None, neurons: tuple[str, ...] = ("if",)) -> dict[str, Any]:
    """Convert one network both ways and measure accuracy at each T.

    With ``reuse`` (an ``accuracy.py --json`` file of the same model, test images and LTB
    options), the ann2snn rows are taken from it instead of simulating again, provided the
    model compiled here from the torch weights equals the one compiled from the committed
    ONNX file (it does when the weights are those of the committed model)."""
    import ann2snn
    from spikingjelly.activation_based import ann2snn as sj

    net = ARCHS[arch]()
    net.load_state_dict(torch.load(weights / f"fashion_{arch}.pt", map_location="cpu", weights_only=True))
    model = Normalised(net, FASHION_MEAN, FASHION_STD).eval()
    with np.load(ROOT / "models/data/fashion_test.npz") as z:
        x, y = z["input"][: limit or None], z["label"][: limit or None]
    large = min(large or len(x), len(x))
    batches = calib_batches(iters, batch, seed=0)
    with torch.no_grad():
        ann_pred = torch.cat([model(torch.from_numpy(x[i:i + 1000])) for i in range(0, len(x), 1000)]).argmax(1).numpy()

    rows: dict[str, dict[int, float]] = {}
    preds: dict[str, dict[int, np.ndarray]] = {}  # per-image predictions, for the paired comparison
    times: dict[str, float] = {}
    options = {"method": "ltb", "granularity": "channel", "iters": iters, "batch": batch}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        onnx_path = Path(tmp) / f"{arch}.onnx"
        export_onnx(model, onnx_path)
        compiled = ann2snn.compile(onnx_path, batches, threads=threads, **options)
        times["ann2snn (export + compile)"] = time.perf_counter() - start
        for neuron in neurons:
            if neuron != "if":
                extra[neuron] = ann2snn.compile(onnx_path, batches, threads=threads, neuron=neuron, **options)
    label = "ann2snn LTB channel (auto t0)" if "if" in neurons else None
    reused = None
    if reuse is not None and label is not None:
        saved = json.loads(reuse.read_text())["results"][f"fashion_{arch}"]
        m = saved["methods"]["ltb-channel"]
        committed = ann2snn.compile(ROOT / f"models/fashion_{arch}.onnx", ROOT / "models/data/fashion_calib.npz",
                                    threads=threads, **options)
        ok = (all(m["options"].get(k) == v for k, v in options.items())
              and saved["samples"] == len(x) and saved["large_T_samples"] == large and same_weights(compiled, committed))
        print(f"[{arch}] reuse of {reuse.name}: {'yes' if ok else 'no (model or options differ)'}", file=sys.stderr, flush=True)
        if ok:
            reused = str(reuse.name)
            rows[label] = {T: m["T"][str(T)]["accuracy"] for T in Ts}
    runs = ([(label, compiled)] if label is not None and reused is None else []) + [
        (f"ann2snn LTB channel, {n} neurons (t0 = {json.loads({p.key: p.value for p in m.metadata_props}['ann2snn'])['readout']['t0']})", m)
        for n, m in extra.items()]
    for lab, snn in runs:
        start = time.perf_counter()
        outs = ann2snn_simulate(snn, x, Ts, large, sim_batch, threads)
        print(f"[{arch}] {lab} simulated in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        rows[lab] = {T: float((o.argmax(1) == y[:len(o)]).mean()) for T, o in outs.items()}
        preds[lab] = {T: o.argmax(1) for T, o in outs.items()}

    sj_model, times["SpikingJelly LTB"] = sj_convert(net, batches)
    delays = {T: sj.estimate_delay_start(sj_model, [normalise(batches[0])], "cpu", T) for T in Ts}
    reads = {"SpikingJelly LTB (estimate_delay_start)": delays, "SpikingJelly LTB (no delay)": {T: 0 for T in Ts}}
    start = time.perf_counter()
    sj_preds = sj_simulate(sj_model, x, Ts, large, sim_batch, reads)
    for lab, by_T in sj_preds.items():
        rows[lab] = {T: float((p == y[:len(p)]).mean()) for T, p in by_T.items()}
    print(f"[{arch}] SpikingJelly simulated in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    paired = {f"{ours} vs {theirs}": {T: mcnemar(preds[ours][T], sj_preds[theirs][T], y) for T in Ts}
              for ours in preds for theirs in sj_preds}
    return {"samples": len(x), "large_T_samples": large, "ann_accuracy": float((ann_pred == y).mean()),
            "ann_accuracy_large_subset": float((ann_pred[:large] == y[:large]).mean()),
            "calibration": {"batches": iters, "batch": batch}, "sj_delay_start": delays,
            "ann2snn_rows_from": reused, "conversion_s": times, "accuracy": rows, "paired": paired}


def main() -> None:
    """Parse options, compare on each network, print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=Path(__file__).resolve().parents[1] / "models",
                    help="folder with fashion_<arch>.pt (default: models/, where build_fashion.py writes them)")
    ap.add_argument("--archs", default="vgg,resnet")
    ap.add_argument("-T", default="4,8,16,32,64,128,256")
    ap.add_argument("--limit", type=int, default=2000, help="first N test images for T <= 64 (0: all)")
    ap.add_argument("--large-limit", type=int, default=500, help="first N test images for T > 64")
    ap.add_argument("--iters", type=int, default=200, help="calibration batches K (both converters)")
    ap.add_argument("--batch", type=int, default=64, help="calibration batch size (both converters)")
    ap.add_argument("--sim-batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="take the ann2snn rows from this accuracy.py --json file (checked to be the same model)")
    ap.add_argument("--neurons", default="if", help="ann2snn neuron models to convert with, comma-separated (if,signed)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)
    Ts = sorted(int(t) for t in args.T.split(","))
    command = "python benchmarks/spikingjelly_compare.py " + " ".join(
        "DIR" if a == str(args.weights) else shlex.quote(a) for a in sys.argv[1:])
    versions = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], check=False, capture_output=True, text=True).stdout
    pins = [ln for ln in versions.splitlines() if ln.split("==")[0].lower() in {"torch", "spikingjelly", "onnxruntime"}]
    results = {}
    lines = [f"command: `{command}`", f"versions: {', '.join(pins)}", ""]
    for arch in args.archs.split(","):
        reuse = args.reuse.parent / args.reuse.name.replace("ARCH", arch) if args.reuse else None
        r = compare(arch, args.weights, Ts, args.limit, args.large_limit, args.iters, args.batch, args.sim_batch,
                    args.threads, reuse, tuple(args.neurons.split(",")))
        results[arch] = r
        lines += [f"**fashion_{arch}**: accuracy in %, T <= {SMALL_T_MAX} over the first {r['samples']} test images, "
                  f"T > {SMALL_T_MAX} over the first {r['large_T_samples']}; ANN {r['ann_accuracy'] * 100:.2f}% "
                  f"(first {r['large_T_samples']}: {r['ann_accuracy_large_subset'] * 100:.2f}%). "
                  f"Calibration: the same {args.iters} batches of {args.batch}. SpikingJelly delay_start by T: "
                  + ", ".join(f"{T}: {d}" for T, d in r["sj_delay_start"].items()), "",
                  "| converter | " + " | ".join(f"T={T}" for T in Ts) + " |", "|---|" + "---|" * len(Ts)]
        if r["ann2snn_rows_from"]:
            lines += [f"(ann2snn row: from {r['ann2snn_rows_from']}, the same compiled model and test images)", ""]
        for label, accs in r["accuracy"].items():
            lines.append(f"| {label} | " + " | ".join(f"{accs[T] * 100:.2f}" for T in Ts) + " |")
        if r["paired"]:
            lines += ["", "Paired on the same images (only ann2snn right / only SpikingJelly right, McNemar p):", "",
                      "| pair | " + " | ".join(f"T={T}" for T in Ts) + " |", "|---|" + "---|" * len(Ts)]
            for pair, by_T in r["paired"].items():
                lines.append(f"| {pair} | " + " | ".join(
                    f"{c['only_ann2snn']}/{c['only_spikingjelly']}, p={c['p']:.2g}" for c in by_T.values()) + " |")
        lines += ["", "conversion wall-clock: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["conversion_s"].items()), ""]
        print("\n".join(lines), flush=True)
        lines = []
    if args.json:
        args.json.write_text(json.dumps({"command": command, "T": Ts, "results": results}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
