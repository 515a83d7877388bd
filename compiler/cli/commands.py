"""The commands that compile, inspect and run models: compile, inspect, run, eval.

Each is a thin layer over the library: it parses its options and calls one function of it.
"""
from __future__ import annotations

import json
from typing import Any

import click

from ..config import (DEEP_CHAIN, DEFAULT_TARGET_T, GRANULARITIES, MAXPOOL_MODES, METHODS, NEURONS, NONLINEAR_MODES,
                      RECIPE_FIELDS, SIGNED_SITE_FORMS, TASKS, CompileConfig)
from ..device import DEVICES
from ..errors import ConfigError
from .errors import handle_errors
from .options import (ALLOW_NONFINITE_OPTION, CUDA_GRAPH_OPTION, DEVICE_OPTION, FORM_OPTION, KERNELS_OPTION,
                      RAY_OPTION, check_ray_device, config_option, parse_ts)


@click.command("compile")
@config_option
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the .snn.onnx model.")
@click.option("--calib", required=True, type=click.Path(),
              help="Calibration data: .npz keyed by input name, .npy, or images (a folder of class subfolders, "
                   "or a .txt list of paths) for single-input models.")
@click.option("--method", type=click.Choice(METHODS), default=CompileConfig.method, show_default=True,
              help="Threshold calibration: local threshold balancing, max-norm or percentile norm.")
@click.option("--iters", type=int, default=CompileConfig.iters, show_default=True, help="Calibration iterations K (batches).")
@click.option("--batch", type=int, default=CompileConfig.batch, show_default=True, help="Calibration batch size B.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=CompileConfig.granularity, show_default=True,
              help="One threshold per channel/neuron, or per layer.")
@click.option("--eta", type=float, default=CompileConfig.eta, show_default=True, help="LTB step size.")
@click.option("--percentile", type=float, default=CompileConfig.percentile, show_default=True,
              help="Percentile for --method percentile.")
@click.option("--v0", type=float, default=CompileConfig.v0, show_default=True,
              help="Initial membrane potential as a fraction of the threshold.")
@click.option("--keep-clip-cap/--drop-clip-cap", default=CompileConfig.keep_clip_cap, show_default=True,
              help="Keep thresholds <= c for Clip(0, c) / ReLU6 activations.")
@click.option("--seed", type=int, default=CompileConfig.seed, show_default=True, help="Seed of the calibration sampler.")
@click.option("--maxpool", type=click.Choice(MAXPOOL_MODES), default=CompileConfig.maxpool, show_default=True,
              help="Pre-neuron MaxPool on a time-varying current: pool its running sum, or each step's value.")
@click.option("--neuron", type=click.Choice(NEURONS), default=CompileConfig.neuron, show_default=True,
              help="Neuron model: integrate-and-fire with 0/1 spikes (if), or with signed spikes that take back early "
                   "spikes (signed: converges much faster on deep networks).")
@click.option("--burst", type=int, default=CompileConfig.burst, show_default=True,
              help="The most spikes (or take-backs) a neuron may emit in one step: the signed neurons of ReLU sites "
                   "(--neuron signed) and the symmetric neurons of signed sites and re-spiked ops.")
@click.option("--resolution", type=int, default=CompileConfig.resolution, show_default=True,
              help="Divide each threshold of a neuron that can burst (as for --burst) by N and allow N times the burst "
                   "per step: the same ceiling, N times finer steps (error ~ 1/(N T)), up to N times the spikes.")
@click.option("--nonlinear", type=click.Choice(NONLINEAR_MODES), default=CompileConfig.nonlinear, show_default=True,
              help="Nonlinear ops on a time-varying signal (Softmax, LayerNorm, GELU, attention products): end the "
                   "spiking part and run in the analog tail, or stay in the step graph by expectation compensation.")
@click.option("--signed-sites", type=click.Choice(SIGNED_SITE_FORMS), default=CompileConfig.signed_sites,
              show_default=True,
              help="LeakyReLU, PReLU, SiLU, GELU, HardSwish: a signed neuron (spikes of +-1) on the op's output, the op "
                   "compensated on its input current (output); the neuron on the input current, the op compensated on "
                   "its spikes (input); or an analog op as before (off). auto: output for LeakyReLU and PReLU, off for "
                   "the others.")
