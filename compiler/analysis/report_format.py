"""The cost report as markdown tables (``format_report``) and as a plot (``plot_report``,
needs matplotlib)."""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from ..errors import Ann2SnnError, ConfigError
from ..modelio import write_atomic


class PlotUnavailableError(Ann2SnnError):
    """matplotlib, needed for ``--plot``, is not installed."""

    exit_code = 2


# -- presentation -------------------------------------------------------------------------------------

def _si(x: float, unit: str = "") -> str:
    for f, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def _joules(x: float) -> str:
    for f, p in ((1, "J"), (1e-3, "mJ"), (1e-6, "µJ"), (1e-9, "nJ"), (1e-12, "pJ")):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}"
    return f"{x:.3g} J"


def _pct(x: float | None) -> str:
    return f"{x * 100:.2f}%" if x is not None else "-"


def format_report(result: dict[str, Any], layer_T: int | None = None) -> str:
    """Markdown tables of a ``report`` result; per-layer tables at ``layer_T`` (default: the largest T)."""
    Ts = result["Ts"]
    layer_T = Ts[-1] if layer_T is None else layer_T
    if layer_T not in Ts:
        raise ConfigError(f"--layer-T {layer_T} is not one of the simulated T ({', '.join(map(str, Ts))})")
    j = Ts.index(layer_T)
    models = [e["name"] for e in result["energy_models"]]
    ann = result["ann"]
    conv = result.get("conventions", {})
    lines = [f"samples: {result['samples']}, readout t0: {result['t0']}, weights counted: "
             f"{conv.get('weights', 'dense')}, MACs: {conv.get('mac_count', 'dense')}, analog-input MACs: "
             f"{conv.get('analog_macs', 'once per input')}",
             "energy: " + "; ".join(f"{e['name']} = {e['note']}" for e in result["energy_models"]),
             f"ANN: {_si(ann['macs'])}MAC per input, accuracy {_pct(ann['accuracy'])}, energy "
             + ", ".join(f"{k} {_joules(v)}" for k, v in ann["energy_j"].items())]
    share = result.get("mac_share")
    if share and share["total"]:
        pct = {k: 100.0 * share[k] / share["total"] for k in ("spiking", "prefix", "tail")}
        lines.append(f"weighted work of the ANN: {pct['spiking']:.1f}% on spikes, {pct['prefix']:.1f}% in the "
                     f"time-constant analog prefix, {pct['tail']:.1f}% in the analog tail"
                     + (f", {100.0 * share['compensated'] / share['total']:.1f}% on the real-valued increments of "
                        "compensated ops (MACs at every step)" if share.get("compensated") else "")
                     + (f", {100.0 * share['analog_current'] / share['total']:.1f}% on analog currents read straight from "
                        "another weighted op (MACs at every step)" if share.get("analog_current") else "")
                     + (" (less than half spikes: see `ann2snn inspect`)" if pct["spiking"] < 50 else ""))
    lines.append("")
    head = "| T | accuracy | spikes/input | firing rate | SOPs/input | MACs/input | " + \
        " | ".join(f"energy {m} | ANN/SNN {m}" for m in models) + " |"
    lines += [head, "|" + "---|" * (6 + 2 * len(models))]
    for r in result["snn"]:
        cells = [str(r["T"]), _pct(r.get("accuracy")), _si(r["spikes_per_input"]), f"{r['firing_rate']:.4f}",
                 _si(r["sops_per_input"]), _si(r["macs_per_input"])]
        for m in models:
            ratio = r["ann_over_snn_energy"][m]
            cells += [_joules(r["energy_j"][m]), f"{ratio:.2f}x" if ratio is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for key, label in (("sops90", "SOPs90"), ("sops95", "SOPs95")):
        s = result.get(key)
        if ann["accuracy"] is None:
            lines.append(f"{label}: needs labels and the ANN (--ann)")
        elif s is None:
            lines.append(f"{label}: not reached at any simulated T")
        else:
            lines.append(f"{label}: {_si(s['sops_per_input'])}SOP per input at T={s['T']} "
                         f"(accuracy {_pct(s['accuracy'])}; " +
                         ", ".join(f"{k} {_joules(v)}" for k, v in s["energy_j"].items()) + ")")
    lines += ["", f"Neuron layers at T={layer_T}:", "",
              "| layer | neurons | mean fan-out | firing rate | spikes/input | SOPs/input |", "|---|---|---|---|---|---|"]
    for nl in result["neuron_layers"]:
        r = nl["by_T"][j]
        lines.append(f"| {nl['name']} | {nl['units']} | {nl['fanout_mean']:.1f} | {r['firing_rate']:.4f} | "
                     f"{_si(r['spikes_per_input'])} | {_si(r['sops_per_input'])} |")
    m0 = models[0]
    tot = sum(layer["by_T"][j]["energy_j"][m0] for layer in result["synaptic_layers"]) or 1.0
    lines += ["", f"Synaptic layers at T={layer_T}:", "",
              f"| layer | op | input from | SOPs/input | MACs/input | ANN MACs | share of {m0} energy |",
              "|---|---|---|---|---|---|---|"]
    for layer in result["synaptic_layers"]:
        r = layer["by_T"][j]
        # no neuron feeds it (the analog input, a weighted op's current, increments): no spikes, "-"
        sops = _si(r["sops_per_input"]) if layer.get("from_spikes", True) else "-"
        lines.append(f"| {layer['name']} | {layer['op']} | {', '.join(layer['inputs']) or '-'} | "
                     f"{sops} | {_si(r['macs_per_input'])} | {_si(layer['ann_macs'])} | "
                     f"{r['energy_j'][m0] / tot * 100:.1f}% |")
    return "\n".join(lines)


def require_matplotlib() -> None:
    """Raise PlotUnavailableError (naming ``pip install matplotlib``) if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailableError("--plot needs matplotlib, which is not installed; "
                                   "`pip install matplotlib` (or drop --plot)") from None


def plot_report(result: dict[str, Any], path: str | os.PathLike[str], energy_model: str | None = None) -> None:
    """Accuracy against energy per input (one point per T, the ANN as a reference line) and a
    per-layer bar chart of SOPs per input at each T, written atomically to ``path``."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [e["name"] for e in result["energy_models"]]
    Ts = result["Ts"]
    ann = result["ann"]
    labelled = any(r.get("accuracy") is not None for r in result["snn"])
    key = "accuracy" if labelled else "agreement" if any("agreement" in r for r in result["snn"]) else None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in ([energy_model] if energy_model else models):
        xs = [r["energy_j"][m] * 1e6 for r in result["snn"]]
        ys = [r[key] * 100 for r in result["snn"]] if key else Ts
        ax1.plot(xs, ys, "o-", label=f"SNN ({m})")
        for x, y, T in zip(xs, ys, Ts):
            ax1.annotate(f"T={T}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        color = ax1.lines[-1].get_color()
        ax1.axvline(ann["energy_j"][m] * 1e6, color=color, linestyle=":", label=f"ANN energy ({m})")
        if key == "accuracy" and ann["accuracy"] is not None:
            ax1.plot([ann["energy_j"][m] * 1e6], [ann["accuracy"] * 100], "*", color=color, markersize=12)
    if key == "accuracy" and ann["accuracy"] is not None:
        ax1.axhline(ann["accuracy"] * 100, color="gray", linestyle="--", label="ANN accuracy")
    ax1.set_xscale("log")
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
    ax1.set_xlabel("energy per input (µJ)")
    ax1.set_ylabel({"accuracy": "accuracy (%)", "agreement": "agreement with ANN (%)", None: "T"}[key])
    ax1.legend(fontsize=8)
    ax1.set_title("accuracy vs energy")
    layers = [la for la in result["synaptic_layers"] if any(r["sops_per_input"] for r in la["by_T"])]
    width = 0.8 / max(len(Ts), 1)
    x = np.arange(len(layers))
    for i, T in enumerate(Ts):
        ax2.bar(x + i * width, [la["by_T"][i]["sops_per_input"] for la in layers], width, label=f"T={T}")
    ax2.set_xticks(x + width * (len(Ts) - 1) / 2)
    ax2.set_xticklabels([la["name"] for la in layers], rotation=30, ha="right", fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("SOPs per input")
    ax2.set_title("SOPs per synaptic layer")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fmt = os.path.splitext(str(path))[1].lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
