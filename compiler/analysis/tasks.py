"""Dense tasks: segmentation (mIoU) and detection (COCO-style mAP), ANN vs SNN at several T.

Data formats (``.npz``; the model inputs keyed by input name, as for classification):

- segmentation: ``mask`` int [N, H, W], class ids, ``ignore_index`` (255) marks pixels that
  are not scored. The model outputs scores [N, C, H, W] (the prediction is the argmax over C;
  channel c is class c) or labels [N, H, W].
- detection: ``boxes`` float [M, 4] (x1, y1, x2, y2 in pixels), ``box_labels`` int [M],
  ``box_image`` int [M] (index of the image in the file). The model outputs one tensor
  [K, 7] of rows ``[image_index, class_id, score, x1, y1, x2, y2]``, with ``image_index``
  relative to the batch that was fed (NonMaxSuppression's batch index).

The metrics (mIoU, COCO-style AP) are in :mod:`.metrics`.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..config import TASKS  # noqa: F401  (defined there: the CLI offers it without importing this module)
from ..data.arrays import as_array_dict, check_arrays, input_specs
from ..errors import ConfigError, DataError
from ..ortsession import make_session, run_checked
from ..progress import progress
from ..resources import check_memory
from .evaluate import open_pair
from .metrics import ConfusionMatrix, check_detections, detection_ap, segmentation_labels


SEG_FORMAT = ("segmentation data: .npz with the model inputs keyed by input name and 'mask' int [N,H,W] "
              "(class ids, 255 = ignore)")
DET_FORMAT = ("detection data: .npz with the model inputs keyed by input name, 'boxes' float [M,4] "
              "(x1,y1,x2,y2 pixels), 'box_labels' int [M] and 'box_image' int [M] (image index in the file)")


# -- readout windows ---------------------------------------------------------------------
@dataclass(frozen=True)
class Readout:
    """Where the readout window starts: the model's t0 (both None), a fixed ``t0``, or ``floor(frac·T)``."""

    t0: int | None = None
    frac: float | None = None

    def __post_init__(self) -> None:
        if self.t0 is not None and self.frac is not None:
            raise ConfigError("give either --t0 or --t0-frac, not both")
        if self.t0 is not None and self.t0 < 0:
            raise ConfigError(f"t0 must be >= 0, got {self.t0} (--t0)")
        if self.frac is not None and not 0 <= self.frac < 1:
            raise ConfigError(f"--t0-frac must be in [0, 1), got {self.frac}")

    def at(self, T: int, default: int) -> int:
        """The t0 for T timesteps; ``default`` is the model's."""
        if self.frac is not None:
            return math.floor(self.frac * T)
        return default if self.t0 is None else int(self.t0)

    @property
    def label(self) -> str:
        """'model', 't0=5' or 'T*0.5'."""
        if self.frac is not None:
            return f"T*{self.frac:g}"
        return "model" if self.t0 is None else f"t0={self.t0}"


