"""Data-parallel ``run``, ``eval`` and ``report`` on a Ray cluster (``pip install 'ann2snn[ray]'``).

The data are cut into shards of whole batches (the batches one process would run). Each Ray
task opens the data file or image folder itself and reads only its shard's samples, so the
data travel by reference, never through the driver: on a multi-machine cluster the path must
be readable on every node. Each worker process keeps one session per model and options and
reuses it for its next shards.

Results merge exactly as one process would compute them:

- ``run``: the shards' outputs are written in sample order; every batch is the batch one
  process would run, so the outputs are the same bytes (the runtime's forms agree bit for bit,
  and the auto form is a rule of the batch, not a timing);
- ``eval`` (classification): each batch returns the sums of ``analysis.evaluate.batch_sums``;
  the driver adds them in batch order (``merge_sums``), the same float64 additions in the
  same order as in one process;
- ``eval --task segmentation``: each shard returns its confusion matrices (integer pixel counts,
  exact in any order) and agreement counts, the driver adds them;
- ``eval --task detection``: each shard returns its detections (image indices made global), the
  driver concatenates them in shard order, which is one process's list, and computes AP once;
- ``report``: spike counts are sums of integers (exact in any order), its accuracies merge as
  ``eval``'s.

``compile --ray`` (threshold calibration) is in :mod:`ann2snn.distributed_calibration`.

A worker process that dies (killed, out of memory, its node lost) makes Ray run its shard
again (``max_retries``); the driver takes each shard's result exactly once, so nothing is
lost or counted twice. Errors raised by ann2snn in a task (bad data, a non-finite output)
are not retried: they reach the driver as the same error.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import Ann2SnnError, ConfigError

#: how many times Ray runs a shard again after its worker process died
MAX_RETRIES = 3
#: shards per worker: more than one, so that a slow or restarted shard does not hold up the end
SHARDS_PER_WORKER = 4
#: testing only: a file path; the first task to see it absent creates it and kills its own
#: worker process (the retry test in tests/test_distributed.py)
KILL_ONCE_ENV = "ANN2SNN_TEST_KILL_WORKER_ONCE"


def connect(address: str | None) -> Any:
    """The ``ray`` module, connected: to ``address`` (``auto``, ``ray://host:port``, ...) or, for
    ``local`` / None, to a cluster started on this machine with one worker per core."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'ann2snn[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        if address in (None, "", "local"):
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


def shards(n: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of whole batches covering ``n`` samples, about ``SHARDS_PER_WORKER``
    per worker."""
    batches = math.ceil(n / batch_size)
    per = max(1, math.ceil(batches / max(1, workers * SHARDS_PER_WORKER)))
    return [(i * batch_size, min(n, (i + per) * batch_size)) for i in range(0, batches, per)]


def _workers(ray: Any, threads: int) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, threads))


def open_labelled(data: str, specs: Sequence[Any], label_key: str, what: str) -> tuple[int, np.ndarray | None]:
    """The sample count and the labels (or None) of an array data file, checked on the driver."""
    from .data.arrays import as_array_dict, check_arrays
    from .errors import DataError

    arrays = as_array_dict(data, specs, what, lazy=True)
    check_arrays(arrays, specs, what)
    n = len(arrays[specs[0].name])
    labels = np.asarray(arrays[label_key]).reshape(-1) if label_key in arrays else None
    if labels is not None and labels.shape[0] != n:
        raise DataError(f"{what} has {labels.shape[0]} labels under '{label_key}' for {n} samples")
    return n, labels


def submit(ray: Any, fn: Callable[..., Any], n: int, batch_size: int, threads: int,
           args: Callable[[int, int], tuple[Any, ...]]) -> tuple[list[Any], list[int]]:
    """One Ray task ``fn(*args(start, stop))`` per shard: the futures and the shards' sizes."""
    task = ray.remote(num_cpus=threads, max_retries=MAX_RETRIES)(fn)
    ranges = shards(n, batch_size, _workers(ray, threads))
    return [task.remote(*args(a, b)) for a, b in ranges], [b - a for a, b in ranges]


_SESSIONS: dict[tuple[Any, ...], Any] = {}


def _session(model: str, threads: int, form: str, allow_nonfinite: bool, kernels: bool | None = None) -> Any:
    """This worker's session for these options (reused across its tasks)."""
    from ann2snn.runtime import SpikingSession

    key = (model, os.path.getmtime(model), threads, form, allow_nonfinite, kernels)
    if key not in _SESSIONS:
        _SESSIONS[key] = SpikingSession(model, threads=threads, mode=form, allow_nonfinite=allow_nonfinite,
                                        kernels=kernels)
    return _SESSIONS[key]


def _ann_session(ann: str, threads: int) -> Any:
    """This worker's onnxruntime session of the ANN (reused across its tasks)."""
    from .modelio import load_model
    from .ortsession import make_session

    key = ("ann", ann, os.path.getmtime(ann), threads)
    if key not in _SESSIONS:
        _SESSIONS[key] = make_session(load_model(ann), threads)
    return _SESSIONS[key]


def _maybe_die() -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if marker and not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        os._exit(1)


def _batches(session: Any, data: str, start: int, stop: int, batch_size: int) -> Any:
    """The batches of samples [start, stop) of a data file or image folder, read by this task
    (the driver has checked the data)."""
    from ann2snn.runtime.batches import InputSource

    return InputSource(session, data, check=False).batches(start, stop, batch_size)


def _run_shard(model: str, data: str, start: int, stop: int, batch_size: int, T: int, t0: int | None,
               form: str, allow_nonfinite: bool, threads: int,
               kernels: bool | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """One shard of ``run``: its outputs (samples in order) and the forms used."""
    _maybe_die()
    session = _session(model, threads, form, allow_nonfinite, kernels)
    parts: dict[str, list[np.ndarray]] = {}
    forms: list[str] = []
    for feeds in _batches(session, data, start, stop, batch_size):
        for k, v in session.run(feeds, T, t0).items():
            parts.setdefault(k, []).append(np.asarray(v))
        if session.last_form not in forms:
            forms.append(session.last_form)
    return {k: np.concatenate(v) for k, v in parts.items()}, forms


def _eval_shard(ann: str, model: str, data: str, labels: np.ndarray | None, start: int, stop: int,
                batch_size: int, Ts: Sequence[int], t0: int | None, form: str, threads: int,
                kernels: bool | None = None) -> list[dict[str, Any]]:
    """One shard of classification ``eval``: the per-batch sums, in batch order."""
    from .analysis.evaluate import batch_sums

    _maybe_die()
    session = _session(model, threads, form, False, kernels)
    ann_sess = _ann_session(ann, threads)
    out = []
    pos = start
    for feeds in _batches(session, data, start, stop, batch_size):
        out.append(batch_sums(ann_sess, session, feeds, labels, pos, Ts, t0))
        pos += out[-1]["samples"]
    return out


def _gather(ray: Any, futures: list[Any], sizes: list[int], label: str, show_progress: bool,
            on_result: Callable[[int, Any], None]) -> None:
    """Wait for every shard, calling ``on_result(i, result)`` in shard order, with one progress
    bar (samples done, over all workers) on stderr."""
    import click

    index = {f: i for i, f in enumerate(futures)}
    done: dict[int, Any] = {}
    next_i = 0
    pending = list(futures)
    bar = click.progressbar(length=sum(sizes), label=label, file=sys.stderr, show_pos=True) if show_progress else None
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for f in ready:
                try:
                    done[index[f]] = ray.get(f)
                except Exception as exc:  # an ann2snn error inside a task: re-raise it as itself
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, Ann2SnnError):
                        raise cause from None
                    raise
                if bar is not None:
                    bar.update(sizes[index[f]])
            while next_i in done:  # hand results on in shard order, holding only those that came early
                on_result(next_i, done.pop(next_i))
                next_i += 1
    finally:
        if bar is not None:
            bar.render_finish()


def run_file_ray(model: str, inputs: str, T: int, *, address: str | None, t0: int | None, batch_size: int | None,
                 form: str, allow_nonfinite: bool, threads: int | None, show_progress: bool,
                 sink: Callable[[str, np.ndarray], None], kernels: bool | None = None) -> Any:
    """``runtime.batches.run_file`` with the shards on Ray workers; outputs go to ``sink`` in
    sample order. Returns the same ``FileRun`` (``outputs`` empty)."""
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.batches import FileRun, InputSource, default_batch_size
    from ann2snn.runtime.session import check_T

    check_T(T)
    ray = connect(address)
    session = SpikingSession(model, mode=form, kernels=False)  # the driver checks the model and the data once
    batch_size = batch_size or default_batch_size(session)
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    source = InputSource(session, inputs)  # checked here once; each worker reads its own shard
    n = source.n
    threads = threads or 1
    path, data = os.path.abspath(model), os.path.abspath(inputs)
    futures, sizes = submit(ray, _run_shard, n, batch_size, threads,
                            lambda a, b: (path, data, a, b, batch_size, T, t0, form, allow_nonfinite, threads, kernels))
    forms: list[str] = []
    rows: dict[str, tuple[int, tuple[int, ...]]] = {}

    def take(_: int, result: tuple[dict[str, np.ndarray], list[str]]) -> None:
        outputs, used = result
        for k, v in outputs.items():
            count, _ = rows.get(k, (0, ()))
            rows[k] = (count + v.shape[0], v.shape[1:])
            sink(k, v)
        forms.extend(f for f in used if f not in forms)

    _gather(ray, futures, sizes, "simulating", show_progress, take)
    info = {"model": str(model), "T": T, "t0": session.t0 if t0 is None else t0, "form_option": form,
            "forms": forms, "batch_size": batch_size, "samples": n}
    return FileRun({}, source.extra, info, {k: (c, *tail) for k, (c, tail) in rows.items()})


def evaluate_ray(ann: str, snn: str, data: str, Ts: Sequence[int], *, address: str | None, label_key: str = "label",
                 batch_size: int | None = None, t0: int | None = None, form: str = "auto",
                 threads: int | None = None, show_progress: bool = False,
                 kernels: bool | None = None) -> dict[str, Any]:
    """``analysis.evaluate.evaluate`` (classification) with the shards on Ray workers: the
    same result, float for float."""
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.batches import default_batch_size

    from .analysis.evaluate import merge_sums
    from .data.images import ImageSource, is_image_source, preprocess_from_config
    from .errors import DataError

    ray = connect(address)
    session = SpikingSession(snn, mode=form, kernels=False)
    batch_size = batch_size or default_batch_size(session)
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size} (--batch-size)")
    if is_image_source(data):
        images = ImageSource(data, preprocess_from_config(session.meta.get("config", {})))
        n, labels = len(images), images.labels
    else:
        n, labels = open_labelled(data, session.input_specs, label_key, "evaluation data")
    Ts = sorted({int(T) for T in Ts})
    threads = threads or 1
    labels_ref = ray.put(labels)
    paths = [os.path.abspath(p) for p in (ann, snn, data)]
    futures, sizes = submit(ray, _eval_shard, n, batch_size, threads,
                            lambda a, b: (*paths, labels_ref, a, b, batch_size, Ts, t0, form, threads, kernels))
    sums: list[dict[str, Any]] = []
    _gather(ray, futures, sizes, "simulating", show_progress, lambda _, r: sums.extend(r))
    return merge_sums(sums, Ts, labels is not None, session.t0 if t0 is None else int(t0))



def _task_shard(ann: str, model: str, data: str, task: str, start: int, stop: int, batch_size: int,
                Ts: Sequence[int], readouts: Sequence[Any], out_name: str, num_classes: int | None,
                ignore_index: int | None, form: str, allow_nonfinite: bool, threads: int,
                kernels: bool | None = None) -> Any:
    """One shard of segmentation / detection ``eval``: the scorers of its batches (``tasks.Scored``)."""
    from .analysis.tasks import WindowReader, _ann_runner, _targets, score_batches
    from .data.arrays import as_array_dict
    from .modelio import load_model

    _maybe_die()
    session = _session(model, threads, form, allow_nonfinite, kernels)
    key = ("reader", model, os.path.getmtime(model), ann, os.path.getmtime(ann), threads, form, allow_nonfinite,
           kernels)
    if key not in _SESSIONS:
        _SESSIONS[key] = (_ann_runner(load_model(ann), threads), WindowReader(session, threads))
    run_ann, reader = _SESSIONS[key]
    arrays = as_array_dict(data, session.input_specs, "evaluation data", lazy=True)
    n = int(arrays[session.input_specs[0].name].shape[0])
    targets = _targets(task, arrays, n, ignore_index)
    return score_batches(run_ann, reader, arrays, session.input_specs, targets, task, out_name, Ts, readouts,
                         num_classes, ignore_index, start, stop, batch_size)


def evaluate_task_ray(ann: str, snn: str, data: str, Ts: Sequence[int], task: str, *, address: str | None,
                      readouts: Sequence[Any] = (), batch_size: int = 16, output: str | None = None,
                      num_classes: int | None = None, ignore_index: int | None = 255, max_dets: int | None = 100,
                      form: str = "auto", allow_nonfinite: bool = False, threads: int | None = None,
                      show_progress: bool = False, kernels: bool | None = None) -> dict[str, Any]:
    """``analysis.tasks.evaluate_task`` (segmentation, detection) with the shards on Ray workers:
    the same result, float for float."""
    from ann2snn.runtime import SpikingSession

    from .analysis.tasks import Readout, Scored, open_task, summarise

    ray = connect(address)
    session = SpikingSession(snn, mode=form, kernels=False)  # the driver checks the models and the data once
    _, _, _, _, _, n, targets, out_name = open_task(ann, session, data, task, batch_size=batch_size, output=output,
                                                    ignore_index=ignore_index)
    Ts = sorted({int(T) for T in Ts})
    readouts = list(dict.fromkeys(readouts or [Readout()]))
    threads = threads or 1
    paths = [os.path.abspath(p) for p in (ann, snn, data)]
    futures, sizes = submit(ray, _task_shard, n, batch_size, threads,
                            lambda a, b: (*paths, task, a, b, batch_size, Ts, readouts, out_name, num_classes,
                                          ignore_index, form, allow_nonfinite, threads, kernels))
    scored = Scored(None, {}, {})
    _gather(ray, futures, sizes, "simulating", show_progress, lambda _, r: scored.merge(r))
    return summarise(task, n, out_name, session, scored, targets, Ts, readouts, max_dets)
