"""Data files read a batch at a time and outputs written batch by batch (ann2snn.data.npyfile)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ann2snn.data import npyfile
from ann2snn.data.arrays import CalibrationSource, InputSpec, as_array_dict, check_arrays
from ann2snn.data.npyfile import FileArray, NpzWriter, open_arrays
from ann2snn.errors import DataError

from conftest import digits_path

RNG = np.random.default_rng(0)


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((37, 3, 4)).astype(np.float32), "label": RNG.integers(0, 9, 37),
            "scalar": np.array(2.5), "f16": RNG.standard_normal((37, 2)).astype(np.float16)}


@pytest.mark.parametrize("kind", ["npy", "npz", "npz_compressed_small", "npz_compressed_spilled"])
def test_file_arrays_read_what_numpy_reads(tmp_path: Path, arrays: dict[str, np.ndarray], kind: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if kind == "npy":
        path = tmp_path / "d.npy"
        np.save(path, arrays["x"])
        expect = {"": arrays["x"]}
    else:
        path = tmp_path / "d.npz"
        (np.savez_compressed if "compressed" in kind else np.savez)(path, **arrays)
        expect = arrays
    if kind == "npz_compressed_spilled":
        monkeypatch.setattr(npyfile, "SPILL_BYTES", 16)  # every member but the scalar goes to a temp file
    got = open_arrays(path)
    assert list(got) == list(expect)
    for k, v in expect.items():
        a = got[k]
        lazy = kind != "npz_compressed_small" and v.ndim > 0
        assert isinstance(a, FileArray) == lazy, (k, type(a))
        assert a.shape == v.shape and a.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(a), v)
        if v.ndim:
            for key in (slice(0, 5), slice(30, 99), slice(5, 5), slice(-3, None)):
                np.testing.assert_array_equal(a[key], v[key])
            np.testing.assert_array_equal(a[3], v[3])
            np.testing.assert_array_equal(a[-1], v[-1])
            index = np.array([0, 1, 2, 7, 8, 20, 36])
            np.testing.assert_array_equal(a[index], v[index])
            np.testing.assert_array_equal(a[np.array([5, 2, -1])], v[np.array([5, 2, -1])])
            with pytest.raises(IndexError):
                a[37]


def test_spilled_temp_file_is_removed_with_its_arrays(tmp_path: Path, arrays: dict[str, np.ndarray],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(npyfile, "SPILL_BYTES", 16)
    np.savez_compressed(tmp_path / "d.npz", x=arrays["x"])
    a = open_arrays(tmp_path / "d.npz")["x"]
    spilled = a.path
    assert os.path.exists(spilled) and spilled != str(tmp_path / "d.npz")
    del a
    import gc

    gc.collect()
    assert not os.path.exists(spilled)


def test_truncated_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((100, 10), np.float32))
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 100)
    a = open_arrays(path)[""]
    a[:10]  # the rows that are there read fine
    with pytest.raises(DataError, match="ends early.*truncated"):
        a[90:]


def test_checks_read_file_arrays_in_slices(tmp_path: Path) -> None:
    x = np.zeros((50, 4), np.float32)
    x[41, 2] = np.nan
    x[44, 0] = np.inf
    np.savez(tmp_path / "d.npz", x=x)
    arrays = as_array_dict(tmp_path / "d.npz", [InputSpec("x", np.dtype(np.float32), (None, 4))], "input", lazy=True)
    assert isinstance(arrays["x"], FileArray)
    with pytest.raises(DataError, match=r"2 NaN/Inf value\(s\) \(first in sample 41\)"):
        check_arrays(arrays, [InputSpec("x", np.dtype(np.float32), (None, 4))], "input")


def test_calibration_batches_from_a_file_equal_those_from_memory(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    specs = [InputSpec("x", np.dtype(np.float32), (None, 3, 4))]
    from_file = list(CalibrationSource(tmp_path / "d.npz", specs).batches(5, 8, seed=3))
    from_memory = list(CalibrationSource({"x": arrays["x"]}, specs).batches(5, 8, seed=3))
    for a, b in zip(from_file, from_memory, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The reference: the whole arrays written at once, as np.savez does, with a fixed timestamp
    (how `ann2snn run` wrote its outputs before NpzWriter)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            entry = io.BytesIO()
            np.lib.format.write_array(entry, value, allow_pickle=value.dtype.kind == "O")
            zf.writestr(info, entry.getvalue())
    return buf.getvalue()


def test_writer_writes_the_bytes_of_npz_bytes(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    out = tmp_path / "o.npz"
    with NpzWriter(out) as w:
        for i in range(0, 37, 10):
            w.append("x", arrays["x"][i:i + 10])
            w.append("f16", arrays["f16"][i:i + 10])
        w.append("empty", np.zeros((0, 3), np.float32))
        w.put("info", np.array(json.dumps({"a": 1})))
        w.put("files", np.array(["a.png", "b.png"]))
    expect = npz_bytes({"x": arrays["x"], "f16": arrays["f16"], "empty": np.zeros((0, 3), np.float32),
                        "info": np.array(json.dumps({"a": 1})), "files": np.array(["a.png", "b.png"])})
    assert out.read_bytes() == expect
    assert [p.name for p in tmp_path.iterdir()] == ["o.npz"]  # no temporary left behind


def test_writer_leaves_nothing_on_error(tmp_path: Path) -> None:
    out = tmp_path / "o.npz"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with NpzWriter(out) as w:
            w.append("x", np.zeros((4, 2), np.float32))
            raise RuntimeError("interrupted")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["o.npz"]


def test_writer_refuses_rows_that_change_shape(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="output 'y' changed from float32 \\(3,\\) to float32 \\(4,\\)"):
        with NpzWriter(tmp_path / "o.npz") as w:
            w.append("y", np.zeros((2, 3), np.float32))
            w.append("y", np.zeros((2, 4), np.float32))


def _peak_rss(args: list[str]) -> int:
    """Peak RSS in bytes of a fresh ``ann2snn ARGS`` process, read from its own /proc VmHWM at exit.

    Not the rusage of the child: Linux carries the high-water mark of the address space a
    child had before ``exec`` (the parent's, under vfork) into its ru_maxrss."""
    code = ("import atexit, sys\n"
            "def hwm():\n"
            "    kb = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "    sys.stderr.write(f'\\nVmHWM {kb}\\n')\n"
            "atexit.register(hwm)\n"
            "from ann2snn.cli import main\n"
            "sys.argv = ['ann2snn', '-q', *sys.argv[1:]]\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.rsplit("VmHWM ", 1)[1].split()[0]) * 1024


@pytest.fixture(scope="module")
def compiled_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import ann2snn

    path = tmp_path_factory.mktemp("digits") / "digits.snn.onnx"
    calib = np.load(digits_path().parent / "data" / "digits_calib.npz")
    ann2snn.compile(digits_path(), {"input": calib["input"]}, output=path, iters=5)
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
@pytest.mark.parametrize("command, suffix", [("run", ".npy"), ("run", ".npz"), ("eval", ".npz"), ("report", ".npz")])
def test_memory_does_not_grow_with_the_number_of_inputs(tmp_path: Path, compiled_digits: Path, command: str,
                                                        suffix: str) -> None:
    """``run``, ``eval`` and ``report`` on 100,000 inputs need no more memory than on 500 plus
    the outputs themselves (and a few MB of slack for the allocator): the inputs (26 MB) are
    never all in memory."""
    test = np.load(digits_path().parent / "data" / "digits_test.npz")
    base, labels = test["input"], test["label"]
    peaks = {}
    big = 100_000
    for n in (500, big):
        x = np.resize(base, (n, *base.shape[1:]))
        data = tmp_path / f"in{n}{suffix}"
        np.save(data, x) if suffix == ".npy" else np.savez(data, input=x, label=np.resize(labels, n))
        del x
        out = tmp_path / f"out{n}.npz"
        args = {"run": ["run", str(compiled_digits), "--input", str(data), "-T", "1", "-o", str(out)],
                "eval": ["eval", str(digits_path()), str(compiled_digits), "--data", str(data), "-T", "1,2",
                         "--no-progress"],
                "report": ["report", str(compiled_digits), "--data", str(data), "-T", "1,2", "--no-progress"]}[command]
        peaks[n] = _peak_rss([*args, "--batch-size", "64"])
        if command == "run":
            with np.load(out) as z:
                outputs = [k for k in z.files if k != "ann2snn_run"]
                assert [z[k].shape[0] for k in outputs] == [n] * len(outputs)
    input_bytes = big * base[0].nbytes
    # what may grow: run writes its outputs as it goes; eval keeps the ANN's and each T's outputs
    output_bytes = big * 10 * 4 * (3 if command == "eval" else 1) + big * 8 * (command != "run")
    slack = 8 << 20
    grown = peaks[big] - peaks[500]
    assert output_bytes + slack < input_bytes  # else the bound below would not tell streaming from loading
    assert grown < output_bytes + slack, f"peak RSS grew by {grown / 2**20:.1f} MB ({peaks})"


def test_run_file_outputs_do_not_depend_on_the_batch(tmp_path: Path, compiled_digits: Path) -> None:
    from ann2snn.runtime import SpikingSession
    from ann2snn.runtime.batches import default_batch_size, run_file

    x = np.load(digits_path().parent / "data" / "digits_test.npz")["input"][:300]
    np.save(tmp_path / "x.npy", x)
    default = run_file(compiled_digits, tmp_path / "x.npy", 6)
    assert default.info["batch_size"] == default_batch_size(SpikingSession(compiled_digits)) == 256
    odd = run_file(compiled_digits, tmp_path / "x.npy", 6, batch_size=7)
    assert default.outputs.keys() == odd.outputs.keys()
    for k in default.outputs:
        np.testing.assert_array_equal(default.outputs[k], odd.outputs[k])
        assert default.shapes[k] == default.outputs[k].shape
