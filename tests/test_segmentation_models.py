"""The scene generator (models/scenes.py), its committed sets, and the segmentation models."""
from __future__ import annotations

import importlib.util
import json
import sys

import ann2snn
import numpy as np
import onnx
import pytest
from ann2snn.passes.fold_constants import fold_constants
from ann2snn.runtime import SpikingSession
from conftest import MODELS, apply, build, ops, run_ort


def _scenes_module():
    spec = importlib.util.spec_from_file_location("scenes", MODELS / "scenes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("scenes", mod)
    spec.loader.exec_module(mod)
    return mod


scenes = _scenes_module()
needs_fashion = pytest.mark.skipif(not scenes.FASHION_DIR.exists(), reason="Fashion-MNIST files not installed")


def _check_consistent(d: dict, n: int, size: int) -> None:
    """Shapes, dtypes and masks consistent with boxes."""
    assert d["input"].shape == (n, 1, size, size) and d["input"].dtype == np.float32
    assert d["mask"].shape == (n, size, size) and d["mask"].dtype == np.int64
    m = len(d["boxes"])
    assert d["boxes"].shape == (m, 4) and d["boxes"].dtype == np.float32
    assert d["box_labels"].shape == (m,) and d["box_image"].shape == (m,)
    assert 0.0 <= d["input"].min() and d["input"].max() <= 1.0
    assert set(np.unique(d["mask"])) <= set(range(11))
    assert np.all(np.diff(d["box_image"]) >= 0)
    per_scene = np.bincount(d["box_image"], minlength=n)
    assert per_scene.min() >= 1 and per_scene.max() <= 4
    x1, y1, x2, y2 = d["boxes"].T
    assert np.all((0 <= x1) & (x1 < x2) & (x2 <= size) & (0 <= y1) & (y1 < y2) & (y2 <= size))
    for i in range(n):
        sel = d["box_image"] == i
        mask = d["mask"][i]
        inside = np.zeros_like(mask, dtype=bool)
        for (a, b, c, e), lab in zip(d["boxes"][sel].astype(int), d["box_labels"][sel]):
            inside[b:e, a:c] = True
            # each object stays at least half visible, so its class is present inside its box
            assert (mask[b:e, a:c] == lab + 1).sum() > 0
        # every labelled pixel lies in a box of its class; classes without a box are absent
        assert not (mask[~inside] > 0).any()
        assert set(np.unique(mask)) - {0} == set(d["box_labels"][sel] + 1)
        # boxes are tight: the pixels of the topmost object touch all four sides of its box
        a, b, c, e = d["boxes"][sel][-1].astype(int)
        top = mask[b:e, a:c] == d["box_labels"][sel][-1] + 1
        assert top[0].any() and top[-1].any() and top[:, 0].any() and top[:, -1].any()


@needs_fashion
def test_scenes_deterministic_and_consistent() -> None:
    a = scenes.make_scenes(40, seed=7, split="test")
    b = scenes.make_scenes(40, seed=7, split="test")
    for k in ("input", "mask", "boxes", "box_labels", "box_image"):
        assert np.array_equal(a[k], b[k]), k
    c = scenes.make_scenes(40, seed=8, split="test")
    assert not np.array_equal(a["input"], c["input"])
    _check_consistent(a, 40, 64)
    _check_consistent(scenes.make_scenes(10, seed=0, split="calib", size=96), 10, 96)


@needs_fashion
def test_splits_draw_disjoint_garments() -> None:
    test_imgs = scenes._pool("test")[0]
    calib_imgs = scenes._pool("calib")[0]
    assert len(test_imgs) == len(calib_imgs) == 5000
    assert not np.array_equal(test_imgs[0], calib_imgs[0])
    with pytest.raises(ValueError, match="split must be one of"):
        scenes.make_scenes(1, 0, split="val")


@pytest.mark.parametrize("name,n", [("scenes_calib", 256), ("scenes_test", 500)])
def test_committed_scene_sets(name: str, n: int) -> None:
    with np.load(MODELS / "data" / f"{name}.npz") as z:
        d = {k: z[k] for k in z.files}
    assert set(d) == {"input", "mask", "boxes", "box_labels", "box_image"}
    _check_consistent(d, n, 64)


# --- Resize with sizes computed from Shape ops (F.interpolate(x, size=y.shape[-2:]), dynamic batch) ----------

ASPP_POOL_TEXT = """
g (float[N,1,8,8] x, float[4,1,3,3] W1, float[4] b1, float[4,4,1,1] W2, float[4] b2, float[3,8,1,1] W3,
   float[3] b3) => (float[N,3,8,8] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, W1, b1)
  r1 = Relu (c1)
  p = GlobalAveragePool (r1)
  c2 = Conv (p, W2, b2)
  r2 = Relu (c2)
  sh = Shape (r2)
  nc = Slice (sh, s0, s2)
  shx = Shape (r1)
  hw = Slice (shx, s2, s4)
  sizes = Concat <axis=0> (nc, hw)
  up = Resize <mode="linear", coordinate_transformation_mode="half_pixel"> (r2, "", "", sizes)
  cat = Concat <axis=1> (r1, up)
  y = Conv (cat, W3, b3)
}
"""


def _aspp_pool_model():
    rng = np.random.default_rng(0)
    weights = {"W1": rng.normal(0, 0.7, (4, 1, 3, 3)), "b1": rng.normal(0, 0.1, 4),
               "W2": rng.normal(0, 0.7, (4, 4, 1, 1)), "b2": rng.normal(0.2, 0.1, 4),
               "W3": rng.normal(0, 0.7, (3, 8, 1, 1)), "b3": rng.normal(0, 0.1, 3)}
    ints = {n: np.array([v], np.int64) for n, v in (("s0", 0), ("s2", 2), ("s4", 4))}
    return build(ASPP_POOL_TEXT, weights, ints=ints)


def test_resize_with_computed_sizes_gets_constant_scales() -> None:
    """The DeepLab image-pooling branch: the Resize no longer reads a Shape of a spiking tensor."""
    model = _aspp_pool_model()
    _, folded = apply(model, fold_constants)
    assert "Shape" not in ops(folded)
    resize = next(n for n in folded.graph.node if n.op_type == "Resize")
    assert len(resize.input) == 3 and resize.input[2]
    x = np.random.default_rng(1).uniform(0, 1, (3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(folded, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_aspp_pool_branch_stays_spiking() -> None:
    model = _aspp_pool_model()
    x = np.random.default_rng(2).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)
    snn = ann2snn.compile(model, x, iters=10, batch=32)
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    assert len(meta["neurons"]) == 2 and meta["tail"] is None
    ann = run_ort(model, {"x": x[:8]})[0]
    out = SpikingSession(snn).run_many(x[:8], [16, 256], t0=0)
    err = {T: float(np.abs(out[T]["y"] - ann).mean()) for T in out}
    assert err[256] < 0.5 * err[16], err


# --- the committed segmentation networks ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seg_fcn.onnx", "seg_deeplab.onnx"])
def test_segmentation_model_converts(name: str) -> None:
    """Compiles without hand edits, every ReLU becomes a neuron layer, and the SNN approaches the ANN in T.

    Max-norm thresholds from 2 batches keep the test fast; LTB with few iterations sets low
    thresholds whose clipping error would hide the convergence in T.
    """
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"{path} is not built (models/build_segmentation.py)")
    relus = sum(n.op_type == "Relu" for n in onnx.load(str(path)).graph.node)
    snn = ann2snn.compile(path, MODELS / "data" / "scenes_calib.npz", method="max", iters=2, batch=32)
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    assert len(meta["neurons"]) == relus
    assert meta["tail"] is None  # the bilinear upsampling stays in the spiking part: it is linear
    with np.load(MODELS / "data" / "scenes_test.npz") as z:
        x = z["input"][:4]
    ann = run_ort(onnx.load(str(path)), {"input": x})[0]
    assert ann.shape == (4, 11, 64, 64)
    out = SpikingSession(snn, threads=1).run_many(x, [16, 128])
    err = {T: float(np.abs(out[T]["logits"] - ann).mean()) for T in out}
    assert err[128] < 0.3 * err[16], err
    agree = float((out[128]["logits"].argmax(1) == ann.argmax(1)).mean())
    assert agree > 0.97, agree
