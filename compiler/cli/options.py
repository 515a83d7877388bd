"""Options shared by several commands: -T lists, --config files, --form, --allow-nonfinite."""
from __future__ import annotations

from pathlib import Path

import click

from ..device import DEVICES
from ..errors import ConfigError


def parse_ts(value: str) -> list[int]:
    """``-T 8,16,32`` as a list of positive timesteps."""
    try:
        Ts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"-T takes comma-separated positive integers, got '{value}'") from None
    if not Ts or any(T <= 0 for T in Ts):
        raise ConfigError(f"T must be a positive number of timesteps, got '{value}' (-T)")
    return Ts


def load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE: TOML whose keys are the command's flags (without dashes); flags override it.

    Keys may stand at the top level or in a table named after the command ([compile], [eval]...).
    """
    if value is None:
        return None
    import tomllib

    try:
        data = tomllib.loads(Path(value).read_text())
    except FileNotFoundError:
        raise click.BadParameter(f"config file '{value}' does not exist", param=param) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"config file '{value}' is not valid TOML: {exc}", param=param) from None
    table = data.get(ctx.command.name) if isinstance(data.get(ctx.command.name), dict) else data
    flags: dict[str, str] = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p.name != "config":
            for opt in p.opts:  # not the --no-x forms: their value would mean the opposite
                flags[opt.lstrip("-").replace("-", "_")] = p.name
            flags[p.name] = p.name
    mapped = {}
    for key, v in table.items():
        if isinstance(v, dict):
            continue  # another command's table
        name = flags.get(key.replace("-", "_"))
        if name is None:
            valid = sorted({k.replace("_", "-") for k in flags if len(k) > 1})
            raise click.BadParameter(f"config file '{value}' has key '{key}', which is no flag of "
                                     f"'{ctx.command.name}'; valid keys: {', '.join(valid)}", param=param)
        mapped[name] = tuple(v) if isinstance(v, list) else v
    ctx.default_map = {**(ctx.default_map or {}), **mapped}
    return value


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=load_config,
    help="TOML file of this command's options (keys = flag names); flags given here override it.")


#: --form: how the runtime executes the time loop (every form gives the reference's outputs)
FORM_OPTION = click.option(
    "--form", type=click.Choice(["auto", "step", "layered", "reference", "timed"]), default="auto", show_default=True,
    help="Execution form of the time loop. Every form gives the same outputs as 'reference' (the step graph run "
         "as written); auto picks step or layered by a fixed rule of batch and state sizes, timed by measuring both.")
KERNELS_OPTION = click.option(
    "--kernels/--no-kernels", default=None,
    help="Run the neurons with the compiled kernel library (built by `make kernels`) or without it; default: with it "
         "when it is built. The outputs are the same either way.")
RAY_OPTION = click.option(
    "--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
    help="Shard the data (run, report, eval) over Ray workers (pip install 'ann2snn[ray]'): --ray alone starts a cluster on this machine "
         "(one worker per core), --ray ADDRESS joins one (e.g. auto). Results are those of one process; the data "
         "path must be readable on every node. --threads sets each worker's threads (default 1).")
def check_ray_device(ray_address: str | None, device: str) -> None:
    """--ray shards over CPU workers for now: --device cuda with it is an error."""
    if ray_address is not None and device != "cpu":
        raise ConfigError("--ray runs its workers on CPUs for now: drop --ray to run on one GPU with --device cuda, "
                          "or drop --device cuda to shard over Ray")


#: --device: where onnxruntime runs (README "One GPU")
DEVICE_OPTION = click.option(
    "--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
    help="Run onnxruntime on the CPU or on the first CUDA GPU (needs onnxruntime-gpu: pip install 'ann2snn[gpu]', "
         "see README 'One GPU'); the ANN that eval and report compare with runs there too.")
CUDA_GRAPH_OPTION = click.option(
    "--cuda-graph", "cuda_graph", is_flag=True, default=False,
    help="With --device cuda: capture the time step as a CUDA graph and replay it (one launch per step); needs "
         "every node of the step graph on the GPU.")
ALLOW_NONFINITE_OPTION = click.option(
    "--allow-nonfinite", is_flag=True, default=False,
    help="Keep NaN / inf outputs with a warning instead of stopping with an error that names the output and step.")
