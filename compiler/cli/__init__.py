"""The ``ann2snn`` command line: inspect, compile, run, eval, report, export, probe.

Errors are printed as one clean message on stderr with a non-zero exit code
(2: bad option, 3: model cannot be read or converted, 4: bad data, 5: resource limit,
130: interrupted, 1: other);
``--verbose`` adds the traceback.

Each command lives in a module of this package and calls into the library; this module
only holds the ``ann2snn`` group (the console script ``ann2snn.cli:main``).
"""
from __future__ import annotations

import logging
import sys

import click

from ..version import __version__
from .commands import compile_cmd, eval_cmd, inspect_cmd, run_cmd
from .export import export_cmd
from .probe import probe_cmd
from .report import report_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ann2snn")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging, and tracebacks with errors.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors on stderr.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """ann2snn: convert pretrained ONNX ANNs into spiking neural networks, training-free."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    ctx.obj["quiet"] = quiet
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


for _command in (compile_cmd, inspect_cmd, run_cmd, eval_cmd, report_cmd, export_cmd, probe_cmd):
    main.add_command(_command)