@click.option("--respike/--no-respike", default=CompileConfig.respike, show_default=True,
              help="With --nonlinear compensate: a signed neuron after each compensated op that feeds a weighted op, "
                   "so that the weighted op reads spikes instead of real-valued increments.")
@click.option("--respike-currents/--no-respike-currents", default=CompileConfig.respike_currents, show_default=True,
              help="A signed neuron before each weighted op that reads another weighted op's current (no neuron "
                   "between them, e.g. a linear bottleneck), so that it reads spikes instead of a real-valued current.")
@click.option("--strict", is_flag=True, help="A non-spike-compatible op inside the spiking part is an error.")
@click.option("--spiking-until", multiple=True, metavar="TENSOR",
              help="End the spiking part at TENSOR: its consumers and everything after them run in the analog tail "
                   "(repeatable).")
@click.option("--threads", type=int, default=0, show_default=True,
              help="onnxruntime threads for calibration (0: its default); the output does not depend on it.")
@click.option("--device", type=click.Choice(DEVICES), default=CompileConfig.device, show_default=True,
              help="Run the calibration (and the recipe search's simulations) on the CPU or the first CUDA GPU "
                   "(pip install 'ann2snn[gpu]', README 'One GPU'); GPU thresholds can differ in the last bits.")
@click.option("--max-memory", type=float, default=0.0, show_default=True,
              help="Refuse a calibration estimated above this many GiB (0: 75% of physical memory).")
@click.option("--dump-dir", type=click.Path(file_okay=False), default=None, help="Write the graph after every pass here.")
@click.option("--resize", type=int, default=0, show_default=True, help="Images: resize the shorter side first.")
@click.option("--crop", type=int, default=0, show_default=True, help="Images: square crop size (0: none).")
@click.option("--crop-mode", type=click.Choice(["center", "random"]), default="center", show_default=True,
              help="Images: where to crop (random is seeded).")
@click.option("--mean", default="", help="Images: per-channel means, comma-separated, of pixels in [0, 1].")
@click.option("--std", default="", help="Images: per-channel standard deviations, comma-separated.")
@click.option("--channel-order", type=click.Choice(["RGB", "BGR", "L"]), default="RGB", show_default=True,
              help="Images: channel order (L: grayscale).")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True,
              help="Images: tensor layout of the model's input.")
@click.option("--target-T", "target_T", type=int, default=None,
              help="Choose the recipe (method, granularity, neuron, burst, resolution, clip cap) for this many timesteps: "
                   "candidates are calibrated on part of --calib and scored on the rest. 0: no search. Default: "
                   f"T = {DEFAULT_TARGET_T} on networks {DEEP_CHAIN} or more neuron layers deep when no recipe option "
                   "(--method, --granularity, --neuron, --burst, --resolution, --keep/--drop-clip-cap) is given, else no search.")
@click.option("--search-budget", type=float, default=CompileConfig.search_budget, show_default=True,
              help="Seconds the recipe search may spend; the first candidate always runs.")
@click.option("--min-agreement", type=float, default=CompileConfig.min_agreement, show_default=True,
              help="With a recipe search: stop with an error, writing nothing, when the best recipe agrees with the ANN on "
                   "fewer held-out samples than this fraction (0: write the best whatever it scores).")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write a JSON report: versions, input hash, options, partition, thresholds, calibration, timings, "
                   "and the recipe search.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.option("--ray", "ray", is_flag=False, flag_value="local", default=CompileConfig.ray, metavar="[ADDRESS]",
              help="Calibrate on Ray workers (pip install 'ann2snn[ray]'), each batch split over them: --ray alone "
                   "starts a cluster on this machine, --ray ADDRESS joins one (e.g. auto). The thresholds are those of "
                   "one process with the same --batch (to float rounding); --calib must be a file or image folder "
                   "readable on every node. --threads sets each worker's threads (default 1).")