class WindowReader:
    """Reads out a SpikingSession at several T and readout windows from one simulation per batch.

    The readout of T steps with window start s is the tail applied to the mean of the spiking
    part's step outputs over [s, T). One simulation read out from step 0 at every T and every
    window start gives all of them: mean[s, T) = (T·mean[0, T) - s·mean[0, s)) / (T - s),
    computed in float64. Models with an analog tail are simulated through a copy of the model
    without the tail (its outputs are the step outputs), and the tail runs on each window.
    Where that is not possible (non-float step outputs), each distinct t0 is one ``run_many``.
    """

    def __init__(self, session: Any, threads: int | None = None) -> None:
        """Wrap ``session`` (a SpikingSession); ``threads`` for the tail-less copy, if one is needed."""
        from ann2snn.runtime import SpikingSession

        self.session = session
        self._sim: Any = None
        self._finish: Any = None
        floats = all(session.meta["types"].get(o, {}).get("elem_type") == onnx.TensorProto.FLOAT
                     for o in session.step_outputs)
        if not floats:
            return
        if not session.meta.get("tail"):
            self._sim = session
        elif hasattr(session, "finish"):
            proto = onnx.ModelProto()
            proto.CopyFrom(session.model)
            meta = dict(session.meta, tail=None, outputs=list(session.step_outputs))
            for prop in proto.metadata_props:
                if prop.key == "ann2snn":
                    prop.value = json.dumps(meta)
            self._sim = SpikingSession(proto, threads=threads, mode=session.mode, chunk=session.chunk,
                                       unit_thresholds=session.unit_thresholds, bind=session.bind,
                                       guard=session.guard, allow_nonfinite=session.allow_nonfinite,
                                       kernels=session.kernels, providers=session.providers,
                                       resident=session.resident, cuda_graph=session.cuda_graph)
            self._finish = session.finish  # the session's own tail, run once per readout

    def run(self, feeds: dict[str, np.ndarray], Ts: Sequence[int],
            readouts: Sequence[Readout]) -> dict[tuple[str, int], dict[str, np.ndarray]]:
        """The model's outputs for every (readout label, T)."""
        from ann2snn.runtime.reference import window_start

        sess = self.session
        starts = {(r.label, T): window_start(T, r.at(T, sess.t0), sess.min_window) for r in readouts for T in Ts}
        if self._sim is None:
            groups: dict[int, set[int]] = {}
            for r in readouts:
                for T in Ts:
                    groups.setdefault(r.at(T, sess.t0), set()).add(T)
            outs = {t0: sess.run_many(feeds, sorted(group), t0) for t0, group in groups.items()}
            return {(r.label, T): outs[r.at(T, sess.t0)][T] for r in readouts for T in Ts}
        prefix = self._sim.run_many(feeds, sorted(set(Ts) | {s for s in starts.values() if s > 0}), 0)
        names = list(sess.step_outputs) if self._finish is not None else list(prefix[max(Ts)])
        out: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        for key, s in starts.items():
            T = key[1]
            if s == 0:
                values = [prefix[T][k] for k in names]
            else:
                values = [((T * prefix[T][k].astype(np.float64) - s * prefix[s][k].astype(np.float64)) / (T - s))
                          .astype(np.float32) for k in names]
            out[key] = self._finish(values) if self._finish is not None else dict(zip(names, values))
        return out


def run_readouts(session: Any, feeds: dict[str, np.ndarray], Ts: Sequence[int],
                 readouts: Sequence[Readout]) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """SNN outputs for every (readout label, T) of one batch (see ``WindowReader``)."""
    return WindowReader(session).run(feeds, Ts, readouts)


# -- evaluation --------------------------------------------------------------------------
def _targets(task: str, arrays: Mapping[str, np.ndarray], n: int, ignore_index: int | None) -> dict[str, np.ndarray]:
    """The ground truth of a dense task from the data file, checked."""
    if task == "segmentation":
        if "mask" not in arrays:
            raise DataError(f"evaluation data has no 'mask' array (it has {', '.join(repr(k) for k in arrays)}); "
                            f"{SEG_FORMAT}")
        mask = arrays["mask"]  # a file's masks stay in the file: read a batch at a time (FileArray)
        if not hasattr(mask, "ndim"):
            mask = np.asarray(mask)
        if not np.issubdtype(mask.dtype, np.integer) or mask.ndim != 3 or mask.shape[0] != n:
            raise DataError(f"evaluation data 'mask' has shape {list(mask.shape)} ({mask.dtype}) for {n} samples; "
                            f"{SEG_FORMAT}")
        return {"mask": mask}
    missing = [k for k in ("boxes", "box_labels", "box_image") if k not in arrays]
    if missing:
        raise DataError(f"evaluation data has no {', '.join(repr(m) for m in missing)} array(s) (it has "
                        f"{', '.join(repr(k) for k in arrays)}); {DET_FORMAT}")
    boxes = np.asarray(arrays["boxes"])
    labels, image = np.asarray(arrays["box_labels"]), np.asarray(arrays["box_image"])
    m = boxes.shape[0] if boxes.ndim == 2 else -1
    if (boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != (m,) or image.shape != (m,)
            or not np.issubdtype(labels.dtype, np.integer) or not np.issubdtype(image.dtype, np.integer)):
        raise DataError(f"evaluation data has 'boxes' {list(boxes.shape)}, 'box_labels' {list(labels.shape)} "
                        f"({labels.dtype}), 'box_image' {list(image.shape)} ({image.dtype}); {DET_FORMAT}")
    if m and (image.min() < 0 or image.max() >= n):
        raise DataError(f"evaluation data 'box_image' has indices from {image.min()} to {image.max()} but there "
                        f"are {n} images; {DET_FORMAT}")
    return {"boxes": boxes.astype(np.float64), "box_labels": labels.astype(np.int64),
            "box_image": image.astype(np.int64)}


