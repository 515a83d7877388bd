"""ann2snn against SpikingJelly 2.0.0 on the same trained torch model, calibration and test data.

The Fashion-MNIST networks of ``models/build_fashion.py`` (torch state dicts written with
``--save-torch DIR``) are converted twice:

* SpikingJelly: ``Converter(LocalThresholdBalancingRecipe(batches))`` on the bare network
  with the input normalisation applied outside (the recipe cannot trace the in-graph
  division; the function computed is identical): channel-wise LTB,
  ``HalfThresholdIFNode`` (v(0) = θ/2), pre-spike max pooling; read out by summing the output
  over the steps from ``estimate_delay_start`` (SpikingJelly's delayed readout) or from 0.
* ann2snn: the same model exported to ONNX (legacy exporter), ``ann2snn.compile`` with LTB
  channel-wise on the same list of calibration batches, read out with its own t0 estimate.

Both see the same K calibration batches (drawn once with a seeded generator from
``models/data/fashion_calib.npz``, a training-set subset) and the same test images. Conversion
wall-clock times are measured. Needs torch and spikingjelly (benchmark extras). Run:

    /tmp/torchenv/bin/python benchmarks/spikingjelly_compare.py --weights DIR [--limit N]
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
from build_fashion import ARCHS, FASHION_MEAN, FASHION_STD, Normalised, export_onnx  # noqa: E402

SMALL_T_MAX = 64


def calib_batches(n_batches: int, batch: int, seed: int) -> list[np.ndarray]:
    """K batches drawn (reshuffling per epoch) from the committed calibration subset."""
    with np.load(ROOT / "models/data/fashion_calib.npz") as z:
        x = z["input"]
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n_batches * batch:
        order.extend(rng.permutation(len(x)).tolist())
    return [x[order[i * batch:(i + 1) * batch]] for i in range(n_batches)]


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


def sj_simulate(snn: torch.nn.Module, x: np.ndarray, Ts: list[int], large: int, batch: int,
                delays: dict[int, int]) -> dict[int, np.ndarray]:
    """Run the SpikingJelly SNN; the output for T is the mean over steps [delays[T], T)."""
    from spikingjelly.activation_based import functional

    outs: dict[int, list[np.ndarray]] = {T: [] for T in Ts}
    i = 0
    with torch.no_grad():
        while i < len(x):
            n = min(batch, large - i) if i < large else batch
            these = Ts if i < large else [T for T in Ts if T <= SMALL_T_MAX]
            xb = normalise(x[i:i + n])
            functional.reset_net(snn)
            cums = []
            total = torch.zeros(())
            for _ in range(max(these)):
                total = total + snn(xb).double()
                cums.append(total)
            for T in these:
                d = delays[T]
                base = cums[d - 1] if d > 0 else 0.0
                outs[T].append(((cums[T - 1] - base) / (T - d)).float().numpy())
            i += n
    return {T: np.concatenate(v) for T, v in outs.items() if v}


def ann2snn_simulate(snn: Any, x: np.ndarray, Ts: list[int], large: int, batch: int) -> dict[int, np.ndarray]:
    """Run the compiled model with ann2snn's runtime (its own readout delay)."""
    from ann2snn.runtime import SpikingSession

    session = SpikingSession(snn)
    outs: dict[int, list[np.ndarray]] = {T: [] for T in Ts}
    i = 0
    while i < len(x):
        n = min(batch, large - i) if i < large else batch
        these = Ts if i < large else [T for T in Ts if T <= SMALL_T_MAX]
        for T, r in session.run_many(x[i:i + n], these).items():
            outs[T].append(r["logits"])
        i += n
    return {T: np.concatenate(v) for T, v in outs.items() if v}


