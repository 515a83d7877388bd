"""``ann2snn probe``: where a converted network departs from its ANN, layer by layer."""
from __future__ import annotations

import json

import click

from ..config import GRANULARITIES, METHODS, NEURONS, CompileConfig
from .errors import handle_errors
from .options import parse_ts


@click.command("probe")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, type=click.Path(), help="Calibration data, as for compile.")
@click.option("--data", required=True, type=click.Path(), help="Held-out inputs to probe on (a few dozen are enough).")
@click.option("-T", "Ts", default="64,256,1024", show_default=True, help="Comma-separated timesteps.")
@click.option("--method", type=click.Choice(METHODS), default=CompileConfig.method, show_default=True, help="As for compile.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=CompileConfig.granularity, show_default=True,
              help="As for compile.")
@click.option("--neuron", type=click.Choice(NEURONS), default=CompileConfig.neuron, show_default=True, help="As for compile.")
@click.option("--burst", type=int, default=CompileConfig.burst, show_default=True, help="As for compile.")
@click.option("--resolution", type=int, default=CompileConfig.resolution, show_default=True, help="As for compile.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the result as JSON.")
@click.pass_context
@handle_errors
def probe_cmd(ctx: click.Context, model: str, calib: str, data: str, Ts: str, json_path: str | None,
              **options: object) -> None:
    """Compile MODEL and show, per neuron layer, how far the SNN's rate x threshold is from the ANN's
    activation at each T, and how much of that is the thresholds clipping (the clipped ANN's error:
    the floor no T goes below)."""
    from ..analysis.probe import format_probe, probe_layers
    from ..modelio import write_atomic

    result = probe_layers(model, calib, data, parse_ts(Ts), **options)
    click.echo(format_probe(result))
    if json_path is not None:
        write_atomic(json_path, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