class _Scorer:
    """Accumulates one model's (or one SNN readout's) predictions over the batches."""

    def __init__(self, task: str, num_classes: int | None, ignore_index: int | None) -> None:
        self.task = task
        self.cm = ConfusionMatrix(num_classes, ignore_index)
        self.dets: list[np.ndarray] = []
        self.agree = 0
        self.pixels = 0

    def add(self, y: np.ndarray, name: str, start: int, batch: int, targets: dict[str, np.ndarray],
            ref: np.ndarray | None = None) -> np.ndarray:
        """Score one batch's output ``y`` (``start``: index of its first sample); returns its predictions."""
        if self.task == "segmentation":
            pred = segmentation_labels(y, name)
            mask = targets["mask"][start:start + batch]
            if pred.shape != mask.shape:
                raise DataError(f"model output '{name}' gives labels {list(pred.shape)} but the mask is "
                                f"{list(mask.shape)}; the output must have the mask's resolution (add a Resize "
                                "to the input size at the end of the model)")
            self.cm.update(pred, mask)
            if ref is not None:
                self.agree += int((pred == ref).sum())
                self.pixels += pred.size
            return pred
        d = check_detections(y, name)
        if len(d) and (d[:, 0].min() < 0 or d[:, 0].max() >= batch):
            raise DataError(f"model output '{name}' has image indices up to {int(d[:, 0].max())} for a batch of "
                            f"{batch}; column 0 must be the index of the image in the batch fed")
        d = d.copy()
        d[:, 0] += start
        self.dets.append(d)
        return d

    def merge(self, other: "_Scorer") -> None:
        """Add the batches ``other`` scored after this one's (one process's sums, detections in order)."""
        self.cm.merge(other.cm)
        self.dets.extend(other.dets)
        self.agree += other.agree
        self.pixels += other.pixels

    def result(self, targets: dict[str, np.ndarray], max_dets: int | None) -> dict[str, Any]:
        if self.task == "segmentation":
            out = self.cm.metrics()
            out["agreement"] = self.agree / self.pixels if self.pixels else None
            return out
        dets = np.concatenate(self.dets) if self.dets else np.zeros((0, 7))
        return detection_ap(dets, targets["boxes"], targets["box_labels"], targets["box_image"], max_dets=max_dets)