@click.pass_context
@handle_errors
def compile_cmd(ctx: click.Context, model: str, output: str, calib: str, dump_dir: str | None, report: str | None,
                **options: Any) -> None:
    """Compile MODEL (an ONNX ANN) into a spiking ONNX model."""
    from ..api import compile as compile_model

    options["progress"] = options["progress"] and not ctx.obj["quiet"]
    for name in RECIPE_FIELDS:  # only recipe options given (flag or --config) turn the default search off
        if ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT:
            del options[name]
    options["spiking_until"] = tuple(options["spiking_until"])
    snn = compile_model(model, calib, output, dump_dir=dump_dir, report=report, **options)
    meta = {p.key: p.value for p in snn.metadata_props}
    info = json.loads(meta["ann2snn"])
    if not ctx.obj["quiet"] and "ann2snn.search" in meta:
        from ..search import format_search

        record = json.loads(meta["ann2snn.search"])
        if "default" in record:
            click.echo(f"{record['default']['reason']}: the recipe was chosen by a search at T = {record['target_T']} "
                       f"({record['default']['skip']})")
        click.echo(format_search(record))
    if not ctx.obj["quiet"]:
        click.echo(f"wrote {output}: {len(info['neurons'])} neuron layer(s), "
                   f"{sum(n['units'] for n in info['neurons'])} neurons, readout t0 = {info['readout']['t0']}")


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--maxpool", type=click.Choice(MAXPOOL_MODES), default=CompileConfig.maxpool, show_default=True,
              help="As for compile.")
@click.option("--spiking-until", multiple=True, metavar="TENSOR", help="As for compile.")
@click.option("--nonlinear", type=click.Choice(NONLINEAR_MODES), default=CompileConfig.nonlinear, show_default=True,
              help="As for compile (compensated ops are shown as such).")
@click.option("--keep-clip-cap/--drop-clip-cap", default=CompileConfig.keep_clip_cap, show_default=True,
              help="As for compile (shown in the ReLU6 / Clip rows).")
@click.option("--signed-sites", type=click.Choice(SIGNED_SITE_FORMS), default=CompileConfig.signed_sites,
              show_default=True, help="As for compile (signed activation sites are shown as neurons).")
@click.option("--respike/--no-respike", default=CompileConfig.respike, show_default=True, help="As for compile.")
@click.option("--respike-currents/--no-respike-currents", default=CompileConfig.respike_currents, show_default=True,
              help="As for compile.")
@click.option("--input-shape", "input_shape", multiple=True, metavar="NAME=D0xD1x...",
              help="Size of an input whose dimensions are symbolic (e.g. images=1x3x640x640), so that MACs can be "
                   "counted; repeat per input.")
@click.option("--compiled", type=click.Path(dir_okay=False), default=None,
              help="Take symbolic input sizes from the model compiled from MODEL (the calibration data's sizes).")
@click.pass_context
@handle_errors
def inspect_cmd(ctx: click.Context, model: str, as_json: bool, maxpool: str, spiking_until: tuple[str, ...],
                nonlinear: str, keep_clip_cap: bool, signed_sites: str, respike: bool, respike_currents: bool,
                input_shape: tuple[str, ...],
                compiled: str | None) -> None:
    """Show, per node of MODEL, whether it spikes, becomes a neuron, is folded, or runs in the analog tail."""
    from ..analysis.inspection import format_inspection, inspect_model

    shapes: dict[str, list[int]] = {}
    for item in input_shape:
        name, _, dims = item.rpartition("=")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            name = ""
        if not name or any(d <= 0 for d in shapes.get(name, [0])):
            raise ConfigError(f"--input-shape takes NAME=D0xD1x... with positive sizes, batch first "
                              f"(e.g. images=1x3x640x640), got '{item}'")
    info = inspect_model(model, CompileConfig(maxpool=maxpool, spiking_until=tuple(spiking_until),
                                              keep_clip_cap=keep_clip_cap, nonlinear=nonlinear,
                                              signed_sites=signed_sites, respike=respike,
                                              respike_currents=respike_currents), input_shapes=shapes or None,
                         compiled=compiled)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


@click.command("run")
@config_option
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="Inputs: .npz keyed by input name, .npy, or images (folder or list file), preprocessed as "
                   "recorded at compile time.")
@click.option("--batch-size", type=int, default=None,
              help="Inputs simulated at once [default: chosen from the model's size, see README 'Speed and memory'].")
