"""Smoke test of an installed ann2snn wheel, run from a clean virtual environment.

Builds a tiny ReLU network with onnx.helper, compiles it through the installed package and
its console script, runs the SNN, and checks that the package imported is the installed one.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main() -> None:
    import ann2snn
    import ann2snn.analysis.report  # noqa: F401  (every subpackage is in the wheel)
    import ann2snn.cli  # noqa: F401
    import ann2snn.data.images  # noqa: F401
    import ann2snn.export.nir  # noqa: F401
    from ann2snn.runtime import SpikingSession

    where = Path(ann2snn.__file__).resolve()
    assert "site-packages" in where.parts, f"ann2snn imported from {where}, not from the installed wheel"
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["a"]),
         helper.make_node("Gemm", ["a", "W2"], ["y"], transB=1)], "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(rng.normal(0, 1, (8, 4)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.normal(0, 1, (2, 8)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        path, calib, out = Path(tmp) / "m.onnx", Path(tmp) / "c.npz", Path(tmp) / "m.snn.onnx"
        onnx.save(model, path)
        np.savez(calib, x=rng.uniform(0, 1, (64, 4)).astype(np.float32))
        exe = Path(sys.executable).parent / "ann2snn"
        subprocess.run([str(exe), "compile", str(path), "-o", str(out), "--calib", str(calib), "--iters", "10"],
                       check=True)
        y = SpikingSession(out).run({"x": np.ones((3, 4), np.float32)}, 32)["y"]
        assert y.shape == (3, 2) and np.all(np.isfinite(y))
    print(f"wheel smoke test passed: ann2snn {ann2snn.__version__} from {where.parent}")


if __name__ == "__main__":
    main()