def _ann_runner(ann_model: onnx.ModelProto, threads: int | None, providers: list | None = None):
    """A function running the ANN (on ``providers``: the SNN's) on a batch; models with a fixed
    batch size get fed in pieces."""
    sess = make_session(ann_model, threads=threads or 0, providers=providers)
    specs = input_specs(ann_model)
    fixed = specs[0].shape[0] if specs and isinstance(specs[0].shape[0], int) and specs[0].shape[0] > 0 else None
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: dict[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
        batch = next(iter(feeds.values())).shape[0]
        if fixed is None or fixed == batch:
            return dict(zip(names, run_checked(sess, None, feeds, "evaluation data")))
        if batch % fixed:
            raise DataError(f"the ANN has a fixed batch size of {fixed}; use a --batch-size that is a multiple of it")
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for i in range(0, batch, fixed):
            for n, v in zip(names, run_checked(sess, None, {k: a[i:i + fixed] for k, a in feeds.items()},
                                                "evaluation data")):
                if task == "detection" and v.ndim == 2 and v.shape[1] == 7:
                    v = v.astype(np.float64)
                    v[:, 0] += i
                parts[n].append(v)
        return {n: np.concatenate(v) for n, v in parts.items()}

    return run


def evaluate_task(
    ann: str | os.PathLike[str] | onnx.ModelProto,
    snn: Any,
    data: Any,
    Ts: Sequence[int],
    task: str,
    *,
    readouts: Sequence[Readout] = (Readout(),),
    batch_size: int = 16,
    output: str | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    max_dets: int | None = 100,
    limit: int | None = None,
    show_progress: bool = False,
    max_memory: int | None = None,
    threads: int | None = None,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """mIoU / pixel accuracy (segmentation) or mAP@0.5 / mAP@[.5:.95] (detection) of the ANN and
    of the SNN at each T and readout window, streamed batch by batch.

    ``data`` is a path or mapping in the module's formats; ``output`` names the model output
    to score (default: the first); ``limit`` keeps the first samples only. Each batch runs the
    ANN once and the SNN once per distinct t0 (``run_readouts``). With ``keep_predictions``
    the result also holds the predictions under ``"predictions"`` (not JSON-serialisable).
    """
    session, snn_proto, ann_model, specs, arrays, n, targets, out_name = open_task(
        ann, snn, data, task, batch_size=batch_size, output=output, ignore_index=ignore_index, limit=limit,
        threads=threads)
    Ts = sorted({int(T) for T in Ts})
    readouts = list(dict.fromkeys(readouts))
    check_memory(snn_proto, min(batch_size, n), max_memory)
    run_ann = _ann_runner(ann_model, threads, getattr(session, "providers", None))
    reader = WindowReader(session, threads)
    scored = score_batches(run_ann, reader, arrays, specs, targets, task, out_name, Ts, readouts, num_classes,
                           ignore_index, 0, n, batch_size, show_progress, keep_predictions)
    result = summarise(task, int(n), out_name, session, scored, targets, Ts, readouts, max_dets)
    if keep_predictions:
        result["predictions"] = {k: np.concatenate(v) for k, v in scored.preds.items()}
    return result


def open_task(ann: str | os.PathLike[str] | onnx.ModelProto, snn: Any, data: Any, task: str, *, batch_size: int,
              output: str | None, ignore_index: int | None, limit: int | None = None,
              threads: int | None = None) -> tuple[Any, onnx.ModelProto, onnx.ModelProto, list, dict[str, Any], int,
                                                   dict[str, np.ndarray], str]:
    """Open and check the models and the data of a dense task: the SNN's session and model, the
    ANN, its input specs, the data's arrays (read lazily), the sample count, the ground truth
    and the output to score."""
    if task not in ("segmentation", "detection"):
        raise ConfigError(f"task must be segmentation or detection here, got {task!r} (--task)")
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size} (--batch-size)")
    session, snn_proto, ann_model, specs = open_pair(ann, snn, threads)
    if isinstance(data, (str, os.PathLike)) and not str(data).endswith(".npz"):
        raise DataError(f"--task {task} reads a .npz file, got '{data}'; "
                        f"{SEG_FORMAT if task == 'segmentation' else DET_FORMAT}")
    arrays = as_array_dict(data, specs, "evaluation data", lazy=True)  # inputs read a batch at a time
    check_arrays(arrays, specs, "evaluation data")
    n = int(np.asarray(arrays[specs[0].name]).shape[0])
    targets = _targets(task, arrays, n, ignore_index)
    if limit is not None:
        if limit <= 0:
            raise ConfigError(f"limit must be positive, got {limit}")
        n = min(n, limit)
        if task == "detection":
            keep = targets["box_image"] < n
            targets = {k: v[keep] for k, v in targets.items()}
    out_name = output or session.output_names[0]
    if out_name not in session.output_names:
        raise ConfigError(f"the SNN has no output '{out_name}'; its outputs are {', '.join(session.output_names)} "
                          "(--output)")
    return session, snn_proto, ann_model, specs, arrays, n, targets, out_name


@dataclass
class Scored:
    """What the batches of a sample range gave: the ANN's scorer, one per (readout label, T), and
    (with ``keep_predictions``) the predictions."""

    ann: _Scorer | None
    snn: dict[tuple[str, int], _Scorer]
    preds: dict[Any, list[np.ndarray]]

    def merge(self, later: "Scored") -> None:
        """Add a later sample range's results, as if one loop had scored both ranges."""
        if later.ann is None:
            return
        if self.ann is None:
            self.ann, self.snn = later.ann, later.snn
        else:
            self.ann.merge(later.ann)
            for key, scorer in later.snn.items():
                self.snn[key].merge(scorer)
        for key, v in later.preds.items():
            self.preds.setdefault(key, []).extend(v)


def score_batches(run_ann: Any, reader: WindowReader, arrays: Mapping[str, Any], specs: Sequence[Any],
                  targets: dict[str, np.ndarray], task: str, out_name: str, Ts: Sequence[int],
                  readouts: Sequence[Readout], num_classes: int | None, ignore_index: int | None, first: int,
                  stop: int, batch_size: int, show_progress: bool = False, keep_predictions: bool = False) -> Scored:
    """Score samples [first, stop) batch by batch: the ANN once and the SNN at every T and readout."""
    ann_scorer: _Scorer | None = None
    scorers: dict[tuple[str, int], _Scorer] = {}
    preds: dict[Any, list[np.ndarray]] = {}

    def batches() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for i in range(first, stop, batch_size):
            yield i, {s.name: np.asarray(arrays[s.name][i:min(i + batch_size, stop)]) for s in specs}

    for start, feeds in progress(batches(), math.ceil((stop - first) / batch_size), "simulating", show_progress):
        b = next(iter(feeds.values())).shape[0]
        ann_out = run_ann(feeds, task)
        if out_name not in ann_out:
            raise ConfigError(f"the ANN has no output '{out_name}' (the SNN's output); its outputs are "
                              f"{', '.join(ann_out)} (--output)")
        y_ann = ann_out[out_name]
        if ann_scorer is None:  # without --num-classes: the score channels, or grown to the ids seen
            classes = num_classes
            if classes is None and task == "segmentation" and np.issubdtype(y_ann.dtype, np.floating) and y_ann.ndim == 4:
                classes = int(y_ann.shape[1])
            ann_scorer = _Scorer(task, classes, ignore_index)
            scorers = {(r.label, T): _Scorer(task, classes, ignore_index) for r in readouts for T in Ts}
        ref = ann_scorer.add(y_ann, out_name, start, b, targets)
        if keep_predictions:
            preds.setdefault("ann", []).append(ref)
        snn_out = reader.run(feeds, Ts, readouts)
        for key, res in snn_out.items():
            p = scorers[key].add(res[out_name], out_name, start, b, targets,
                                 ref if task == "segmentation" else None)
            if keep_predictions:
                preds.setdefault(key, []).append(p)
    return Scored(ann_scorer, scorers, preds)


def summarise(task: str, n: int, out_name: str, session: Any, scored: Scored, targets: dict[str, np.ndarray],
              Ts: Sequence[int], readouts: Sequence[Readout], max_dets: int | None) -> dict[str, Any]:
    """The ``evaluate_task`` result from the scorers of all the batches."""
    from ann2snn.runtime.reference import window_start

    ann_scorer, scorers = scored.ann, scored.snn
    assert ann_scorer is not None
    ann_res = ann_scorer.result(targets, max_dets)
    main_key = "miou" if task == "segmentation" else "map50"
    rows = []
    for r in readouts:
        for T in Ts:
            res = scorers[(r.label, T)].result(targets, max_dets)
            # the first step averaged: t0, or the last min_window steps when T < t0 + min_window
            start = window_start(T, r.at(T, session.t0), session.min_window)
            row = {"T": T, "readout": r.label, "t0": start, **res}
            for k in ("miou", "pixel_accuracy", "map50", "map"):
                if k in res:
                    row[f"{k}_ratio"] = (res[k] / ann_res[k]) if res[k] is not None and ann_res[k] else None
            rows.append(row)
    return {"task": task, "samples": int(n), "output": out_name, "model_t0": session.t0,
            "metric": main_key, "ann": ann_res, "snn": rows}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def format_task_table(result: dict[str, Any]) -> str:
    """A markdown table of an ``evaluate_task`` result."""
    ann = result["ann"]
    multi = len({r["readout"] for r in result["snn"]}) > 1
    head = f"task: {result['task']}, samples: {result['samples']}, output: {result['output']}, " \
           f"model readout t0: {result['model_t0']}"
    if result["task"] == "segmentation":
        lines = [head, f"ANN: mIoU {_pct(ann['miou'])}, pixel accuracy {_pct(ann['pixel_accuracy'])}", "",
                 "| T |" + (" readout |" if multi else "") + " t0 | mIoU | SNN/ANN | pixel acc | agreement with ANN |",
                 "|---|" + ("---|" if multi else "") + "---|---|---|---|---|"]
        for r in result["snn"]:
            lines.append(f"| {r['T']} |" + (f" {r['readout']} |" if multi else "")
                         + f" {r['t0']} | {_pct(r['miou'])} | {_pct(r['miou_ratio'])} | {_pct(r['pixel_accuracy'])} "
                         f"| {_pct(r['agreement'])} |")
    else:
        summary = (f"ANN: mAP@0.5 {_pct(ann['map50'])}, mAP@[.5:.95] {_pct(ann['map'])} "
                   f"({ann['gt_boxes']} boxes, {ann['detections']} detections)")
        lines = [head, summary, "",
                 "| T |" + (" readout |" if multi else "") + " t0 | mAP@0.5 | SNN/ANN | mAP@[.5:.95] | SNN/ANN |",
                 "|---|" + ("---|" if multi else "") + "---|---|---|---|---|"]
        for r in result["snn"]:
            lines.append(f"| {r['T']} |" + (f" {r['readout']} |" if multi else "")
                         + f" {r['t0']} | {_pct(r['map50'])} | {_pct(r['map50_ratio'])} | {_pct(r['map'])} "
                         f"| {_pct(r['map_ratio'])} |")
    return "\n".join(lines)
