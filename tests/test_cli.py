"""The CLI: the happy path, and bad input that gets a clean error, an exit code and no output file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from ann2snn.cli import main
from conftest import build, cnn_weights, CNN_TEXT


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "cnn.onnx"
    onnx.save(build(CNN_TEXT, cnn_weights()), model)
    x = np.random.default_rng(0).uniform(0, 1, (128, 1, 8, 8)).astype(np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    test = tmp_path / "test.npz"
    np.savez(test, x=x[:64], label=np.zeros(64, np.int64))
    return {"model": model, "calib": calib, "test": test, "dir": tmp_path}


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compile_run_eval(files) -> None:
    out = files["dir"] / "cnn.snn.onnx"
    r = invoke("compile", files["model"], "-o", out, "--calib", files["calib"], "--iters", "20", "--batch", "32")
    assert r.exit_code == 0, r.output
    assert "2 neuron layer(s)" in r.stdout
    r = invoke("run", out, "--input", files["test"], "-T", "16", "-o", files["dir"] / "y.npz")
    assert r.exit_code == 0, r.output
    assert np.load(files["dir"] / "y.npz")["y"].shape == (64, 3)
    r = invoke("eval", files["model"], out, "--data", files["test"], "-T", "4,16", "--json", files["dir"] / "e.json")
    assert r.exit_code == 0, r.output
    assert "| 16 |" in r.stdout and (files["dir"] / "e.json").exists()


def test_compile_is_byte_identical(files) -> None:
    a, b = files["dir"] / "a.onnx", files["dir"] / "b.onnx"
    for p in (a, b):
        assert invoke("compile", files["model"], "-o", p, "--calib", files["calib"], "--iters", "10").exit_code == 0
    assert a.read_bytes() == b.read_bytes()


def expect_error(args: list, code: int, pattern: str, out: Path) -> None:
    r = invoke(*args)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert pattern in r.stderr, r.stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary file left behind


def test_not_onnx_and_truncated(files) -> None:
    out = files["dir"] / "o.onnx"
    junk = files["dir"] / "junk.onnx"
    junk.write_bytes(b"this is not a model")
    expect_error(["compile", junk, "-o", out, "--calib", files["calib"]], 3, "is not an ONNX model", out)
    cut = files["dir"] / "cut.onnx"
    cut.write_bytes(files["model"].read_bytes()[:300])
    expect_error(["compile", cut, "-o", out, "--calib", files["calib"]], 3, "cut.onnx", out)
    expect_error(["compile", files["dir"] / "missing.onnx", "-o", out, "--calib", files["calib"]], 3, "does not exist", out)


def test_unsupported_ops_are_all_listed(files) -> None:
    text = """<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[N,4] x) => (float[N,4] y) {
      a = com.example.Warp (x)
      b = RandomNormalLike (a)
      c = Relu (b)
      y = com.example.Unwarp (c)
    }"""
    model = onnx.parser.parse_model(text)
    for i, n in enumerate(model.graph.node):
        n.name = f"node_{i}"
    path = files["dir"] / "odd.onnx"
    onnx.save(model, path)
    np.savez(files["dir"] / "c4.npz", x=np.ones((4, 4), np.float32))
    out = files["dir"] / "o.onnx"
    r = invoke("compile", path, "-o", out, "--calib", files["dir"] / "c4.npz")
    assert r.exit_code == 3 and not out.exists()
    for name, op in [("node_0", "com.example::Warp"), ("node_1", "ai.onnx::RandomNormalLike"),
                     ("node_3", "com.example::Unwarp")]:
        assert f"node '{name}' ({op})" in r.stderr


@pytest.mark.parametrize("arrays,pattern", [
    ({"img": np.zeros((8, 1, 8, 8), np.float32)}, "has no array for model input(s) 'x'; it has 'img'"),
    ({"x": np.zeros((8, 1, 7, 7), np.float32)}, "has shape (8, 1, 7, 7) but the model expects [N, 1, 8, 8]"),
    ({"x": np.zeros((8, 1, 8, 8), np.float64)}, "has dtype float64 but the model expects float32"),
    ({"x": np.full((8, 1, 8, 8), np.nan, np.float32)}, "contains 512 NaN/Inf value(s)"),
    ({"x": np.zeros((0, 1, 8, 8), np.float32)}, "is empty"),
])
def test_bad_calibration_data(files, arrays, pattern) -> None:
    calib = files["dir"] / "bad.npz"
    np.savez(calib, **arrays)
    out = files["dir"] / "o.onnx"
    expect_error(["compile", files["model"], "-o", out, "--calib", calib], 4, pattern, out)


def test_bad_timesteps_and_options(files) -> None:
    snn = files["dir"] / "s.onnx"
    assert invoke("compile", files["model"], "-o", snn, "--calib", files["calib"], "--iters", "5").exit_code == 0
    out = files["dir"] / "y.npz"
    expect_error(["run", snn, "--input", files["test"], "-T", "0", "-o", out], 2, "T must be a positive", out)
    expect_error(["eval", files["model"], snn, "--data", files["test"], "-T", "8,-1"], 2, "T must be a positive", out)
    expect_error(["compile", files["model"], "-o", out, "--calib", files["calib"], "--iters", "0"], 2,
                 "iters must be a positive", out)
    expect_error(["run", files["model"], "--input", files["test"], "-T", "4", "-o", out], 3,
                 "not a compiled spiking model", out)


def test_help_and_version() -> None:
    r = invoke("--help")
    assert r.exit_code == 0 and all(c in r.stdout for c in ("compile", "run", "eval"))
    assert "0.1.0" in invoke("--version").stdout


def test_memory_limit_is_checked_before_simulating(files) -> None:
    snn = files["dir"] / "s.onnx"
    assert invoke("compile", files["model"], "-o", snn, "--calib", files["calib"], "--iters", "5").exit_code == 0
    out = files["dir"] / "y.npz"
    expect_error(["run", snn, "--input", files["test"], "-T", "4", "-o", out, "--max-memory", "0.000001"], 5,
                 "simulating a batch of 64 needs about", out)
    r = invoke("eval", files["model"], snn, "--data", files["test"], "-T", "4", "--max-memory", "0.000001")
    assert r.exit_code == 5 and "raise --max-memory" in r.stderr
    assert invoke("run", snn, "--input", files["test"], "-T", "4", "-o", out, "--max-memory", "1").exit_code == 0


def test_config_file_mirrors_flags_and_flags_override(files) -> None:
    cfg = files["dir"] / "c.toml"
    cfg.write_text('iters = 7\nbatch = 32\ngranularity = "layer"\nkeep-clip-cap = false\n[eval]\nT = "4,8"\n')
    out = files["dir"] / "m.onnx"
    r = invoke("compile", files["model"], "-o", out, "--calib", files["calib"], "--config", cfg, "--batch", "16")
    assert r.exit_code == 0, r.output
    meta = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["ann2snn"])
    assert (meta["config"]["iters"], meta["config"]["batch"], meta["config"]["granularity"]) == (7, 16, "layer")
    assert meta["config"]["keep_clip_cap"] is False
    r = invoke("eval", files["model"], out, "--data", files["test"], "--config", cfg)
    assert r.exit_code == 0 and "| 8 |" in r.stdout and "| 16 |" not in r.stdout
    cfg.write_text("itters = 3\n")
    r = invoke("compile", files["model"], "-o", out, "--calib", files["calib"], "--config", cfg)
    assert r.exit_code == 2 and "has key 'itters', which is no flag of 'compile'" in r.stderr


def test_compile_report(files) -> None:
    out, rep = files["dir"] / "m.onnx", files["dir"] / "r.json"
    r = invoke("compile", files["model"], "-o", out, "--calib", files["calib"], "--iters", "6", "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    import hashlib

    assert report["input"]["sha256"] == hashlib.sha256(files["model"].read_bytes()).hexdigest()
    assert report["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert report["options"]["iters"] == 6 and report["seed"] == 0
    assert report["calibration"] == {"method": "ltb", "batches": 6, "samples": 6 * 64}
    assert report["partition"]["neuron_layers"] == 2 and len(report["thresholds"]) == 2
    assert {"onnx", "onnxruntime", "ann2snn"} <= set(report["versions"])
    assert report["timings_s"]["total"] >= report["timings_s"]["calibrate_thresholds"] > 0


def test_compile_signed_neurons_then_run_eval_report(files) -> None:
    out = files["dir"] / "cnn.signed.snn.onnx"
    r = invoke("compile", files["model"], "-o", out, "--calib", files["calib"], "--iters", "20", "--neuron", "signed")
    assert r.exit_code == 0, r.output
    assert "readout t0 = 0" in r.stdout
    snn = onnx.load(out)
    assert {n.op_type for n in snn.graph.node if n.domain == "ann2snn"} == {"SignedIFNeuron"}
    r = invoke("eval", files["model"], out, "--data", files["test"], "-T", "4,16", "--json", files["dir"] / "e.json")
    assert r.exit_code == 0, r.output
    r = invoke("report", out, "--data", files["test"], "-T", "8", "--json", files["dir"] / "r.json")
    assert r.exit_code == 0, r.output
    assert json.loads((files["dir"] / "r.json").read_text())["snn"][0]["sops_per_input"] > 0
    r = invoke("compile", files["model"], "-o", files["dir"] / "x.onnx", "--calib", files["calib"], "--neuron", "lif")
    assert r.exit_code == 2 and "signed" in r.output


def test_quiet_prints_nothing_but_results(files) -> None:
    """-q: no 'wrote ...' lines, no progress; tables that are the command's result stay."""
    out = files["dir"] / "q.snn.onnx"
    r = invoke("-q", "compile", files["model"], "-o", out, "--calib", files["calib"], "--iters", "5")
    assert r.exit_code == 0 and r.output == "", r.output
    r = invoke("-q", "run", out, "--input", files["test"], "-T", "4", "-o", files["dir"] / "q.npz")
    assert r.exit_code == 0 and r.output == "", r.output
    r = invoke("-q", "eval", files["model"], out, "--data", files["test"], "-T", "4")
    assert r.exit_code == 0 and "| 4 |" in r.stdout
