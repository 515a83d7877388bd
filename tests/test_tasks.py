"""Dense-task metrics (mIoU, COCO-style AP) on hand-computed cases, and ANN-vs-SNN evaluation of
tiny segmentation and detection networks through the API and ``ann2snn eval --task``."""
from __future__ import annotations

import json
from pathlib import Path

import ann2snn
import numpy as np
import onnx
import pytest
from ann2snn.cli import main
from ann2snn.errors import ConfigError, DataError
from ann2snn.analysis.metrics import (
    ConfusionMatrix,
    box_iou,
    detection_ap,
    interpolated_ap,
    segmentation_labels,
    segmentation_metrics,
)
from ann2snn.analysis.tasks import Readout, WindowReader, evaluate_task, run_readouts
from ann2snn.runtime import SpikingSession
from click.testing import CliRunner
from conftest import build, run_ort


# -- segmentation metrics ---------------------------------------------------------------------
def test_perfect_segmentation_is_one() -> None:
    mask = np.random.default_rng(0).integers(0, 4, (3, 5, 6))
    m = segmentation_metrics(mask, mask, 4)
    assert m["miou"] == 1.0 and m["pixel_accuracy"] == 1.0 and m["pixels"] == 90


def test_segmentation_by_hand() -> None:
    mask = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 1], [1, 1]])
    m = segmentation_metrics(pred, mask, num_classes=3)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2 absent on both sides: skipped
    assert m["iou"][0] == pytest.approx(0.5) and m["iou"][1] == pytest.approx(2 / 3) and m["iou"][2] is None
    assert m["miou"] == pytest.approx(7 / 12)
    assert m["pixel_accuracy"] == pytest.approx(3 / 4)


def test_ignore_index_and_accumulation() -> None:
    mask = np.array([[0, 255], [1, 1]])
    pred = np.array([[0, 1], [1, 0]])
    m = segmentation_metrics(pred, mask)
    # the ignored pixel does not count: class 0 TP 1 FP 1 -> 1/2, class 1 TP 1 FN 1 -> 1/2
    assert m["pixels"] == 3 and m["miou"] == pytest.approx(0.5) and m["pixel_accuracy"] == pytest.approx(2 / 3)
    # one matrix over the set is not the mean of per-image scores
    cm = ConfusionMatrix(2)
    cm.update(np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int))
    cm.update(np.array([[[1, 1], [1, 1]]]), np.array([[[0, 0], [1, 1]]]))
    assert cm.matrix.tolist() == [[4, 2], [0, 2]]
    assert cm.metrics()["miou"] == pytest.approx((4 / 6 + 2 / 4) / 2)


def test_wrong_prediction_scores_zero_and_bad_ids_are_refused() -> None:
    m = segmentation_metrics(np.ones((4, 4), int), np.zeros((4, 4), int), 2)
    assert m["miou"] == 0.0 and m["pixel_accuracy"] == 0.0
    with pytest.raises(DataError, match="mask has class id 5 but there are 3 classes"):
        segmentation_metrics(np.zeros((2, 2), int), np.full((2, 2), 5), 3)
    grown = segmentation_metrics(np.zeros((2, 2), int), np.full((2, 2), 5))  # num_classes=None grows
    assert len(grown["iou"]) == 6 and grown["miou"] == 0.0


def test_segmentation_labels_from_scores_or_labels() -> None:
    scores = np.zeros((1, 3, 2, 2), np.float32)
    scores[0, 2, 0, 1] = 1.0
    assert segmentation_labels(scores).tolist() == [[[0, 2], [0, 0]]]
    assert segmentation_labels(np.ones((1, 2, 2), np.int64)).shape == (1, 2, 2)
    with pytest.raises(DataError, match=r"output 'logits' has shape \[4, 3\].*needs float scores \[N,C,H,W\]"):
        segmentation_labels(np.zeros((4, 3), np.float32), "logits")


# -- detection metrics -----------------------------------------------------------------------
def det(image: int, cls: int, score: float, box: list[float]) -> list[float]:
    return [image, cls, score, *box]


def test_box_iou() -> None:
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [5, 0, 15, 10], [20, 20, 30, 30]])
    assert box_iou(a, b)[0].tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.0])


