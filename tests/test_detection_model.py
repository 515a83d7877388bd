"""The FCOS-style detector (models/det_fcos.onnx, built by models/build_detection.py).

Its post-processing (sigmoid, box decoding, per-class NonMaxSuppression, gathers) is part
of the ONNX graph; these tests check it against an independent numpy reference, and that
the compiler keeps it in the analog tail and runs it once on the readout.
"""
from __future__ import annotations

import ann2snn
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ann2snn.runtime import SpikingSession
from conftest import MODELS
from onnx import TensorProto, helper

MODEL = MODELS / "det_fcos.onnx"
DATA = MODELS / "data"
BOUNDARY = ["pp/cls_all", "pp/reg_all", "pp/ctr_all"]  # flattened head outputs: [N,10,P], [N,4,P], [N,1,P]
STRIDES, IMAGE = (4, 8), 64
MAX_PER_CLASS, IOU, SCORE = 10, 0.5, 0.05

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason="models/det_fcos.onnx not built")


def _scenes(n: int) -> np.ndarray:
    with np.load(DATA / "scenes_test.npz") as z:
        return z["input"][:n]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 1)
    area = lambda z: np.prod(np.clip(z[..., 2:] - z[..., :2], 0, None), -1)
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def reference(cls: np.ndarray, reg: np.ndarray, ctr: np.ndarray) -> np.ndarray:
    """Detections [K,7] from the flattened head outputs, written from the model's documented rules."""
    centres = np.concatenate([np.stack(np.meshgrid(np.arange(IMAGE // s) * s + s // 2,
                                                   np.arange(IMAGE // s) * s + s // 2), -1).reshape(-1, 2)
                              for s in STRIDES]).astype(np.float64)      # (x, y), row-major per level
    stride = np.concatenate([np.full((IMAGE // s) ** 2, s) for s in STRIDES]).astype(np.float64)
    scores = np.sqrt(1 / (1 + np.exp(-cls.astype(np.float64))) / (1 + np.exp(-ctr.astype(np.float64))))
    d = np.exp(reg.astype(np.float64)) * stride
    boxes = np.clip(np.stack([centres[:, 0] - d[:, 0], centres[:, 1] - d[:, 1],
                              centres[:, 0] + d[:, 2], centres[:, 1] + d[:, 3]], -1), 0, IMAGE)
    rows = []
    for n in range(cls.shape[0]):
        for c in range(cls.shape[1]):
            order = [j for j in np.argsort(-scores[n, c], kind="stable") if scores[n, c, j] > SCORE]
            kept: list[int] = []
            for j in order:
                if len(kept) < MAX_PER_CLASS and (not kept or _iou(boxes[n, j], boxes[n, kept]).max() <= IOU):
                    kept.append(j)
            rows += [[n, c, scores[n, c, j], *boxes[n, j]] for j in kept]
    return np.array(rows, np.float32).reshape(-1, 7)


def _sorted(d: np.ndarray) -> np.ndarray:
    return d[np.lexsort((d[:, 3], -d[:, 2], d[:, 1], d[:, 0]))]


def _assert_same(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.ndim == 2 and got.shape[1] == 7
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_allclose(_sorted(got), _sorted(ref), atol=1e-3, rtol=1e-4)


def _with_boundary_outputs() -> ort.InferenceSession:
    model = onnx.load(str(MODEL))
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in BOUNDARY)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_interface() -> None:
    """One input ``input`` [batch,1,64,64], one output ``detections`` [K,7]."""
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == "input" and dims[1:] == [1, 64, 64] and isinstance(dims[0], str)
    assert [o.name for o in model.graph.output] == ["detections"]
    assert {"NonMaxSuppression", "GatherND", "Sigmoid", "Exp"} <= {n.op_type for n in model.graph.node}


def test_postprocessing_matches_numpy_reference() -> None:
    """The in-graph decoding and NMS give the reference's detections on real test scenes."""
    det, cls, reg, ctr_out = _with_boundary_outputs().run(["detections", *BOUNDARY], {"input": _scenes(6)})
    assert len(det) > 0
    _assert_same(det, reference(cls, reg, ctr_out))


def test_batch_concatenates_images() -> None:
    """Rows of image i in a batch equal the rows of image i run alone (with its index)."""
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    x = _scenes(3)
    batch = sess.run(["detections"], {"input": x})[0]
    assert set(np.unique(batch[:, 0]).astype(int)) <= {0, 1, 2}
    for i in range(3):
        alone = sess.run(["detections"], {"input": x[i:i + 1]})[0]
        alone[:, 0] = i
        np.testing.assert_allclose(_sorted(batch[batch[:, 0] == i]), _sorted(alone), atol=1e-4)


def test_compiles_with_nms_in_tail_and_runs_once_on_readout() -> None:
    """Tiny calibration: NMS and decoding land in the analog tail, the boundary is the flattened
    head outputs, and the tail applied to the readout equals the reference on that readout."""
    with np.load(DATA / "scenes_calib.npz") as z:
        calib = z["input"][:32]
    snn = ann2snn.compile(MODEL, {"input": calib}, iters=5, batch=8)
    session = SpikingSession(snn)
    tail = session.meta["tail"]
    assert {"pp/NonMaxSuppression", "pp/Sigmoid_cls", "pp/Exp_reg", "pp/GatherND_boxes"} <= set(tail["nodes"])
    assert sorted(tail["inputs"]) == sorted(BOUNDARY) and tail["outputs"] == ["detections"]
    assert not any("Conv" in n for n in tail["nodes"])  # the whole network spikes
    x = _scenes(2)
    steps = session.t0 + session.min_window  # run() and readout() then average the same window
    session.reset(len(x))
    outs = [session.step({"input": x}) for _ in range(steps)]
    det = session.readout()["detections"]
    mean = {k: np.mean([o[k] for o in outs[session.t0:]], axis=0, dtype=np.float64).astype(np.float32)
            for k in BOUNDARY}
    _assert_same(det, reference(mean["pp/cls_all"], mean["pp/reg_all"], mean["pp/ctr_all"]))
    by_T = session.run_many({"input": x}, [steps, steps + 2])
    for out in by_T.values():
        d = out["detections"]
        assert d.dtype == np.float32 and d.ndim == 2 and d.shape[1] == 7
        assert set(d[:, 0].astype(int)) <= {0, 1} and ((0 <= d[:, 3:]) & (d[:, 3:] <= IMAGE)).all()
    _assert_same(by_T[steps]["detections"], det)
