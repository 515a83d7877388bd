"""ANN vs SNN accuracy at several T, on labelled (or unlabelled) data."""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx

from ..data.arrays import as_array_dict, check_arrays, input_specs
from ..errors import DataError
from ..modelio import load_model
from ..ortsession import make_session, run_checked
from ..progress import progress
from ..resources import check_memory


def predictions(y: np.ndarray) -> np.ndarray:
    """Predicted classes: the argmax of scores, or the output itself when it is a label vector."""
    y = np.asarray(y)
    return y.reshape(len(y), -1).argmax(axis=1) if np.issubdtype(y.dtype, np.floating) else y.reshape(-1)


def open_pair(ann: str | os.PathLike[str] | onnx.ModelProto, snn: Any,
              threads: int | None = None) -> tuple[Any, onnx.ModelProto, onnx.ModelProto, list]:
    """Load an ANN and its SNN (a path, a ModelProto or a SpikingSession) for evaluation:
    the SNN's session and model, the ANN model and its input specs."""
    from ann2snn.runtime import SpikingSession

    if isinstance(snn, SpikingSession):
        session, snn_proto = snn, snn.model
    else:
        snn_proto = load_model(snn)
        session = SpikingSession(snn_proto, threads=threads)
    ann_model = load_model(ann)
    return session, snn_proto, ann_model, input_specs(ann_model)


