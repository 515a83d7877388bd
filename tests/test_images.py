"""Image folders and list files as calibration and evaluation data, streamed and preprocessed
as declared once at compile time."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from ann2snn.cli import main
from conftest import MODELS

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """The 600 test digits as 16x16 PNGs (upsampled 2x), one subfolder per class."""
    root = tmp_path_factory.mktemp("digits")
    with np.load(MODELS / "data" / "digits_test.npz") as z:
        x, y = z["input"], z["label"]
    for i, (img, label) in enumerate(zip(x, y)):
        (root / str(label)).mkdir(exist_ok=True)
        pixels = np.kron(np.round(img[0] * 255).astype(np.uint8), np.ones((2, 2), np.uint8))
        Image.fromarray(pixels, mode="L").save(root / str(label) / f"{i:04d}.png")
    return root


def test_compile_and_eval_on_an_image_folder(digit_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.snn.onnx"
    r = CliRunner().invoke(main, ["compile", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--calib",
                                  str(digit_folder), "--channel-order", "L", "--resize", "8", "--iters", "50"])
    assert r.exit_code == 0, r.output
    meta = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["ann2snn"])
    assert meta["config"]["channel_order"] == "L" and meta["config"]["resize"] == 8
    res = tmp_path / "e.json"
    r = CliRunner().invoke(main, ["eval", str(MODELS / "digits_cnn.onnx"), str(out), "--data", str(digit_folder),
                                  "-T", "32", "--batch-size", "100", "--json", str(res)])
    assert r.exit_code == 0, r.output
    result = json.loads(res.read_text())
    assert result["samples"] == 600 and result["ann_accuracy"] > 0.95  # labels from the class folders
    assert result["snn"][0]["agreement"] > 0.97


def test_list_file_and_bad_image(digit_folder: Path, tmp_path: Path) -> None:
    files = sorted(digit_folder.rglob("*.png"))[:40]
    listing = tmp_path / "calib.txt"
    listing.write_text("\n".join(str(f) for f in files) + "\n")
    out = tmp_path / "d.snn.onnx"
    args = ["compile", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--calib", str(listing),
            "--channel-order", "L", "--resize", "8", "--iters", "5", "--batch", "16"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (tmp_path / "broken.png").write_bytes(b"not a png")
    listing.write_text(str(tmp_path / "broken.png") + "\n")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 4 and "broken.png' could not be read" in r.stderr
    listing.write_text("\n".join(str(f) for f in files) + "\n")
    r = CliRunner().invoke(main, args[:-6] + ["--channel-order", "RGB", "--resize", "8"])
    assert r.exit_code == 4 and "the model expects" in r.stderr  # 3 channels for a 1-channel model


def test_run_on_an_image_folder(digit_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.snn.onnx"
    args = ["compile", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--calib", str(digit_folder),
            "--channel-order", "L", "--resize", "8", "--iters", "5"]
    assert CliRunner().invoke(main, args).exit_code == 0
    y = tmp_path / "y.npz"
    r = CliRunner().invoke(main, ["run", str(out), "--input", str(digit_folder), "-T", "8", "-o", str(y),
                                  "--batch-size", "128"])
    assert r.exit_code == 0, r.output
    with np.load(y) as z:
        assert z["logits"].shape == (600, 10) and len(z["files"]) == 600
