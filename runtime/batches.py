"""A whole data file through a compiled model, batch by batch: what ``ann2snn run`` does.

The inputs are arrays (``.npz`` keyed by input name, or ``.npy``) or images (a folder of
class subfolders or a list file), preprocessed as recorded in the compiled model and
decoded batch by batch, never all at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Callable
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

    outputs: dict[str, np.ndarray]  # by output name, samples in file order ({} when streamed to a sink)
    extra: dict[str, np.ndarray]  # image inputs: 'files', the image paths in that order
    info: dict[str, Any]  # model, T, t0, form_option, forms (the forms used), batch_size, samples
    shapes: dict[str, tuple[int, ...]]  # by output name, the shape of all samples' outputs together


def run_file(model: str | os.PathLike[str], inputs: str | os.PathLike[str], T: int, *, t0: int | None = None,
             batch_size: int | None = None, form: str = "auto", allow_nonfinite: bool = False,
             threads: int | None = None, max_memory: int | None = None, show_progress: bool = False,
             sink: Callable[[str, np.ndarray], None] | None = None, kernels: bool | None = None) -> FileRun:
    """Run the compiled ``model`` for ``T`` steps on every sample of ``inputs``, ``batch_size``
    at a time (default: :func:`default_batch_size`), with the execution form ``form`` (see
    :class:`SpikingSession`). ``max_memory``: the bytes a batch may need (default: 75% of
    physical memory). Array files are read a batch at a time; with ``sink`` each batch's
    outputs are handed to ``sink(name, rows)`` instead of being kept, so memory does not grow
    with the number of samples. ``kernels``: as for :class:`SpikingSession`."""
    check_T(T)
    session = SpikingSession(model, threads=threads, mode=form, allow_nonfinite=allow_nonfinite, kernels=kernels)
    if batch_size is None:
        batch_size = default_batch_size(session)
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    parts: dict[str, list[np.ndarray]] = {}
    rows: dict[str, tuple[int, tuple[int, ...]]] = {}
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
        arrays = as_array_dict(inputs, session.input_specs, "input", lazy=True)  # read a batch at a time
        check_arrays(arrays, session.input_specs, "input")
        n = len(arrays[session.input_specs[0].name])
        check_memory(session.model, min(batch_size, n), max_memory)
        batches = ({s.name: arrays[s.name][i:i + batch_size] for s in session.input_specs}
                   for i in range(0, n, batch_size))
    for feeds in progress(batches, -(-n // batch_size), "simulating", show_progress):
        for k, v in session.run(feeds, T, t0).items():
            v = np.asarray(v)
            count, _ = rows.get(k, (0, ()))
            rows[k] = (count + (v.shape[0] if v.ndim else 1), v.shape[1:])
            if sink is not None:
                sink(k, v)
            else:
                parts.setdefault(k, []).append(v)
        if session.last_form not in forms:
            forms.append(session.last_form)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    info = {"model": str(model), "T": T, "t0": session.t0 if t0 is None else t0, "form_option": form,
            "forms": forms, "batch_size": batch_size, "samples": n}
    return FileRun(out, extra, info, {k: (c, *tail) for k, (c, tail) in rows.items()})


#: the working set a default batch aims at: one step's tensors and the membrane states of the
#: whole batch (the L3 cache of the machine the rule was measured on; a constant, not read from
#: the machine, so the same command picks the same batch everywhere)
BATCH_WORKING_SET = 32 << 20
#: the default batch lies between these (powers of two)
BATCH_RANGE = (16, 256)


def default_batch_size(session: SpikingSession) -> int:
    """The batch ``run``, ``eval`` and ``report`` use when none is given: the largest power of two
    in :data:`BATCH_RANGE` whose per-step tensors and states fit :data:`BATCH_WORKING_SET`;
    a model compiled for a fixed batch gets that batch.

    Measured (benchmarks/results/cli_profile.md, "Default batch"): a batch whose step spills
    out of the cache runs each image slower (batch 256 took 1.14-1.33x the best batch's time
    per image on the three larger reference models); the rule's batch was within 1.16x of the
    best on all four."""
    from ann2snn.resources import estimate_simulation_bytes

    fixed = {s.shape[0] for s in session.input_specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    if fixed:  # compiled for a fixed batch (an old export whose batch could not be made dynamic)
        return min(fixed)
    est = estimate_simulation_bytes(session.model, 1)
    per_sample = max(1, est["states"] + est["activations"])
    low, high = BATCH_RANGE
    batch = low
    while batch * 2 <= high and batch * 2 * per_sample <= BATCH_WORKING_SET:
        batch *= 2
    return batch
