"""``ann2snn export``: a compiled spiking model in another format (NIR)."""
from __future__ import annotations

from collections import Counter

import click

from .errors import handle_errors


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--to", "fmt", type=click.Choice(["nir"]), required=True, help="Target format.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the file.")
@click.option("--allow-approximation", is_flag=True,
              help="Export what NIR can only approximate (every IF neuron: NIR resets to a fixed potential and has "
                   "no initial membrane; MaxPool as an AvgPool2d placeholder; the spiking part without the analog "
                   "tail); the metadata marks each change.")
@click.pass_context
@handle_errors
def export_cmd(ctx: click.Context, model: str, fmt: str, output: str, allow_approximation: bool) -> None:
    """Export a compiled spiking MODEL to another format (NIR)."""
    from ..export.nir import export_nir

    graph = export_nir(model, output, allow_approximation)
    kinds = Counter(type(n).__name__ for n in graph.nodes.values())
    if ctx.obj["quiet"]:
        return
    click.echo(f"wrote {output}: NIR graph with {len(graph.nodes)} nodes "
               f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), {len(graph.edges)} edges")
    click.echo("approximated: neurons reset by subtraction and start at v0*threshold, which NIR's IF cannot "
               "express; the 'ann2snn.*' metadata of each node says what was changed", err=True)