def test_perfect_detections_are_one_and_empty_are_zero() -> None:
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 30], [5, 5, 15, 15]], np.float32)
    labels, image = np.array([0, 1, 0]), np.array([0, 0, 1])
    dets = np.array([det(i, c, 0.9, b) for b, c, i in zip(gt.tolist(), labels, image)])
    r = detection_ap(dets, gt, labels, image)
    assert r["map50"] == 1.0 and r["map"] == 1.0
    r = detection_ap(np.zeros((0, 7)), gt, labels, image)
    assert r["map50"] == 0.0 and r["map"] == 0.0
    assert detection_ap(dets, np.zeros((0, 4)), np.zeros(0, int), np.zeros(0, int))["map50"] is None


def test_half_overlap_counts_at_050_only() -> None:
    gt = np.array([[0, 0, 10, 10]])
    r = detection_ap(np.array([det(0, 0, 0.8, [0, 0, 10, 5])]), gt, [0], [0])  # IoU exactly 0.5
    assert r["map50"] == 1.0
    assert r["map"] == pytest.approx(0.1)  # matched at 0.50 only, of the ten thresholds
    r = detection_ap(np.array([det(0, 0, 0.8, [5, 0, 15, 10])]), gt, [0], [0])  # IoU 1/3
    assert r["map50"] == 0.0 and r["map"] == 0.0


def test_ap_by_hand() -> None:
    # two ground-truth boxes; detections by score: hit, miss, hit -> recall .5 .5 1, precision 1 .5 2/3
    # envelope 1, 2/3, 2/3: the 51 recall points 0..0.50 read 1, the 50 points 0.51..1 read 2/3
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10]])
    dets = np.array([det(0, 0, 0.9, [0, 0, 10, 10]), det(0, 0, 0.8, [50, 50, 60, 60]),
                     det(0, 0, 0.7, [20, 0, 30, 10])])
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    r = detection_ap(dets, gt, [0, 0], [0, 0], iou_thresholds=[0.5])
    assert r["map50"] == pytest.approx(expected) and r["map"] == pytest.approx(expected)
    assert interpolated_ap(np.array([1, 0, 1]), 2) == pytest.approx(expected)


def test_matching_rules() -> None:
    gt = np.array([[0, 0, 10, 10]])
    # a duplicate of a matched box is a false positive; the wrong class or image never matches
    dets = np.array([det(0, 0, 0.9, [0, 0, 10, 10]), det(0, 0, 0.95, [0, 0, 10, 10]),
                     det(0, 1, 0.99, [0, 0, 10, 10]), det(1, 0, 0.99, [0, 0, 10, 10])])
    r = detection_ap(dets, gt, [0], [0], iou_thresholds=[0.5])
    # class 0, by score: image 1 (FP), the 0.95 box (TP), the 0.9 duplicate (FP): recall reaches 1 at precision 1/2
    assert r["map50"] == pytest.approx(0.5)
    assert set(r["ap_per_class"]) == {"0"}  # class 1 has no ground truth: not averaged
    # class averaging: class 0 perfect, class 1 missed -> 0.5
    r = detection_ap(np.array([det(0, 0, 0.9, [0, 0, 10, 10])]), np.array([[0, 0, 10, 10], [0, 0, 5, 5]]),
                     [0, 1], [0, 0])
    assert r["map50"] == pytest.approx(0.5)
    # at most max_dets per image: the best one is kept
    many = np.array([det(0, 0, 0.1 + i / 100, [50, 50, 60, 60]) for i in range(5)] + [det(0, 0, 0.9, [0, 0, 10, 10])])
    assert detection_ap(many, gt, [0], [0], max_dets=1)["map50"] == 1.0
    assert detection_ap(many, gt, [0], [0], max_dets=None)["map50"] == 1.0
    with pytest.raises(DataError, match=r"needs one tensor \[K,7\]"):
        detection_ap(np.zeros((3, 6)), gt, [0], [0])


# -- tiny networks ---------------------------------------------------------------------------
SEG_TEXT = """
g (float[N,1,8,8] x, float[6,1,3,3] W1, float[6] b1, float[6,6,3,3] W2, float[6] b2, float[3,6,1,1] W3,
   float[3] b3) => (float[N,3,8,8] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1, b1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, W2, b2)
  r2 = Relu (c2)
  y = Conv (r2, W3, b3)
}
"""

