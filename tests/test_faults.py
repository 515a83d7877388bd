"""Faults: killed writers leave no partial output, Ctrl-C exits cleanly, output is
byte-identical across thread counts, huge models are written with external data."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ann2snn
from ann2snn.modelio import serialize
from conftest import MODELS, ROOT

KILLED_WRITER = """
import os, sys, time
from ann2snn.modelio import write_atomic
os.fsync = lambda fd: time.sleep(30)  # hold the process between write and rename
write_atomic(sys.argv[1], b"new" * 1_000_000)
"""


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.parametrize("existing", [False, True])
def test_killed_writer_leaves_old_file_or_nothing(tmp_path: Path, existing: bool) -> None:
    target = tmp_path / "out.onnx"
    if existing:
        target.write_bytes(b"old")
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)])
    try:
        wait_for(lambda: any(p.name.endswith(".tmp") for p in tmp_path.iterdir()))
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    if existing:
        assert target.read_bytes() == b"old"
    else:
        assert not target.exists()


def test_ctrl_c_during_compile_exits_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "m.snn.onnx"
    cmd = [sys.executable, "-m", "ann2snn", "-v", "compile", str(MODELS / "mnist_cnn.onnx"), "-o", str(out),
           "--calib", str(MODELS / "data" / "mnist_calib.npz"), "--iters", "100000", "--no-progress"]
    # a shell's background job starts with SIGINT ignored, and children inherit that: restore it
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _interrupt_and_check(child, tmp_path, out)
    finally:
        if child.poll() is None:  # never leave a 100,000-iteration compile running
            child.kill()
            child.wait()


def _interrupt_and_check(child: subprocess.Popen, tmp_path: Path, out: Path) -> None:
    seen = []
    for line in child.stderr:  # debug log: interrupt once calibration has started
        seen.append(line)
        if "pass partition_graph took" in line:
            break
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    err = "".join(seen) + err
    assert child.returncode == 130, err
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_does_not_depend_on_threads() -> None:
    blobs = {t: serialize(ann2snn.compile(MODELS / "digits_cnn.onnx", MODELS / "data" / "digits_calib.npz",
                                          threads=t, iters=50)) for t in (1, 2)}
    assert blobs[1] == blobs[2]


@pytest.mark.slow
def test_model_over_2gb_round_trips(tmp_path: Path) -> None:
    """A real > 2 GiB model (one 2.1 GB weight) is written with external data and reads back."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ann2snn.modelio import load_model, save_model

    w = np.ones((23_000, 23_000), np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 23_000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 23_000])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del w
    save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size == 23_000 * 23_000 * 4
    back = load_model(tmp_path / "big.onnx")
    assert onnx.numpy_helper.to_array(back.graph.initializer[0])[-1, -1] == 1.0
