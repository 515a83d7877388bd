"""Segmentation and detection metrics of ``ann2snn eval --task``, numpy only.

- mIoU from one confusion matrix accumulated over the whole set: IoU_c = TP / (TP + FP + FN),
  averaged over the classes present in the ground truth or the prediction (class 0, the
  background, counts like any other); pixel accuracy over the scored pixels.
- AP per class as COCO computes it: detections sorted by descending score, each greedily
  matched to the unmatched ground-truth box of the same class and image with the highest
  IoU >= the threshold; precision made monotone and read at 101 recall points 0, 0.01, ..., 1.
  mAP@0.5 and mAP@[.5:.95] (mean over IoU 0.50:0.05:0.95) average over the classes that have
  ground truth. At most ``max_dets`` (100) highest-scoring detections per image; no crowd
  regions and no area ranges. Box areas are (x2 - x1) * (y2 - y1).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError

COCO_IOUS: tuple[float, ...] = tuple(float(t) for t in np.linspace(0.5, 0.95, 10))
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


# -- segmentation -------------------------------------------------------------------------
class ConfusionMatrix:
    """Pixel confusion matrix (rows: ground truth, columns: prediction), accumulated batch by batch.

    With ``num_classes=None`` it grows to the largest class id seen.
    """

    def __init__(self, num_classes: int | None = None, ignore_index: int | None = 255) -> None:
        """An empty matrix for ``num_classes`` classes (or growing); ``ignore_index`` pixels are skipped."""
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes or 0,) * 2, np.int64)

    def update(self, pred: np.ndarray, mask: np.ndarray) -> None:
        """Add the pixels of ``pred`` (labels) against ``mask`` (ground truth), same shape."""
        pred, mask = np.asarray(pred), np.asarray(mask)
        if pred.shape != mask.shape:
            raise DataError(f"predicted labels have shape {pred.shape} but the mask has {mask.shape}; "
                            "the model must output one label (or C scores) per mask pixel")
        keep = mask != self.ignore_index if self.ignore_index is not None else np.ones(mask.shape, bool)
        gt, pr = mask[keep].astype(np.int64), pred[keep].astype(np.int64)
        if gt.size == 0:
            return
        if gt.min() < 0 or pr.min() < 0:
            raise DataError("class ids must be >= 0 (mask and predicted labels); mark unscored pixels with "
                            f"{self.ignore_index}")
        top = int(max(gt.max(), pr.max())) + 1
        n = self.matrix.shape[0]
        if top > n:
            if self.num_classes is not None:
                which = "mask" if gt.max() >= n else "prediction"
                raise DataError(f"the {which} has class id {top - 1} but there are {n} classes "
                                f"(the model's score channels or --num-classes); mark unscored pixels with "
                                f"{self.ignore_index}")
            grown = np.zeros((top, top), np.int64)
            grown[:n, :n] = self.matrix
            self.matrix, n = grown, top
        self.matrix += np.bincount(gt * n + pr, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> None:
        """Add ``other``'s pixels (a growing matrix grows to the larger of the two): the matrix one
        update loop over both sets of batches gives."""
        n = max(self.matrix.shape[0], other.matrix.shape[0])
        grown = np.zeros((n, n), np.int64)
        for m in (self.matrix, other.matrix):
            grown[:m.shape[0], :m.shape[0]] += m
        self.matrix = grown

    def metrics(self) -> dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU (None for classes absent from both sides)."""
        return matrix_metrics(self.matrix)


def matrix_metrics(matrix: np.ndarray) -> dict[str, Any]:
    """mIoU (over classes present in ground truth or prediction), pixel accuracy, per-class IoU."""
    m = np.asarray(matrix, np.float64)
    tp = np.diag(m)
    gt, pr = m.sum(axis=1), m.sum(axis=0)
    union = gt + pr - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    total = m.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else None,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else None,
        "iou": [None if not p else float(v) for v, p in zip(iou, present)],
        "pixels": int(total),
    }


def segmentation_metrics(pred_labels: np.ndarray, mask: np.ndarray, num_classes: int | None = None,
                         ignore_index: int | None = 255) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of predicted labels against a mask (any equal shapes)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred_labels, mask)
    return cm.metrics()


def segmentation_labels(y: np.ndarray, name: str = "output") -> np.ndarray:
    """Labels [N, H, W] from a segmentation output: the argmax of scores [N, C, H, W], or labels as given."""
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.floating) and y.ndim == 4:
        return y.argmax(axis=1)
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 3:
        return y
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 4 and y.shape[1] == 1:
        return y[:, 0]
    raise DataError(f"model output '{name}' has shape {list(y.shape)} ({y.dtype}); --task segmentation needs "
                    "float scores [N,C,H,W] or integer labels [N,H,W] at the mask's resolution (pick another "
                    "output with --output, or end the model with a Resize to the input size)")


