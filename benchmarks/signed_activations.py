"""Signed activation sites (issue 16): LeakyReLU, SiLU, HardSwish, GELU and ConvNeXt networks converted with
the symmetric signed neuron on the activation's output (form ``output``, the op compensated on its
input current) or on its input current (form ``input``, the op compensated on the spikes), beside
the analog baseline (``--signed-sites off``: the first such activation ends the spiking part).

Networks: models/build_activations.py and models/build_convnext.py (Fashion-MNIST, evaluated on
test images 0..limit-1, which they were never trained on); a name ``<arch>_dynamo`` is the same
weights from the dynamo exporter (``models/fashion_<arch>_dynamo.onnx``). The SiLU and HardSwish
networks have squeeze-excitation gates (Sigmoid / HardSigmoid times the features) and the ConvNeXt
has LayerNorms: they are compiled with ``--nonlinear compensate`` (and ``--respike``, the default)
so that nothing is left to the analog tail.

Per row: MAC shares (% of the ANN's MACs per sample on spikes / on compensated increments / in the
time-constant prefix / in the analog tail), SNN accuracy at each T, and top-1 agreement with the
ANN and relative output error at each T.

Run: ``.venv/bin/python benchmarks/signed_activations.py [--models lrelu,silu,hswish,gelu,convnext,gelu_dynamo]
[--forms output,input,off] [--methods ltb,max] [--limit 1000] [-T 16,32,64,128]``
(writes benchmarks/results/signed_activations.md and .json).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import numpy as np
import onnxruntime as ort

from common import ROOT, T_header, command_line, extra_options, mac_share_cell, md_row, write_results
from expectation_compensation import shares

#: networks whose gates (SiLU, HardSwish) or LayerNorms (ConvNeXt) need compensation to stay spiking
COMPENSATED = ("silu", "hswish", "convnext")


def measure(model: str, form: str, method: str, x: np.ndarray, y: np.ndarray, ann: np.ndarray, calib: np.ndarray,
            Ts: list[int], batch: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile one network with one form and method; accuracy, agreement and error per T."""
    import ann2snn
    from ann2snn.runtime import SpikingSession

    options: dict[str, Any] = {"signed_sites": form, "method": method}
    if model.removesuffix("_dynamo") in COMPENSATED:
        options["nonlinear"] = "compensate"
    options.update(extra or {})
    start = time.perf_counter()
    snn = ann2snn.compile(ROOT / "models" / f"fashion_{model}.onnx", {"input": calib}, **options)
    compile_s = time.perf_counter() - start
    session = SpikingSession(snn)
    outs: dict[int, list[np.ndarray]] = {T: [] for T in Ts}
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        res = session.run_many({"input": x[i:i + batch]}, Ts)
        for T in Ts:
            outs[T].append(res[T]["logits"])
    sim_s = time.perf_counter() - start
    rows = {}
    for T in Ts:
        o = np.concatenate(outs[T])
        rows[T] = {"accuracy": float((o.argmax(1) == y).mean() * 100),
                   "agreement": float((o.argmax(1) == ann.argmax(1)).mean() * 100),
                   "error": float(np.abs(o - ann).mean() / np.abs(ann).mean())}
    kinds = {}
    for n in json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])["neurons"]:
        kinds[n.get("site", "relu")] = kinds.get(n.get("site", "relu"), 0) + 1
    return {"model": model, "form": form, "method": method, "options": options, "shares": shares(snn),
            "neuron_layers": kinds, "compile_s": compile_s, "simulate_s": sim_s, "T": rows}


def main() -> None:
    """Measure every (model, form, method) and write the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lrelu,silu,hswish,gelu")
    p.add_argument("--forms", default="output,input,off")
    p.add_argument("--methods", default="ltb,max")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("-T", default="16,32,64,128")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--out", default="signed_activations")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="a compile option added to every compile (e.g. respike_currents=true); repeatable")
    args = p.parse_args()
    extra = extra_options(args.extra)
    logging.getLogger("ann2snn").setLevel(logging.ERROR)
    Ts = [int(t) for t in args.T.split(",")]
    test = np.load(ROOT / "models" / "data" / "fashion_test.npz")
    x, y = test["input"][:args.limit], test["label"][:args.limit]
    calib = np.load(ROOT / "models" / "data" / "fashion_calib.npz")["input"]
    results = []
    lines = [f"`{command_line()}`", "",
             f"Fashion-MNIST test images 0-{args.limit - 1} (never trained on). MACs: % of the ANN's MACs per sample "
             "on spikes / on compensated increments / prefix / analog tail. SNN accuracy %, then top-1 agreement % "
             "with the ANN and relative output error at each T.", ""]
    lines += T_header(["model (ANN %)", "form", "method", "MACs s/c/p/t"], Ts,
                      [f"agree T={T}" for T in Ts] + [f"error T={T}" for T in Ts] + ["compile s", "simulate s"])
    for model in args.models.split(","):
        path = ROOT / "models" / f"fashion_{model}.onnx"
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ann = np.concatenate([sess.run(None, {"input": x[i:i + 1000]})[0] for i in range(0, len(x), 1000)])
        ann_acc = float((ann.argmax(1) == y).mean() * 100)
        for form in args.forms.split(","):
            for method in args.methods.split(","):
                if form == "off" and model.startswith("lrelu"):
                    continue  # LeakyReLU inside the spiking part is an error without signed sites
                r = measure(model, form, method, x, y, ann, calib, Ts, args.batch, extra)
                r["ann_accuracy"] = ann_acc
                results.append(r)
                s = r["shares"]
                row = md_row([f"{model} ({ann_acc:.1f})", form, method,
                              mac_share_cell(s, ("spiking", "compensated", "prefix", "tail"), "/"),
                              *(f"{r['T'][T]['accuracy']:.1f}" for T in Ts),
                              *(f"{r['T'][T]['agreement']:.1f}" for T in Ts),
                              *(f"{r['T'][T]['error']:.3f}" for T in Ts),
                              f"{r['compile_s']:.1f}", f"{r['simulate_s']:.0f}"])
                lines.append(row)
                print(row, flush=True)
    out = ROOT / "benchmarks" / "results"
    write_results("\n".join(lines), out / f"{args.out}.md", out / f"{args.out}.json",
                  {"command": command_line(), "results": results})


if __name__ == "__main__":
    main()
