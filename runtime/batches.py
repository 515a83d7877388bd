"""A whole data file through a compiled model, batch by batch: what ``ann2snn run`` does.

The inputs are arrays (``.npz`` keyed by input name, or ``.npy``) or images (a folder of
class subfolders or a list file), preprocessed as recorded in the compiled model and
decoded batch by batch, never all at once.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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

    outputs: dict[str, np.ndarray]  # by output name, samples in file order ({} when streamed to a sink)
    extra: dict[str, np.ndarray]  # image inputs: 'files', the image paths in that order
    info: dict[str, Any]  # model, T, t0, form_option, forms (the forms used), batch_size, samples
    shapes: dict[str, tuple[int, ...]]  # by output name, the shape of all samples' outputs together


class InputSource:
    """The inputs of ``run``: an array file (read a batch at a time) or images (decoded a batch at a
    time with the preprocessing recorded in the compiled model). ``n`` samples; ``extra`` holds
    what ``run`` writes beside the outputs (image inputs: 'files', their paths in order).
    ``check``: check the arrays' names, dtypes, shapes and values first (a Ray worker reading a
    shard the driver has checked skips it)."""

    def __init__(self, session: SpikingSession, inputs: str | os.PathLike[str], check: bool = True) -> None:
        self._specs = session.input_specs
        self._images: ImageSource | None = None
        self.extra: dict[str, np.ndarray] = {}
        if is_image_source(inputs):
            self._images = ImageSource(inputs, preprocess_from_config(session.meta.get("config", {})))
            self.n = len(self._images)
            self.extra["files"] = np.array([str(f) for f in self._images.files])
        else:
            self._arrays = as_array_dict(inputs, self._specs, "input", lazy=True)
            if check:
                check_arrays(self._arrays, self._specs, "input")
            self.n = len(self._arrays[self._specs[0].name])

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """The batches of samples [start, stop), ``batch_size`` at a time."""
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            if self._images is not None:
                yield {self._specs[0].name: self._images.load(list(range(i, j)))}
            else:
                yield {s.name: np.asarray(self._arrays[s.name][i:j]) for s in self._specs}


def run_file(model: str | os.PathLike[str], inputs: str | os.PathLike[str], T: int, *, t0: int | None = None,
             batch_size: int | None = None, form: str = "auto", allow_nonfinite: bool = False,
             threads: int | None = None, max_memory: int | None = None, show_progress: bool = False,
             sink: Callable[[str, np.ndarray], None] | None = None, kernels: bool | None = None,
             device: str = "cpu", cuda_graph: bool = False) -> FileRun:
    """Run the compiled ``model`` for ``T`` steps on every sample of ``inputs``, ``batch_size``
    at a time (default: :func:`default_batch_size`), with the execution form ``form`` (see
    :class:`SpikingSession`). ``max_memory``: the bytes a batch may need (default: 75% of
    physical memory). Array files are read a batch at a time; with ``sink`` each batch's
    outputs are handed to ``sink(name, rows)`` instead of being kept, so memory does not grow
    with the number of samples. ``kernels``, ``device``, ``cuda_graph``: as for :class:`SpikingSession`."""
    check_T(T)
    session = SpikingSession(model, threads=threads, mode=form, allow_nonfinite=allow_nonfinite, kernels=kernels,
                             device=device, cuda_graph=cuda_graph)
    if batch_size is None:
        batch_size = default_batch_size(session)
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    parts: dict[str, list[np.ndarray]] = {}
    rows: dict[str, tuple[int, tuple[int, ...]]] = {}
    forms: list[str] = []
    source = InputSource(session, inputs)
    n = source.n
    check_memory(session.model, min(batch_size, n), max_memory)
    for feeds in progress(source.batches(0, n, batch_size), -(-n // batch_size), "simulating", show_progress):
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
    return FileRun(out, source.extra, info, {k: (c, *tail) for k, (c, tail) in rows.items()})


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