# -- detection ------------------------------------------------------------------------------
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of boxes (x1, y1, x2, y2)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def interpolated_ap(tp: np.ndarray, n_gt: int) -> float:
    """COCO's 101-point interpolated AP of detections already sorted by descending score.

    ``tp`` marks each detection as a true (1) or false (0) positive; ``n_gt`` > 0.
    """
    tp = np.asarray(tp, np.float64)
    if tp.size == 0:
        return 0.0
    ctp, cfp = np.cumsum(tp), np.cumsum(1.0 - tp)
    recall = ctp / n_gt
    precision = ctp / (ctp + cfp)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope: best precision at recall >= r
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(q.mean())


def _match(det_boxes: np.ndarray, gt_boxes: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """True positives [len(thresholds), D] of one image and class; detections sorted by score."""
    tp = np.zeros((len(thresholds), len(det_boxes)), bool)
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return tp
    ious = box_iou(det_boxes, gt_boxes)
    for k, thr in enumerate(thresholds):
        taken = np.zeros(len(gt_boxes), bool)
        for d in range(len(det_boxes)):
            cand = np.where(taken, -1.0, ious[d])
            g = int(cand.argmax())
            if cand[g] >= min(thr, 1 - 1e-10):
                taken[g] = True
                tp[k, d] = True
    return tp


def check_detections(dets: np.ndarray, name: str = "output") -> np.ndarray:
    """Detections as float64 [K, 7]; a DataError naming the output when the shape is wrong."""
    d = np.asarray(dets)
    if d.ndim != 2 or d.shape[1] != 7 or not (np.issubdtype(d.dtype, np.floating) or np.issubdtype(d.dtype, np.integer)):
        raise DataError(f"model output '{name}' has shape {list(d.shape)} ({d.dtype}); --task detection needs one "
                        "tensor [K,7] of rows [image_index, class_id, score, x1, y1, x2, y2] (pick another output "
                        "with --output, or build these rows after NonMaxSuppression in the model)")
    return d.astype(np.float64)


def detection_ap(dets: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_image: np.ndarray,
                 iou_thresholds: Sequence[float] = COCO_IOUS, max_dets: int | None = 100) -> dict[str, Any]:
    """COCO-style AP per class and IoU threshold, mAP@0.5 and mAP over ``iou_thresholds``.

    ``dets`` [K, 7]: rows [image_index, class_id, score, x1, y1, x2, y2] with image indices into
    the same numbering as ``gt_image``. Classes without ground truth are not averaged.
    """
    dets = check_detections(dets, "detections")
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels).reshape(-1).astype(np.int64)
    gt_image = np.asarray(gt_image).reshape(-1).astype(np.int64)
    thresholds = [float(t) for t in iou_thresholds]
    if not thresholds:
        raise ConfigError("detection_ap needs at least one IoU threshold")
    if max_dets is not None and len(dets):
        keep = np.zeros(len(dets), bool)
        img = dets[:, 0].astype(np.int64)
        order = np.lexsort((-dets[:, 2], img))  # by image, then descending score
        rank = np.empty(len(dets), np.int64)
        sorted_img = img[order]
        starts = np.searchsorted(sorted_img, sorted_img, side="left")
        rank[order] = np.arange(len(dets)) - starts
        keep = rank < max_dets
        dets = dets[keep]
    classes = sorted(set(gt_labels.tolist()))
    per_class: dict[int, list[float]] = {}
    for c in classes:
        gmask = gt_labels == c
        n_gt = int(gmask.sum())
        cd = dets[dets[:, 1].astype(np.int64) == c]
        cd = cd[np.argsort(-cd[:, 2], kind="stable")]
        tp = np.zeros((len(thresholds), len(cd)), bool)
        for im in np.unique(cd[:, 0].astype(np.int64)):
            rows = np.where(cd[:, 0].astype(np.int64) == im)[0]
            tp[:, rows] = _match(cd[rows, 3:7], gt_boxes[gmask & (gt_image == im)], thresholds)
        per_class[c] = [interpolated_ap(tp[k], n_gt) for k in range(len(thresholds))]
    ap = np.array([per_class[c] for c in classes]).reshape(len(classes), len(thresholds))
    i50 = next((k for k, t in enumerate(thresholds) if abs(t - 0.5) < 1e-9), None)
    return {
        "map50": float(ap[:, i50].mean()) if classes and i50 is not None else None,
        "map": float(ap.mean()) if classes else None,
        "ap_per_class": {str(c): {"ap50": per_class[c][i50] if i50 is not None else None,
                                  "ap": float(np.mean(per_class[c]))} for c in classes},
        "iou_thresholds": thresholds,
        "detections": len(dets),
        "gt_boxes": len(gt_boxes),
    }