def compare(arch: str, weights: Path, Ts: list[int], limit: int, large: int, iters: int, batch: int,
            sim_batch: int) -> dict[str, Any]:
    """Convert one network both ways and measure accuracy at each T."""
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
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        onnx_path = Path(tmp) / f"{arch}.onnx"
        export_onnx(model, onnx_path)
        compiled = ann2snn.compile(onnx_path, batches, method="ltb", granularity="channel", iters=iters, batch=batch)
        times["ann2snn (export + compile)"] = time.perf_counter() - start
    start = time.perf_counter()
    outs = ann2snn_simulate(compiled, x, Ts, large, sim_batch)
    print(f"[{arch}] ann2snn simulated in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    rows["ann2snn LTB channel (auto t0)"] = {T: float((o.argmax(1) == y[:len(o)]).mean()) for T, o in outs.items()}

    sj_model, times["SpikingJelly LTB"] = sj_convert(net, batches)
    delays = {T: sj.estimate_delay_start(sj_model, [normalise(batches[0])], "cpu", T) for T in Ts}
    start = time.perf_counter()
    for label, d in (("SpikingJelly LTB (estimate_delay_start)", delays), ("SpikingJelly LTB (no delay)", {T: 0 for T in Ts})):
        outs = sj_simulate(sj_model, x, Ts, large, sim_batch, d)
        rows[label] = {T: float((o.argmax(1) == y[:len(o)]).mean()) for T, o in outs.items()}
    print(f"[{arch}] SpikingJelly simulated (twice) in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return {"samples": len(x), "large_T_samples": large, "ann_accuracy": float((ann_pred == y).mean()),
            "ann_accuracy_large_subset": float((ann_pred[:large] == y[:large]).mean()),
            "calibration": {"batches": iters, "batch": batch}, "sj_delay_start": delays,
            "conversion_s": times, "accuracy": rows}


def main() -> None:
    """Parse options, compare on each network, print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, required=True, help="folder with fashion_<arch>.pt (build_fashion.py --save-torch)")
    ap.add_argument("--archs", default="vgg,resnet")
    ap.add_argument("-T", default="4,8,16,32,64,128,256")
    ap.add_argument("--limit", type=int, default=2000, help="first N test images for T <= 64 (0: all)")
    ap.add_argument("--large-limit", type=int, default=500, help="first N test images for T > 64")
    ap.add_argument("--iters", type=int, default=200, help="calibration batches K (both converters)")
    ap.add_argument("--batch", type=int, default=64, help="calibration batch size (both converters)")
    ap.add_argument("--sim-batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)
    Ts = sorted(int(t) for t in args.T.split(","))
    command = "python benchmarks/spikingjelly_compare.py " + " ".join(
        "DIR" if a == str(args.weights) else shlex.quote(a) for a in sys.argv[1:])
    versions = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    pins = [ln for ln in versions.splitlines() if ln.split("==")[0].lower() in {"torch", "spikingjelly", "onnxruntime"}]
    results = {}
    lines = [f"command: `{command}`", f"versions: {', '.join(pins)}", ""]
    for arch in args.archs.split(","):
        r = compare(arch, args.weights, Ts, args.limit, args.large_limit, args.iters, args.batch, args.sim_batch)
        results[arch] = r
        lines += [f"**fashion_{arch}**: accuracy in %, T <= {SMALL_T_MAX} over the first {r['samples']} test images, "
                  f"T > {SMALL_T_MAX} over the first {r['large_T_samples']}; ANN {r['ann_accuracy'] * 100:.2f}% "
                  f"(first {r['large_T_samples']}: {r['ann_accuracy_large_subset'] * 100:.2f}%). "
                  f"Calibration: the same {args.iters} batches of {args.batch}. SpikingJelly delay_start by T: "
                  + ", ".join(f"{T}: {d}" for T, d in r["sj_delay_start"].items()), "",
                  "| converter | " + " | ".join(f"T={T}" for T in Ts) + " |", "|---|" + "---|" * len(Ts)]
        for label, accs in r["accuracy"].items():
            lines.append(f"| {label} | " + " | ".join(f"{accs[T] * 100:.2f}" for T in Ts) + " |")
        lines += ["", "conversion wall-clock: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["conversion_s"].items()), ""]
        print("\n".join(lines), flush=True)
        lines = []
    if args.json:
        args.json.write_text(json.dumps({"command": command, "T": Ts, "results": results}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
