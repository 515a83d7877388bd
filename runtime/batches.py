"""A whole data file through a compiled model, batch by batch: what ``ann2snn run`` does.

The inputs are arrays (``.npz`` keyed by input name, or ``.npy``) or images (a folder of
class subfolders or a list file), preprocessed as recorded in the compiled model and
decoded batch by batch, never all at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ann2snn.data.arrays import as_array_dict, check_arrays
from ann2snn.data.images import ImageSource, is_image_source, preprocess_from_config
from ann2snn.errors import ConfigError
from ann2snn.progress import progress
from ann2snn.resources import check_memory

from .session import SpikingSession, check_T


@dataclass
class FileRun:
    """The readouts of every sample of a data file, and how they were made."""

    outputs: dict[str, np.ndarray]  # by output name, samples in file order
    extra: dict[str, np.ndarray]  # image inputs: 'files', the image paths in that order
    info: dict[str, Any]  # model, T, t0, form_option, forms (the forms used), batch_size, samples


def run_file(model: str | os.PathLike[str], inputs: str | os.PathLike[str], T: int, *, t0: int | None = None,
             batch_size: int = 256, form: str = "auto", allow_nonfinite: bool = False, threads: int | None = None,
             max_memory: int | None = None, show_progress: bool = False) -> FileRun:
    """Run the compiled ``model`` for ``T`` steps on every sample of ``inputs``, ``batch_size``
    at a time, with the execution form ``form`` (see :class:`SpikingSession`). ``max_memory``:
    the bytes a batch may need (default: 75% of physical memory)."""
    check_T(T)
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    session = SpikingSession(model, threads=threads, mode=form, allow_nonfinite=allow_nonfinite)
    parts: dict[str, list[np.ndarray]] = {}
    forms: list[str] = []
    extra: dict[str, np.ndarray] = {}
    if is_image_source(inputs):  # decoded and simulated batch by batch
        images = ImageSource(inputs, preprocess_from_config(session.meta.get("config", {})))
        check_memory(session.model, min(batch_size, len(images)), max_memory)
        name = session.input_specs[0].name
        batches = ({name: x} for x, _ in images.chunks(batch_size))
        n = len(images)
        extra["files"] = np.array([str(f) for f in images.files])
    else:
        arrays = as_array_dict(inputs, session.input_specs, "input")
        check_arrays(arrays, session.input_specs, "input")
        n = len(arrays[session.input_specs[0].name])
        check_memory(session.model, min(batch_size, n), max_memory)
        batches = ({k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size))
    for feeds in progress(batches, -(-n // batch_size), "simulating", show_progress):
        for k, v in session.run(feeds, T, t0).items():
            parts.setdefault(k, []).append(np.asarray(v))
        if session.last_form not in forms:
            forms.append(session.last_form)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    info = {"model": str(model), "T": T, "t0": session.t0 if t0 is None else t0, "form_option": form,
            "forms": forms, "batch_size": batch_size, "samples": n}
    return FileRun(out, extra, info)
