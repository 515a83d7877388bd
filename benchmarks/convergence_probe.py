"""Why the output error of a converted network stops falling with T (issue 15, convergence).

For each model and recipe, :func:`ann2snn.analysis.probe.probe_layers` compares every neuron
layer's rate·θ with the ANN's activation and with the *clipped ANN* (every activation clipped
at what the neuron can stand for: θ, or N·θ with bursts of N) on held-out data. The summary
gives, per recipe, the clipped ANN's output error (the floor no T can go below) and the SNN's
output error by T; the per-layer tables show where the departure starts.

Run: ``python benchmarks/convergence_probe.py [--models fashion_resnet,old] [--samples 32]
[-T 64,256,1024] [--layers fashion_resnet,squeezenet] [--recipes ...]``; writes
``benchmarks/results/convergence_probe.md``.
"""
from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
from common import ROOT, command_line, md_row
from recipe_search import GROUPS, MODELS

from ann2snn.analysis.probe import format_probe, probe_layers

RECIPES = {
    "ltb/channel if (default)": {},
    "max/channel if": {"method": "max"},
    "ltb/channel signed burst 2": {"neuron": "signed", "burst": 2},
    "max/channel signed burst 2": {"method": "max", "neuron": "signed", "burst": 2},
    "percentile/channel signed burst 2": {"method": "percentile", "neuron": "signed", "burst": 2},
}
#: the recipes run by default (the percentile one is what the search chose on MobileNetV2)
DEFAULT_RECIPES = list(RECIPES)[:4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="fashion_resnet,old")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("-T", default="64,256,1024")
    parser.add_argument("--layers", default="fashion_resnet,squeezenet", help="models whose per-layer tables to print")
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated keys of RECIPES")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convergence_probe.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    Ts = [int(t) for t in args.T.split(",")]
    names = [m for g in args.models.split(",") for m in GROUPS.get(g, [g])]
    detail = set(args.layers.split(","))
    summary = ["| model | recipe | clipped ANN error | " + " | ".join(f"SNN error T={T}" for T in Ts)
               + f" | error {Ts[1]}/{Ts[0]} | most clipped layer |", "|---" * (5 + len(Ts)) + "|"]
    tables = []
    for name in names:
        model, calib, test = MODELS[name]
        x = np.load(test)["input"][:args.samples]
        for label in args.recipes.split(","):
            options = RECIPES[label]
            r = probe_layers(model, calib, {"input": x}, Ts, **options)
            out = r["output"]
            worst = max(r["layers"], key=lambda layer: layer["clipped_mass"])
            summary.append(md_row([name, label, f"{out['clip_error']:.4f}", *(f"{out['snn_error'][T]:.4f}" for T in Ts),
                                   f"{out['snn_error'][Ts[1]] / out['snn_error'][Ts[0]]:.2f}",
                                   f"{worst['layer']} ({worst['clipped_fraction']:.2%} of activations, "
                                   f"{worst['clipped_mass']:.2%} of their sum)"]))
            print(summary[-1], file=sys.stderr)
            if name in detail:
                tables += [f"### {name}, {label} ({len(x)} held-out samples)", "", format_probe(r), ""]
    text = "\n".join([f"`{command_line()}`", "",
                      "Relative errors are mean |x - ANN| / mean |ANN| on held-out samples (never calibrated on). "
                      "clipped ANN: every activation clipped at θ (N·θ with bursts of N), the limit of the SNN as "
                      "T grows.", "", "## Summary", ""] + summary + ["", "## Per layer", ""] + tables) + "\n"
    with open(args.out, "w") as fh:
        fh.write(text)
    print(args.out)


if __name__ == "__main__":
    main()
