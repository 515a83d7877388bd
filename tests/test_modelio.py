"""Loading untrusted files and writing outputs atomically."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ann2snn.errors import ModelLoadError
from ann2snn.modelio import load_model, save_model
from conftest import MODELS


def external_model(tmp_path: Path, location: str) -> Path:
    model = onnx.load(MODELS / "digits_cnn_dynamo.onnx", load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("location", ["../secret.data", "/etc/passwd", "sub/../../secret.data"])
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    sub = tmp_path / "models"
    sub.mkdir()
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(external_model(sub, location))


def test_external_data_symlink_out_is_refused(tmp_path: Path) -> None:
    sub = tmp_path / "models"
    sub.mkdir()
    shutil.copy(MODELS / "digits_cnn_dynamo.onnx.data", tmp_path / "real.data")
    os.symlink(tmp_path / "real.data", sub / "link.data")
    with pytest.raises(ModelLoadError, match="resolves outside the model's folder"):
        load_model(external_model(sub, "link.data"))


def test_external_data_beside_the_model_loads(tmp_path: Path) -> None:
    shutil.copy(MODELS / "digits_cnn_dynamo.onnx.data", tmp_path / "w.data")
    model = load_model(external_model(tmp_path, "w.data"))
    assert all(not numpy_helper.to_array(i).size == 0 for i in model.graph.initializer)
    missing = tmp_path / "other"
    missing.mkdir()
    with pytest.raises(ModelLoadError, match="which is missing"):
        load_model(external_model(missing, "nope.data"))


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_model(onnx.load(MODELS / "digits_cnn.onnx"), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_large_models_are_written_with_external_data(tmp_path: Path) -> None:
    """Past the threshold (2 GiB in use; lowered here) weights go to <name>.data, and load back."""
    model = onnx.load(MODELS / "digits_cnn.onnx")
    target = tmp_path / "big.onnx"
    save_model(model, target, external_threshold=10_000)
    assert (tmp_path / "big.onnx.data").stat().st_size > 100_000
    assert target.stat().st_size < 50_000
    back = load_model(target)
    for a, b in zip(back.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