def evaluate(
    ann: str | os.PathLike[str] | onnx.ModelProto,
    snn: Any,
    data: Any,
    Ts: Sequence[int],
    *,
    label_key: str = "label",
    batch_size: int | None = None,
    t0: int | None = None,
    show_progress: bool = False,
    max_memory: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Accuracy of the ANN and of the SNN at each T (and their top-1 agreement, output error).

    ``snn`` is a SpikingSession or a path to a compiled model. Without labels under
    ``label_key`` only agreement and error are reported. The simulation's memory estimate
    is checked against ``max_memory`` bytes (default: 75% of physical memory) first. The ANN
    runs on the SNN session's device (its ``providers``).
    ``batch_size``: default :func:`ann2snn.runtime.batches.default_batch_size`.
    """
    from ann2snn.runtime.batches import default_batch_size

    session, snn_proto, ann_model, specs = open_pair(ann, snn, threads)
    batch_size = default_batch_size(session) if batch_size is None else batch_size
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size} (--batch-size)")
    n, labels, chunks = _chunks(data, specs, session, label_key, batch_size)
    check_memory(snn_proto, min(batch_size, n), max_memory)
    ann_sess = make_session(ann_model, providers=getattr(session, "providers", None))  # the SNN's device
    Ts = sorted(set(Ts))
    sums = []  # per batch: memory does not grow with the number of samples
    start = 0
    for feeds in progress(chunks, math.ceil(n / batch_size), "simulating", show_progress):
        sums.append(batch_sums(ann_sess, session, feeds, labels, start, Ts, t0))
        start += sums[-1]["samples"]
    return merge_sums(sums, Ts, labels is not None, session.t0 if t0 is None else int(t0))


def batch_sums(ann_sess: Any, session: Any, feeds: dict[str, np.ndarray], labels: np.ndarray | None, start: int,
               Ts: Sequence[int], t0: int | None) -> dict[str, Any]:
    """The sums ``evaluate`` needs from one batch (its first sample is ``start`` of the data):
    correct and agreeing predictions per T, absolute errors and output magnitudes (float64)."""
    out_name = session.output_names[0]
    ref = run_checked(ann_sess, None, feeds, "evaluation data")[0]
    ref_pred = predictions(ref)
    truth = labels[start:start + len(ref_pred)] if labels is not None else None
    scores = ref.ndim > 1 and np.issubdtype(ref.dtype, np.floating)  # else the output is the label itself
    out: dict[str, Any] = {"samples": len(ref_pred), "scores": bool(scores),
                           "ann_correct": int((ref_pred == truth).sum()) if truth is not None else 0,
                           "ref_abs": float(np.abs(ref).sum(dtype=np.float64)) if scores else 0.0,
                           "values": int(ref.size) if scores else 0, "correct": {}, "agree": {}, "abs_error": {}}
    res = session.run_many(feeds, Ts, t0)
    for T in Ts:
        y = res[T][out_name]
        pred = predictions(y)
        out["agree"][T] = int((pred == ref_pred).sum())
        out["correct"][T] = int((pred == truth).sum()) if truth is not None else 0
        out["abs_error"][T] = float(np.abs(y - ref).sum(dtype=np.float64)) if scores else 0.0
    return out


def merge_sums(sums: Sequence[dict[str, Any]], Ts: Sequence[int], labelled: bool, t0: int) -> dict[str, Any]:
    """The ``evaluate`` result from the per-batch sums, added in batch order: the same floats
    whether the batches ran in one process or on several workers."""
    n = sum(b["samples"] for b in sums)
    scores = bool(sums) and sums[-1]["scores"]
    values = sum(b["values"] for b in sums)
    ref_abs = 0.0
    for b in sums:
        ref_abs += b["ref_abs"]
    scale = (ref_abs / values or 1.0) if scores and values else 1.0
    rows = []
    for T in Ts:
        abs_error = 0.0
        for b in sums:
            abs_error += b["abs_error"][T]
        mean_abs = abs_error / values if scores and values else None
        rows.append({
            "T": T,
            "accuracy": sum(b["correct"][T] for b in sums) / n if labelled else None,
            "agreement": sum(b["agree"][T] for b in sums) / n,
            "mean_abs_error": mean_abs,
            "relative_error": mean_abs / scale if mean_abs is not None else None,
        })
    return {
        "samples": int(n),
        "ann_accuracy": sum(b["ann_correct"] for b in sums) / n if labelled else None,
        "t0": t0,
        "snn": rows,
    }


def _chunks(data: Any, specs: list, session: Any, label_key: str,
            batch_size: int) -> tuple[int, np.ndarray | None, Iterator[dict[str, np.ndarray]]]:
    """(sample count, labels, batches of inputs): arrays are sliced; image folders are decoded
    batch by batch with the preprocessing recorded in the compiled model."""
    from ..data.images import ImageSource, is_image_source, preprocess_from_config

    if isinstance(data, (str, os.PathLike)) and is_image_source(data):
        images = ImageSource(data, preprocess_from_config(session.meta.get("config", {})))
        if len(specs) != 1:
            raise DataError("image data feed single-input models; use a .npz keyed by input name")
        first = {specs[0].name: images.load([0])}
        check_arrays(first, specs, f"image data '{data}'")
        return len(images), images.labels, ({specs[0].name: x} for x, _ in images.chunks(batch_size))
    arrays = as_array_dict(data, specs, "evaluation data", lazy=True)  # files are read a batch at a time
    check_arrays(arrays, specs, "evaluation data")
    n = next(iter(arrays[s.name] for s in specs)).shape[0]
    labels = arrays.get(label_key)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != n:
            raise DataError(f"evaluation data has {labels.shape[0]} labels under '{label_key}' for {n} samples")
    return n, labels, ({s.name: arrays[s.name][i:i + batch_size] for s in specs} for i in range(0, n, batch_size))


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of an ``evaluate`` result."""
    acc = result["ann_accuracy"]
    lines = [f"samples: {result['samples']}, readout t0: {result['t0']}",
             f"ANN accuracy: {acc * 100:.2f}%" if acc is not None else "ANN accuracy: (no labels)",
             "", "| T | SNN accuracy | agreement with ANN | relative output error |", "|---|---|---|---|"]
    for r in result["snn"]:
        a = f"{r['accuracy'] * 100:.2f}%" if r["accuracy"] is not None else "-"
        err = f"{r['relative_error']:.4f}" if r["relative_error"] is not None else "-"
        lines.append(f"| {r['T']} | {a} | {r['agreement'] * 100:.2f}% | {err} |")
    return "\n".join(lines)
