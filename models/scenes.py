"""Scenes composited from real Fashion-MNIST garments, for segmentation and detection.

NumPy only, deterministic: the same ``(n, seed, split, size, max_objects)`` gives identical
arrays. Source images are the Zalando IDX files of the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``, MIT licence).

Splits (which garments are drawn):

* ``"train"``: the 60,000 training images.
* ``"calib"``: test (``t10k``) images 0-4,999.
* ``"test"``:  test (``t10k``) images 5,000-9,999.

So objects in calibration and test scenes are never seen in training, and calibration and
test scenes share no garment.

A scene (``size`` x ``size``, default 64) is built as follows:

1. Background: Gaussian noise (sigma 0.01-0.04 per scene) added at the end.
2. Clutter: 0-3 fragments (a random 6-14 px crop of a random garment, resized to 4-12 px,
   dimmed to 30-80 %) pasted at random places. They are background in the mask and have no box.
3. Objects: 1 to ``max_objects``, each a whole garment (its 28x28 image) resized to a random
   base size of ``size/4`` to ``5*size/8`` (16-40 px at 64), each side jittered
   independently by up to 15 %, dimmed to 70-100 %, at a random position fully inside the canvas. Later
   objects are pasted on top of earlier ones. A placement that would leave an earlier object
   with less than half of its area visible is redrawn (up to 20 tries, then the object is
   dropped), so every object stays mostly visible; overlaps are common.

Object mask ("on" pixels): the garment's pixels with intensity > 0.1 in its 28x28 source,
holes filled (dark pixels not connected to the image border, e.g. a sandal's gaps, belong to
the object), resized bilinearly with the image and thresholded at 0.5. Inside its mask an
object replaces what lay below; outside it the brighter of the two is kept (faint
anti-aliased rims). No ignore value (255) is used.

Returned arrays:

* ``input``: float32 ``[n, 1, size, size]`` in [0, 1], quantised to 8-bit levels ``k / 255``.
* ``mask``: int64 ``[n, size, size]``; 0 = background, ``k + 1`` = Fashion class ``k``
  (11 classes), the visible (topmost) object at each pixel.
* ``boxes``: float32 ``[M, 4]`` ``x1, y1, x2, y2`` in pixels, the tight box of the object's
  mask as pasted (before later objects cover parts of it); ``x2``/``y2`` are exclusive
  (``x2 = last column + 1``), so width = ``x2 - x1``.
* ``box_labels``: int64 ``[M]`` Fashion class 0-9; ``box_image``: int64 ``[M]`` scene index.
  Boxes are ordered by scene, then by paste order.
"""
from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = 11  # background + 10 garments
ON_THRESHOLD = 0.1
MIN_VISIBLE = 0.5
_SPLITS = {"train": ("train", 0, 60000), "calib": ("t10k", 0, 5000), "test": ("t10k", 5000, 10000)}
_SPLIT_CODE = {"train": 0, "calib": 1, "test": 2}


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (uint8 images or labels) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fill_holes(on: np.ndarray) -> np.ndarray:
    """``on`` [N,H,W] bool with enclosed off-regions set (4-connected flood fill from the border)."""
    off = ~on
    outside = np.zeros_like(on)
    outside[:, 0, :] = off[:, 0, :]
    outside[:, -1, :] = off[:, -1, :]
    outside[:, :, 0] |= off[:, :, 0]
    outside[:, :, -1] |= off[:, :, -1]
    active = np.arange(len(on))  # images whose outside region still grows
    while active.size:
        cur = outside[active]
        grown = cur.copy()
        grown[:, 1:, :] |= cur[:, :-1, :]
        grown[:, :-1, :] |= cur[:, 1:, :]
        grown[:, :, 1:] |= cur[:, :, :-1]
        grown[:, :, :-1] |= cur[:, :, 1:]
        grown &= off[active]
        changed = (grown != cur).any(axis=(1, 2))
        outside[active] = grown
        active = active[changed]
    return ~outside


@cache
def _pool(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images float32 [N,28,28] in [0,1], silhouettes float32 [N,28,28], labels int64) of a split."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    prefix, lo, hi = _SPLITS[split]
    images = read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")[lo:hi].astype(np.float32) / 255.0
    labels = read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")[lo:hi].astype(np.int64)
    silhouettes = _fill_holes(images > ON_THRESHOLD).astype(np.float32)
    return images, silhouettes, labels


