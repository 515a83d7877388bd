"""The Python API: ``ann2snn.compile``."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from .config import CompileConfig
from .data import DataLike
from .modelio import load_model, save_model
from .pipeline import run_pipeline


def compile(  # noqa: A001 - the public name the issue asks for
    model: str | os.PathLike[str] | onnx.ModelProto | bytes,
    calib: DataLike,
    output: str | os.PathLike[str] | None = None,
    *,
    config: CompileConfig | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> onnx.ModelProto:
    """Convert an ONNX ReLU network into a spiking step model.

    ``calib`` is a .npz/.npy path, an array (single-input models), a mapping of input name
    to array, or an iterable of such batches. ``options`` are CompileConfig fields
    (method, iters, batch, granularity, ...). With ``output`` the model is also written,
    atomically.
    """
    cfg = CompileConfig.from_options(**{**(asdict(config) if config is not None else {}), **options})
    snn = run_pipeline(load_model(model), cfg, calib, dump_dir=dump_dir)
    onnx.checker.check_model(snn, full_check=True)
    if output is not None:
        save_model(snn, Path(output))
    return snn
