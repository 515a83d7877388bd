"""``ann2snn report``: firing rates, synaptic operations, MACs and energy of a compiled SNN."""
from __future__ import annotations

import json
from typing import Any

import click

from .errors import handle_errors
from .options import DEVICE_OPTION, RAY_OPTION, check_ray_device, parse_ts


@click.command("report")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="Test data: .npz keyed by input name (labels under --label-key for accuracy), or .npy.")
@click.option("-T", "Ts", default="16,32,64,128", show_default=True, help="Comma-separated timesteps.")
@click.option("--ann", type=click.Path(dir_okay=False), default=None,
              help="The original ANN: adds its accuracy, the agreement and SOPs90/SOPs95. "
                   "(The ANN's MACs always come from the compiled graph.)")
@click.option("--label-key", default="label", show_default=True, help="Key of the labels in the .npz.")
@click.option("--batch-size", type=int, default=None,
              help="Samples simulated at once [default: chosen from the model's size, as for run].")
@click.option("--t0", type=int, default=None, help="Readout delay (default: the model's).")
@click.option("--layer-T", "layer_T", type=int, default=None, help="T of the per-layer tables (default: the largest).")
@click.option("--weights", type=click.Choice(["dense", "nonzero"]), default="dense", show_default=True,
              help="Count every weight as a synapse, or only nonzero weights.")
@click.option("--analog-macs", type=click.Choice(["once", "every-step"]), default="once", show_default=True,
              help="MACs of layers with analog (direct-coded, constant) input: once per input, or at every step.")
@click.option("--macs", "mac_count", type=click.Choice(["dense", "valid"]), default="dense", show_default=True,
              help="MACs of analog layers and the ANN: every kernel tap (conventional), or taps off padding only.")
@click.option("--sop-fj", type=float, default=77.0, show_default=True, help="Paper set: energy per SOP (fJ).")
@click.option("--flop-pj", type=float, default=12.5, show_default=True, help="Paper set: energy per ANN FLOP (pJ).")
@click.option("--flops-per-mac", type=float, default=1.0, show_default=True,
              help="Paper set: FLOPs per multiply-accumulate (the paper counts 1).")
@click.option("--ac-pj", type=float, default=0.9, show_default=True, help="45 nm set: energy per accumulate (pJ).")
@click.option("--mac-pj", type=float, default=4.6, show_default=True, help="45 nm set: energy per multiply-accumulate (pJ).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also plot accuracy vs energy and SOPs per layer (.png/.pdf/.svg; needs matplotlib).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@DEVICE_OPTION
@RAY_OPTION
@click.pass_context
@handle_errors
def report_cmd(ctx: click.Context, model: str, data: str, Ts: str, ann: str | None, label_key: str, batch_size: int | None,
               t0: int | None, layer_T: int | None, weights: str, analog_macs: str, mac_count: str,
               sop_fj: float, flop_pj: float, flops_per_mac: float, ac_pj: float, mac_pj: float,
               json_path: str | None, plot_path: str | None, progress: bool, device: str,
               ray_address: str | None) -> None:
    """What the SNN MODEL costs per input at each T: spikes, SOPs, MACs, energy, per layer.

    With --device cuda the SNN (and the ANN of --ann) run on the GPU; the spike counts are
    copied to the host at every step."""
    from ..analysis.report import cmos45_energy, paper_energy, report
    from ..analysis.report_format import format_report, plot_report, require_matplotlib
    from ..errors import ConfigError
    from ..modelio import write_atomic

    values: dict[str, Any] = {"--sop-fj": sop_fj, "--flop-pj": flop_pj, "--flops-per-mac": flops_per_mac,
                              "--ac-pj": ac_pj, "--mac-pj": mac_pj}
    bad = [f"{k} {v}" for k, v in values.items() if not v >= 0]
    if bad:
        raise ConfigError(f"energy constants must be >= 0, got {', '.join(bad)}")
    check_ray_device(ray_address, device)
    ts = parse_ts(Ts)
    if layer_T is not None and layer_T not in ts:
        raise ConfigError(f"--layer-T {layer_T} is not one of the timesteps -T {Ts}")
    if plot_path:  # fail before a long simulation, not after
        require_matplotlib()
    result = report(model, data, ts, ann=ann, label_key=label_key, batch_size=batch_size, t0=t0,
                    energy=(paper_energy(sop_fj, flop_pj, flops_per_mac), cmos45_energy(ac_pj, mac_pj)),
                    nonzero_weights=weights == "nonzero", analog_once=analog_macs == "once", mac_count=mac_count,
                    show_progress=progress and not ctx.obj["quiet"], ray_address=ray_address, device=device)
    click.echo(format_report(result, layer_T))
    if json_path:
        write_atomic(json_path, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    if plot_path:
        plot_report(result, plot_path)
