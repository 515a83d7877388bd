"""``ann2snn inspect``: roles per node, neuron and MAC counts, unsupported nodes."""
from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner

from ann2snn.cli import main
from ann2snn.analysis.inspection import inspect_model
from conftest import MODELS, build
from test_swap_and_partition import MIDDLE


def test_mnist_roles_and_counts() -> None:
    info = inspect_model(MODELS / "mnist_cnn.onnx")
    roles = {r["node"].split("/")[-1] + ":" + r["node"].split("/")[-2]: r["role"] for r in info["nodes"]}
    assert [r["role"] for r in info["nodes"]] == [
        "prefix", "prefix", "prefix", "neuron", "prefix", "spiking", "neuron", "pooling", "spiking", "spiking",
        "neuron", "spiking"], roles
    assert info["neurons"] == 32 * 14 * 14 + 64 * 7 * 7 + 128
    conv2 = 14 * 14 * 64 * 32 * 9
    assert info["macs"] == {"total": 28 * 28 * 32 * 9 + conv2 + 3136 * 128 + 1280, "spiking": conv2 + 3136 * 128 + 1280,
                            "prefix": 28 * 28 * 32 * 9, "tail": 0}


def test_folded_tail_and_unsupported_are_reported() -> None:
    rng = np.random.default_rng(0)
    model = build(MIDDLE, {"W1": rng.normal(0, 1, (6, 4)), "W2": rng.normal(0, 1, (6, 6)), "W3": rng.normal(0, 1, (3, 6))})
    info = inspect_model(model)
    by_op = {r["op"]: r["role"] for r in info["nodes"]}
    assert by_op["ai.onnx::Sigmoid"] == "tail" and info["neuron_layers"] == 1
    assert info["macs"]["tail"] == 6 * 6 + 3 * 6 and info["boundary"] == ["k"]
    digits = inspect_model(MODELS / "digits_cnn.onnx")
    bn = [r for r in digits["nodes"] if r["op"] == "ai.onnx::BatchNormalization"]
    assert bn and all(r["role"] == "folded" and r["detail"].startswith("folded into '/conv") for r in bn)


def test_cli_inspect_text_and_json(tmp_path) -> None:
    text = """<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[N,4] x) => (float[N,4] y) { a = com.example.Warp (x)
      y = Relu (a) }"""
    odd = tmp_path / "odd.onnx"
    onnx.save(onnx.parser.parse_model(text), odd)
    r = CliRunner().invoke(main, ["inspect", str(odd)])
    assert r.exit_code == 0 and "unsupported" in r.stdout and "custom operator domain" in r.stdout
    r = CliRunner().invoke(main, ["inspect", str(MODELS / "mnist_cnn.onnx"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["neuron_layers"] == 3


def test_relu6_rows_say_whether_the_cap_is_kept(tmp_path) -> None:
    model = build("""
g (float[N,4] x, float[6,4] W1, float[2,6] W2, float lo, float hi) => (float[N,2] y) {
  h = Gemm <transB=1> (x, W1)
  r = Clip (h, lo, hi)
  y = Gemm <transB=1> (r, W2)
}""", {"W1": np.ones((6, 4)), "W2": np.ones((2, 6)), "lo": np.zeros(()), "hi": np.full((), 6.0)})
    path = tmp_path / "relu6.onnx"
    onnx.save(model, path)
    kept = CliRunner().invoke(main, ["inspect", str(path)])
    dropped = CliRunner().invoke(main, ["inspect", str(path), "--drop-clip-cap"])
    assert kept.exit_code == dropped.exit_code == 0, kept.output + dropped.output
    assert "clip cap 6 kept (thresholds <= 6)" in kept.output
    assert "clip cap 6 dropped (--drop-clip-cap)" in dropped.output
