"""Write the committed scene sets (segmentation masks and detection boxes) from ``scenes.py``.

* ``data/scenes_calib.npz``: 256 scenes, split ``calib`` (t10k garments 0-4,999), seed 1001.
* ``data/scenes_test.npz``: 500 scenes, split ``test`` (t10k garments 5,000-9,999), seed 2002.

Keys: ``input`` float32 [N,1,64,64] in [0,1], ``mask`` int64 [N,64,64] (0 background,
k+1 Fashion class k), ``boxes`` float32 [M,4] x1,y1,x2,y2 (x2/y2 exclusive), ``box_labels``
int64 [M], ``box_image`` int64 [M]. Neither set shares a garment with the other or with
the training scenes (``train`` split). The arrays are identical on every run.

Run: ``python models/build_scenes.py [--out-dir models/data]`` (NumPy only, ~10 s).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scenes import make_scenes

SETS = {"scenes_calib": (256, 1001, "calib"), "scenes_test": (500, 2002, "test")}


def main() -> None:
    """Write the scene sets."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "data")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, (n, seed, split) in SETS.items():
        d = make_scenes(n, seed, split)
        path = args.out_dir / f"{name}.npz"
        np.savez_compressed(path, **d)
        print(f"{path}: {n} scenes, {len(d['boxes'])} boxes, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