@click.option("-T", "T", required=True, type=int, help="Number of timesteps.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the outputs (.npz; the entry 'ann2snn_run' holds how they were made, as JSON).")
@click.option("--t0", type=int, default=None, help="Readout delay (default: the model's).")
@FORM_OPTION
@ALLOW_NONFINITE_OPTION
@click.option("--threads", type=int, default=0, show_default=True, help="onnxruntime threads (0: its default).")
@click.option("--max-memory", type=float, default=None, help="Refuse simulations estimated above this many GiB "
              "(default: 75% of physical memory).")
@KERNELS_OPTION
@DEVICE_OPTION
@CUDA_GRAPH_OPTION
@RAY_OPTION
@click.pass_context
@handle_errors
def run_cmd(ctx: click.Context, model: str, input_path: str, batch_size: int | None, T: int, output: str, t0: int | None,
            form: str, allow_nonfinite: bool, threads: int, max_memory: float | None, kernels: bool | None,
            device: str, cuda_graph: bool, ray_address: str | None) -> None:
    """Run a compiled spiking MODEL for T timesteps and save the readout.

    The same command writes the same bytes every time."""
    import numpy as np

    from ann2snn.runtime.batches import run_file

    from ..data.npyfile import NpzWriter
    from ..resources import GIB

    show = not ctx.obj["quiet"]
    check_ray_device(ray_address, device)
    with NpzWriter(output) as out:  # outputs written batch by batch; the file appears only when complete
        if ray_address is not None:
            from ..distributed import run_file_ray

            run = run_file_ray(model, input_path, T, address=ray_address, t0=t0, batch_size=batch_size, form=form,
                               allow_nonfinite=allow_nonfinite, threads=threads or None, show_progress=show,
                               sink=out.append, kernels=kernels)
        else:
            run = run_file(model, input_path, T, t0=t0, batch_size=batch_size, form=form,
                           allow_nonfinite=allow_nonfinite, threads=threads or None,
                           max_memory=int(max_memory * GIB) if max_memory is not None else None, show_progress=show,
                           sink=out.append, kernels=kernels, device=device, cuda_graph=cuda_graph)
        for k, v in run.extra.items():
            out.put(k, v)
        out.put("ann2snn_run", np.array(json.dumps(run.info, sort_keys=True)))
    if show:
        click.echo(f"wrote {output}: {', '.join(f'{k} {v}' for k, v in run.shapes.items())} "
                   f"(form: {', '.join(run.info['forms'])})")


@click.command("eval", epilog="""\b
Data for --task segmentation: .npz with the model inputs keyed by input name and
  'mask' int [N,H,W] (class ids; 255 = ignore). The model outputs scores [N,C,H,W]
  (argmax over C, channel c = class c) or labels [N,H,W]. Reports mIoU (confusion
  matrix over the whole set; classes absent from ground truth and prediction are
  skipped), pixel accuracy, per-class IoU in --json.
\b
Data for --task detection: .npz with the model inputs, 'boxes' float [M,4]
  (x1,y1,x2,y2 pixels), 'box_labels' int [M], 'box_image' int [M] (index of the
  image in the file). The model outputs one tensor [K,7] of rows
  [image_index, class_id, score, x1, y1, x2, y2], image_index relative to the batch
  fed. Reports COCO-style AP (101-point interpolation, greedy matching by descending
  score, at most 100 detections per image, no crowd or area ranges): mAP@0.5 and
  mAP@[.5:.95], averaged over the classes that have ground truth.""")
@config_option
@click.argument("ann", type=click.Path(dir_okay=False))
@click.argument("snn", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(),
              help="Test data: .npz keyed by input name with labels under --label-key (classification), 'mask' "
                   "(segmentation) or 'boxes'/'box_labels'/'box_image' (detection); or images (classification: "
                   "class subfolders give labels) preprocessed as recorded at compile time.")
@click.option("--task", type=click.Choice(TASKS), default="classification", show_default=True,
              help="What the outputs are scored as: top-1 accuracy, mIoU, or mAP.")
@click.option("-T", "Ts", default="8,16,32,64,128", show_default=True, help="Comma-separated timesteps.")
@click.option("--label-key", default="label", show_default=True, help="Key of the labels in the .npz (classification).")
@click.option("--batch-size", type=int, default=None, help="Samples simulated at once [default: chosen from the model's size for "
              "classification, 16 for segmentation and detection].")
