"""The Python API: ``ann2snn.compile``."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .config import RECIPE_FIELDS, CompileConfig
from .data.arrays import CalibrationSource, DataLike, input_specs
from .errors import PassError
from .modelio import load_model, save_model, serialize, write_atomic
from .pipeline import run_pipeline

log = logging.getLogger(__name__)

#: metadata key of the recipe search's record (the candidates, their figures, the choice)
SEARCH_KEY = "ann2snn.search"


def compile(  # noqa: A001 - the public name the issue asks for
    model: str | os.PathLike[str] | onnx.ModelProto | bytes,
    calib: DataLike,
    output: str | os.PathLike[str] | None = None,
    *,
    config: CompileConfig | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    **options: Any,
) -> onnx.ModelProto:
    """Convert an ONNX ReLU network into a spiking step model.

    ``calib`` is a .npz/.npy path, an array (single-input models), a mapping of input name
    to array, or an iterable of such batches. ``options`` are CompileConfig fields
    (method, iters, batch, granularity, ...). With ``target_T`` the recipe (method, granularity,
    neuron, burst, clip cap) is chosen from the data within ``search_budget`` seconds
    (ann2snn.search); the model's metadata and the report record the search, and the chosen
    options alone give the same model. Without ``target_T`` the search runs at T = 64 on deep
    networks when no recipe option is given (ann2snn.search.default_target_T); ``target_T=0``
    never searches. With ``output`` the model is also written,
    atomically; with ``report`` a JSON report of the run (versions, hashes, options,
    partition, thresholds, calibration statistics, timings).
    """
    cfg = CompileConfig.from_options(**{**(asdict(config) if config is not None else {}), **options})
    stats: dict[str, Any] = {}
    proto = load_model(model)
    if not isinstance(calib, CalibrationSource) and isinstance(calib, (str, os.PathLike, Mapping, np.ndarray)):
        # check the data against the model's inputs before any work is done
        calib = CalibrationSource(calib, input_specs(proto), cfg.preprocess())
    search: dict[str, Any] | None = None
    default: dict[str, Any] | None = None
    if cfg.target_T is None:  # not given: a search on deep networks, unless a recipe option was given
        from .search import default_target_T

        target, default = default_target_T(proto, cfg, calib, explicit_recipe_options(config, options))
        cfg = replace(cfg, target_T=target)
    if cfg.target_T:
        from .search import budget_note, model_record, search_recipe

        if not isinstance(calib, CalibrationSource):
            calib = CalibrationSource(calib, input_specs(proto), cfg.preprocess())
        cfg, search = search_recipe(proto, cfg, calib)
        if default is not None:
            search["default"] = default
        note = budget_note(search)
        if note:
            log.warning("%s; the best of those tried was chosen (a larger --search-budget tries more)", note)
    snn = run_pipeline(proto, cfg, calib, dump_dir=dump_dir, stats=stats)
    if search is not None:  # the chosen options are in the ann2snn metadata; the search under its own key
        stats["search"] = search
        snn.metadata_props.add(key=SEARCH_KEY, value=json.dumps(model_record(search), sort_keys=True))
    try:  # a last guard: never write a model the ONNX checker rejects
        onnx.checker.check_model(snn, full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PassError(f"the compiled model fails the ONNX checker ({first}); nothing was written. This is a bug in "
                        "ann2snn or an unusual model: please report it with the model") from None
    if output is not None:
        save_model(snn, Path(output))
    if report is not None:
        write_atomic(report, (json.dumps(build_report(model, snn, output, cfg, stats), indent=2, sort_keys=True)
                              + "\n").encode())
    return snn


def explicit_recipe_options(config: CompileConfig | None, options: Mapping[str, Any]) -> list[str]:
    """The recipe options (ann2snn.search.RECIPE_FIELDS) the caller set: given as keyword options, or
    differing from the defaults in ``config``. Any of them turns the default search off."""
    defaults = CompileConfig()
    return [f for f in RECIPE_FIELDS
            if f in options or (config is not None and getattr(config, f) != getattr(defaults, f))]


def build_report(model: Any, snn: onnx.ModelProto, output: Any, cfg: CompileConfig,
                 stats: dict[str, Any]) -> dict[str, Any]:
    """The --report JSON: what was compiled, with what, how, and what came out."""
    import platform

    import numpy
    import onnxruntime

    from .version import __version__

    if isinstance(model, (str, os.PathLike)):
        source = {"path": str(model), "sha256": hashlib.sha256(Path(model).read_bytes()).hexdigest()}
    else:
        proto = model if isinstance(model, onnx.ModelProto) else None
        data = serialize(proto) if proto is not None else bytes(model)
        source = {"path": None, "sha256": hashlib.sha256(data).hexdigest()}
    return {
        "versions": {"ann2snn": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "numpy": numpy.__version__, "python": platform.python_version()},
        "input": source,
        "output": {"path": str(output) if output is not None else None,
                   "sha256": hashlib.sha256(serialize(snn)).hexdigest()},
        "seed": cfg.seed,
        "options": cfg.to_dict(),
        **stats,
    }