DET_TEXT = """
g (float[N,1,8,8] x, float[6,1,3,3] W1, float[6] b1, float[2,6,1,1] Ws, float[2] bs, float[4,6,1,1] Wb,
   float[4] bb, int64[3] sshape, int64[3] bshape, float[1,64,4] anchors, int64[1] maxk, float[1] iou,
   float[1] sthr, int64[1] i0, int64[1] i1, int64[2] i02) => (float[K,7] dets) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1, b1)
  r1 = Relu (c1)
  s = Conv (r1, Ws, bs)
  sig = Sigmoid (s)
  sc = Reshape (sig, sshape)
  b = Conv (r1, Wb, bb)
  bf = Reshape (b, bshape)
  bt = Transpose <perm=[0,2,1]> (bf)
  boxes = Add (bt, anchors)
  sel = NonMaxSuppression (boxes, sc, maxk, iou, sthr)
  bi = Gather <axis=1> (sel, i0)
  ci = Gather <axis=1> (sel, i1)
  score = GatherND (sc, sel)
  score1 = Unsqueeze (score, i1)
  bsel = Gather <axis=1> (sel, i02)
  bx = GatherND (boxes, bsel)
  bif = Cast <to=1> (bi)
  cif = Cast <to=1> (ci)
  dets = Concat <axis=1> (bif, cif, score1, bx)
}
"""