@click.option("--t0", type=int, default=None, help="Readout delay in steps (default: the model's).")
@click.option("--t0-frac", type=float, default=None,
              help="Readout delay as a fraction of T: t0 = floor(F*T) for each T, e.g. 0.5 for the last half "
                   "(segmentation and detection; costs one simulation per T).")
@click.option("--output", "output_name", default=None,
              help="Model output to score (segmentation, detection; default: the first).")
@click.option("--num-classes", type=int, default=None,
              help="Segmentation classes (default: the score channels, or the largest id seen + 1).")
@click.option("--ignore-index", type=int, default=255, show_default=True, help="Mask value of unscored pixels.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON.")
@FORM_OPTION
@ALLOW_NONFINITE_OPTION
@click.option("--threads", type=int, default=0, show_default=True, help="onnxruntime threads (0: its default).")
@click.option("--max-memory", type=float, default=None, help="Refuse simulations estimated above this many GiB "
              "(default: 75% of physical memory).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@KERNELS_OPTION
@DEVICE_OPTION
@CUDA_GRAPH_OPTION
@RAY_OPTION
@click.pass_context
@handle_errors
def eval_cmd(ctx: click.Context, ann: str, snn: str, data: str, task: str, Ts: str, label_key: str,
             batch_size: int | None, t0: int | None, t0_frac: float | None, output_name: str | None,
             num_classes: int | None, ignore_index: int, json_path: str | None, form: str, allow_nonfinite: bool,
             threads: int, max_memory: float | None, progress: bool, kernels: bool | None, device: str,
             cuda_graph: bool, ray_address: str | None) -> None:
    """Print ANN vs SNN accuracy (or mIoU, or mAP) of a compiled SNN at several T.

    With --device cuda the ANN runs on the same GPU."""
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.batches import default_batch_size

    from ..analysis.evaluate import evaluate, format_table
    from ..modelio import write_atomic
    from ..resources import GIB
    from ..analysis.tasks import Readout, evaluate_task, format_task_table

    limit = int(max_memory * GIB) if max_memory is not None else None
    show = progress and not ctx.obj["quiet"]
    if task == "classification" and t0_frac is not None:
        raise ConfigError("--t0-frac is for --task segmentation|detection; use --t0 for classification")
    check_ray_device(ray_address, device)
    if ray_address is not None:
        from ..distributed import evaluate_ray, evaluate_task_ray

        if task == "classification":
            if allow_nonfinite:
                raise ConfigError("classification eval --ray stops at a non-finite output; drop --allow-nonfinite, "
                                  "or drop --ray to evaluate with it in one process")
            result = evaluate_ray(ann, snn, data, parse_ts(Ts), address=ray_address, label_key=label_key,
                                  batch_size=batch_size, t0=t0, form=form, threads=threads or None,
                                  show_progress=show, kernels=kernels)
            table = format_table(result)
        else:
            result = evaluate_task_ray(ann, snn, data, parse_ts(Ts), task, address=ray_address,
                                       readouts=[Readout(t0, t0_frac)], batch_size=batch_size or 16,
                                       output=output_name, num_classes=num_classes, ignore_index=ignore_index,
                                       form=form, allow_nonfinite=allow_nonfinite, threads=threads or None,
                                       show_progress=show, kernels=kernels)
            table = format_task_table(result)
        result["form"] = {"option": form}
    else:
        session = SpikingSession(snn, threads=threads or None, mode=form, allow_nonfinite=allow_nonfinite,
                                 kernels=kernels, device=device, cuda_graph=cuda_graph)
        if task == "classification":
            result = evaluate(ann, session, data, parse_ts(Ts), label_key=label_key, threads=threads or None,
                              batch_size=batch_size or default_batch_size(session), t0=t0, max_memory=limit,
                              show_progress=show)
            table = format_table(result)
        else:
            result = evaluate_task(ann, session, data, parse_ts(Ts), task, readouts=[Readout(t0, t0_frac)],
                                   batch_size=batch_size or 16, output=output_name, num_classes=num_classes,
                                   ignore_index=ignore_index, threads=threads or None, max_memory=limit,
                                   show_progress=show)
            table = format_task_table(result)
        result["form"] = {"option": form, "last_used": session.last_form}
    click.echo(table)
    if json_path:
        write_atomic(json_path, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
