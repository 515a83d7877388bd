"""The exporter matrix (issue 23): every committed export in models/exporters/ compiled with the
defaults on the committed calibration images, then the SNN's top-1 agreement with its own ANN
on the 300 test images at T = 32 and 64, per cell (network x exporter).

Run: ``.venv/bin/python benchmarks/exporter_matrix.py [--markdown]`` (about a minute).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load_matrix() -> Any:
    """models/exporters/matrix.py as a module."""
    spec = importlib.util.spec_from_file_location("exporter_matrix_cells", ROOT / "models" / "exporters" / "matrix.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def run_cell(matrix: Any, net: str, exporter: str, Ts: tuple[int, ...] = (32, 64)) -> dict[str, Any]:
    """Compile one cell with the defaults and evaluate it: ANN accuracy, agreement and error per T,
    neuron layers and where the spiking part ends."""
    import ann2snn
    from ann2snn.analysis.evaluate import evaluate
    from ann2snn.runtime import SpikingSession

    path = matrix.cell_path(net, exporter)
    try:
        snn = ann2snn.compile(path, matrix.cell_inputs(path, "calib"))
    except ann2snn.Ann2SnnError as exc:
        return {"net": net, "exporter": exporter, "error": " ".join(str(exc).splitlines()[:2])}
    data = matrix.cell_inputs(path, "test")
    data["label"] = matrix.labels()
    res = evaluate(path, SpikingSession(snn), data, list(Ts), batch_size=matrix.batch_size(path, 300))
    neurons = sum(1 for n in snn.graph.node if n.op_type.endswith("IFNeuron"))
    return {"net": net, "exporter": exporter, "ann_accuracy": res["ann_accuracy"], "neuron_layers": neurons,
            "snn": {r["T"]: r for r in res["snn"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print only the README table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    matrix = load_matrix()
    results = {(n, e): run_cell(matrix, n, e) for n, e in matrix.cells()}
    header = "| network | " + " | ".join(matrix.EXPORTERS) + " |"
    lines = [header, "|---" * (len(matrix.EXPORTERS) + 1) + "|"]
    for net in matrix.NETS:
        row = [net]
        for exp in matrix.EXPORTERS:
            r = results.get((net, exp))
            if r is None:
                row.append("-")
            elif "error" in r:
                row.append("refused*")
            else:
                row.append(" / ".join(f"{r['snn'][T]['agreement'] * 100:.1f}" for T in (32, 64)))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Each cell: top-1 agreement (%) of the SNN with its ANN at T = 32 / T = 64 on the 300 test images; "
                 "'-': the toolchain has no such network; refused*: compile refused it (printed below).")
    print("\n".join(lines))
    if not args.markdown:
        print()
        for (net, exp), r in results.items():
            if "error" in r:
                print(f"{net} / {exp}: refused: {r['error']}")
            else:
                errs = ", ".join(f"T={T}: accuracy {v['accuracy'] * 100:.1f}%, agreement {v['agreement'] * 100:.1f}%"
                                 + (f", rel. error {v['relative_error']:.3f}" if v["relative_error"] is not None else "")
                                 for T, v in r["snn"].items())
                print(f"{net} / {exp}: ANN accuracy {r['ann_accuracy'] * 100:.1f}%, {r['neuron_layers']} neuron "
                      f"layer(s); {errs}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