def seg_model(labels: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    text = SEG_TEXT
    if labels:
        text = text.replace("=> (float[N,3,8,8] y)", "=> (int64[N,8,8] lab)").replace(
            "y = Conv (r2, W3, b3)", "y = Conv (r2, W3, b3)\n  lab = ArgMax <axis=1, keepdims=0> (y)")
    w = {"W1": rng.normal(0, 0.6, (6, 1, 3, 3)), "b1": rng.normal(0, 0.1, 6),
         "W2": rng.normal(0, 0.3, (6, 6, 3, 3)), "b2": rng.normal(0, 0.1, 6),
         "W3": rng.normal(0, 1.0, (3, 6, 1, 1)), "b3": np.zeros(3)}
    # centre the class scores so that every class wins somewhere
    w["b3"] = -run_ort(build(SEG_TEXT, w), {"x": inputs(64, 0)})[0].mean(axis=(0, 2, 3))
    return build(text, w)


def det_model() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    yy, xx = np.meshgrid(np.arange(8) + 0.5, np.arange(8) + 0.5, indexing="ij")
    centres = np.stack([xx.ravel(), yy.ravel()], 1)
    anchors = np.concatenate([centres - 1.5, centres + 1.5], 1)[None]
    return build(DET_TEXT, {"W1": rng.normal(0, 0.6, (6, 1, 3, 3)), "b1": rng.normal(0, 0.1, 6),
                            "Ws": rng.normal(0, 1.0, (2, 6, 1, 1)), "bs": np.full(2, -1.0),
                            "Wb": rng.normal(0, 0.3, (4, 6, 1, 1)), "bb": np.zeros(4),
                            "anchors": anchors, "iou": [0.5], "sthr": [0.3]},
                 ints={"sshape": np.array([0, 2, -1], np.int64), "bshape": np.array([0, 4, -1], np.int64),
                       "maxk": np.array([3], np.int64), "i0": np.array([0], np.int64),
                       "i1": np.array([1], np.int64), "i02": np.array([0, 2], np.int64)})


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def seg_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("seg")
    model = seg_model()
    x = inputs(24, 1)
    mask = run_ort(model, {"x": x})[0].argmax(axis=1)
    mask[:, 0, 0] = 255  # unscored pixels
    paths = {"dir": d, "model": d / "seg.onnx", "snn": d / "seg.snn.onnx", "calib": d / "calib.npz",
             "test": d / "test.npz", "labels": d / "lab.onnx", "labels_snn": d / "lab.snn.onnx"}
    onnx.save(model, paths["model"])
    onnx.save(seg_model(labels=True), paths["labels"])
    np.savez(paths["calib"], x=inputs(128, 2))
    np.savez(paths["test"], x=x, mask=mask)
    ann2snn.compile(paths["model"], paths["calib"], paths["snn"], iters=20, batch=32)
    ann2snn.compile(paths["labels"], paths["calib"], paths["labels_snn"], iters=20, batch=32)
    return paths


@pytest.fixture(scope="module")
def det_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("det")
    model = det_model()
    x = inputs(20, 5)
    dets = run_ort(model, {"x": x})[0]
    assert len(dets) > 10  # the random network detects something in most images
    paths = {"dir": d, "model": d / "det.onnx", "snn": d / "det.snn.onnx", "calib": d / "calib.npz",
             "test": d / "test.npz"}
    onnx.save(model, paths["model"])
    np.savez(paths["calib"], x=inputs(128, 6))
    # the ANN's own detections as ground truth: the ANN scores 1.0 by construction
    np.savez(paths["test"], x=x, boxes=dets[:, 3:7], box_labels=dets[:, 1].astype(np.int64),
             box_image=dets[:, 0].astype(np.int64))
    ann2snn.compile(paths["model"], paths["calib"], paths["snn"], iters=20, batch=32)
    return paths


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_segmentation_eval_api(seg_files) -> None:
    r = evaluate_task(seg_files["model"], seg_files["snn"], seg_files["test"], [4, 64], "segmentation",
                      batch_size=10)
    assert r["samples"] == 24 and r["ann"]["miou"] == 1.0 and r["ann"]["pixels"] == 24 * 63
    by_T = {row["T"]: row for row in r["snn"]}
    assert by_T[64]["miou"] > 0.8 and by_T[64]["agreement"] > 0.9
    assert by_T[64]["miou"] >= by_T[4]["miou"]
    assert by_T[64]["miou_ratio"] == pytest.approx(by_T[64]["miou"])  # the ANN's mIoU is 1


def test_segmentation_label_output_and_limit(seg_files) -> None:
    r = evaluate_task(seg_files["labels"], seg_files["labels_snn"], seg_files["test"], [64], "segmentation",
                      limit=7, batch_size=4, keep_predictions=True)
    assert r["samples"] == 7 and r["ann"]["miou"] == 1.0 and r["snn"][0]["miou"] > 0.8
    assert r["predictions"]["ann"].shape == (7, 8, 8) and r["predictions"][("model", 64)].dtype == np.int64


def test_per_T_readout_equals_separate_runs(seg_files) -> None:
    session = SpikingSession(seg_files["snn"])
    x = {"x": inputs(3, 9)}
    out = run_readouts(session, x, [16, 32], [Readout(frac=0.5), Readout(t0=0), Readout()])
    for T in (16, 32):
        np.testing.assert_allclose(out[("T*0.5", T)]["y"], session.run(x, T, t0=T // 2)["y"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[("t0=0", T)]["y"], session.run(x, T, t0=0)["y"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[("model", T)]["y"], session.run(x, T)["y"], rtol=1e-5, atol=1e-6)
    # with an analog tail (ArgMax): simulated without it, the tail runs on each window
    tailed = SpikingSession(seg_files["labels_snn"])
    out = run_readouts(tailed, x, [16, 32], [Readout(frac=0.5), Readout()])
    for T in (16, 32):
        np.testing.assert_array_equal(out[("T*0.5", T)]["lab"], tailed.run(x, T, t0=T // 2)["lab"])
        np.testing.assert_array_equal(out[("model", T)]["lab"], tailed.run(x, T)["lab"])
    assert Readout(frac=0.25).at(30, 5) == 7 and Readout().at(30, 5) == 5 and Readout(t0=2).at(30, 5) == 2
    with pytest.raises(ConfigError, match="either --t0 or --t0-frac"):
        Readout(t0=1, frac=0.5)
    with pytest.raises(ConfigError, match=r"--t0-frac must be in \[0, 1\)"):
        Readout(frac=1.5)


def test_per_T_readout_through_nms_tail(det_files) -> None:
    session = SpikingSession(det_files["snn"])
    assert session.meta["tail"]
    x = {"x": inputs(4, 11)}
    out = run_readouts(session, x, [16, 64], [Readout(frac=0.5), Readout(t0=3)])
    for T in (16, 64):
        for label, t0 in (("T*0.5", T // 2), ("t0=3", 3)):
            want = session.run(x, T, t0=t0)["dets"]
            assert len(want) > 0
            np.testing.assert_allclose(out[(label, T)]["dets"], want, rtol=1e-4, atol=1e-4)
    fallback = WindowReader(session)
    fallback._sim = None  # one run_many per distinct t0, as for models whose step outputs are not all float
    out = fallback.run(x, [16, 64], [Readout(frac=0.5), Readout(t0=3)])
    np.testing.assert_array_equal(out[("T*0.5", 64)]["dets"], session.run(x, 64, t0=32)["dets"])


def test_detection_eval_api(det_files) -> None:
    r = evaluate_task(det_files["model"], det_files["snn"], det_files["test"], [8, 128], "detection",
                      batch_size=6, readouts=[Readout(), Readout(frac=0.5)])
    assert r["ann"]["map50"] == 1.0 and r["ann"]["map"] == 1.0
    assert len(r["snn"]) == 4 and {row["readout"] for row in r["snn"]} == {"model", "T*0.5"}
    best = max(row["map50"] for row in r["snn"] if row["T"] == 128)
    assert 0.5 < best <= 1.0
    assert all(0.0 <= row["map"] <= row["map50"] for row in r["snn"])


def test_cli_segmentation(seg_files) -> None:
    out = seg_files["dir"] / "seg.json"
    r = invoke("eval", seg_files["model"], seg_files["snn"], "--data", seg_files["test"], "--task", "segmentation",
               "-T", "8,32", "--t0-frac", "0.5", "--batch-size", "8", "--json", out)
    assert r.exit_code == 0, r.output
    assert "ANN: mIoU 100.00%" in r.stdout and "| 32 | 16 |" in r.stdout
    result = json.loads(out.read_text())
    assert result["task"] == "segmentation" and [row["t0"] for row in result["snn"]] == [4, 16]
    assert len(result["ann"]["iou"]) == 3


def test_cli_detection(det_files) -> None:
    out = det_files["dir"] / "det.json"
    r = invoke("eval", det_files["model"], det_files["snn"], "--data", det_files["test"], "--task", "detection",
               "-T", "16,64", "--t0", "2", "--json", out)
    assert r.exit_code == 0, r.output
    assert "ANN: mAP@0.5 100.00%, mAP@[.5:.95] 100.00%" in r.stdout and "| 64 | 2 |" in r.stdout
    result = json.loads(out.read_text())
    assert result["ann"]["gt_boxes"] == len(np.load(det_files["test"])["boxes"])
    assert all(row["t0"] == 2 for row in result["snn"])


def test_cli_errors(seg_files, det_files) -> None:
    cases = [
        (["eval", seg_files["model"], seg_files["snn"], "--data", det_files["test"], "--task", "segmentation"],
         4, "has no 'mask' array"),
        (["eval", det_files["model"], det_files["snn"], "--data", seg_files["test"], "--task", "detection"],
         4, "has no 'boxes', 'box_labels', 'box_image' array(s)"),
        (["eval", seg_files["model"], seg_files["snn"], "--data", det_files["test"], "--task", "detection"],
         4, "model output 'y' has shape [8, 3, 8, 8] (float32); --task detection needs one tensor [K,7]"),
        (["eval", seg_files["model"], seg_files["snn"], "--data", seg_files["test"], "--task", "segmentation",
          "--t0", "2", "--t0-frac", "0.5"], 2, "either --t0 or --t0-frac"),
        (["eval", seg_files["model"], seg_files["snn"], "--data", seg_files["test"], "--t0-frac", "0.5"],
         2, "--t0-frac is for --task segmentation|detection"),
        (["eval", seg_files["model"], seg_files["snn"], "--data", seg_files["test"], "--task", "segmentation",
          "--output", "nope"], 2, "the SNN has no output 'nope'"),
    ]
    for args, code, pattern in cases:
        if "--task" in args and args[args.index("--task") + 1] == "detection" and args[1] == seg_files["model"]:
            args += ["--batch-size", "8"]
        r = invoke(*args)
        assert r.exit_code == code, (args, r.output)
        assert pattern in r.stderr, r.stderr
        assert "Traceback" not in r.output