@cache
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear interpolation weights (half-pixel centres, edge clamped)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a 2-D array to ``h`` x ``w``."""
    return _resize_matrix(img.shape[0], h) @ img @ _resize_matrix(img.shape[1], w).T


def make_scenes(n: int, seed: int, split: str = "train", size: int = 64, max_objects: int = 4) -> dict:
    """``n`` scenes from ``split``'s garments (see the module docstring for the arrays returned)."""
    if n < 0 or size < 16 or max_objects < 1:
        raise ValueError(f"need n >= 0, size >= 16, max_objects >= 1 (got {n}, {size}, {max_objects})")
    images, silhouettes, labels = _pool(split)
    rng = np.random.default_rng([seed, _SPLIT_CODE[split]])
    x = np.zeros((n, 1, size, size), np.float32)
    mask = np.zeros((n, size, size), np.int64)
    boxes: list[list[float]] = []
    box_labels: list[int] = []
    box_image: list[int] = []
    lo_scale, hi_scale = size // 4, (5 * size) // 8
    for i in range(n):
        canvas = x[i, 0]
        # clutter first, so that objects cover it
        for _ in range(rng.integers(0, 4)):
            src = images[rng.integers(len(images))]
            c = int(rng.integers(6, 15))
            r0, c0 = rng.integers(0, 29 - c, size=2)
            s = int(rng.integers(4, 13))
            frag = _resize(src[r0 : r0 + c, c0 : c0 + c], s, s) * rng.uniform(0.3, 0.8)
            y0, x0 = rng.integers(0, size - s + 1, size=2)
            np.maximum(canvas[y0 : y0 + s, x0 : x0 + s], frag, out=canvas[y0 : y0 + s, x0 : x0 + s])
        owner = np.full((size, size), -1, np.int64)  # index of the visible object per pixel
        areas: list[int] = []
        for _ in range(rng.integers(1, max_objects + 1)):
            k = int(rng.integers(len(images)))
            base = rng.uniform(lo_scale, hi_scale)
            h = int(np.clip(round(base * rng.uniform(0.85, 1.15)), 8, size))
            w = int(np.clip(round(base * rng.uniform(0.85, 1.15)), 8, size))
            sil = _resize(silhouettes[k], h, w) > 0.5
            if not sil.any():
                continue
            for _try in range(20):
                y0 = int(rng.integers(0, size - h + 1))
                x0 = int(rng.integers(0, size - w + 1))
                covered = owner[y0 : y0 + h, x0 : x0 + w][sil]
                lost = np.bincount(covered[covered >= 0], minlength=len(areas))
                visible = np.bincount(owner[owner >= 0], minlength=len(areas))
                if all(visible[j] - lost[j] >= MIN_VISIBLE * areas[j] for j in range(len(areas))):
                    break
            else:
                continue
            obj = _resize(images[k], h, w) * rng.uniform(0.7, 1.0)
            region = canvas[y0 : y0 + h, x0 : x0 + w]
            region[...] = np.where(sil, obj, np.maximum(region, obj))
            owner[y0 : y0 + h, x0 : x0 + w][sil] = len(areas)
            mask[i, y0 : y0 + h, x0 : x0 + w][sil] = labels[k] + 1
            areas.append(int(sil.sum()))
            rows = np.flatnonzero(sil.any(axis=1))
            cols = np.flatnonzero(sil.any(axis=0))
            boxes.append([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1])
            box_labels.append(int(labels[k]))
            box_image.append(i)
        canvas += rng.normal(0.0, rng.uniform(0.01, 0.04), canvas.shape).astype(np.float32)
        np.clip(canvas, 0.0, 1.0, out=canvas)
        np.round(canvas * 255.0, out=canvas)  # 8-bit grey levels, like a real image (and small files)
        canvas /= 255.0
    return {
        "input": x,
        "mask": mask,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "box_labels": np.asarray(box_labels, np.int64),
        "box_image": np.asarray(box_image, np.int64),
    }
