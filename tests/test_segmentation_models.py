"""The scene generator (models/scenes.py), its committed sets, and the segmentation models."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from conftest import MODELS


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
