"""--device / device=, providers=, resident=, cuda_graph=: argument checks and the no-GPU errors
on this machine; the device-resident step form against the step form, bit for bit; and, marked
``gpu`` (deselected by default, skipped without a CUDA GPU; `make test-gpu`), the same on a GPU.

The errors distinguish onnxruntime-gpu missing (no CUDAExecutionProvider among
onnxruntime.get_available_providers()) from a provider that is there but cannot make a CUDA
session (no GPU visible, CUDA libraries missing): both are simulated by monkeypatching.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import ann2snn
from ann2snn.errors import ConfigError
from ann2snn.cli import main
from ann2snn.device import CUDA_EP, DeviceError, providers_for
from ann2snn.runtime import SpikingSession
from conftest import MODELS, ROOT

CPU_ONLY = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def mnist_snn(tmp_path_factory) -> Path:
    """The MNIST CNN compiled quickly (the runtime's behaviour does not depend on its accuracy)."""
    path = tmp_path_factory.mktemp("device") / "mnist.snn.onnx"
    with np.load(MODELS / "data" / "mnist_calib.npz") as z:
        calib = {"input": z["input"][:64]}
    ann2snn.compile(MODELS / "mnist_cnn.onnx", calib, path, iters=4, batch=16)
    return path


@pytest.fixture
def no_gpu_package(monkeypatch):
    """onnxruntime as the core install has it: no CUDA provider."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(CPU_ONLY))


@pytest.fixture
def gpu_package_no_gpu(monkeypatch):
    """onnxruntime-gpu installed, no usable GPU: the provider is listed, sessions end up on the CPU."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, *CPU_ONLY])
    real = ort.InferenceSession

    def cpu_only(model, options=None, providers=None, **kw):  # what onnxruntime does when CUDA fails to load
        return real(model, options, providers=CPU_ONLY, **kw)
    monkeypatch.setattr(ort, "InferenceSession", cpu_only)


def test_device_values_are_checked() -> None:
    with pytest.raises(ann2snn.ConfigError, match=r"device must be one of cpu, cuda, got 'gpu' \(--device\)"):
        ann2snn.CompileConfig(device="gpu")
    with pytest.raises(ann2snn.ConfigError, match="device must be one of cpu, cuda"):
        providers_for("tpu")
    assert providers_for("cpu") == CPU_ONLY
    assert providers_for("cpu", ["X", "Y"]) == ["X", "Y"]  # providers are used as given


def test_cuda_graph_option_is_added_to_the_cuda_provider(gpu_package_no_gpu) -> None:
    got = providers_for("cuda", cuda_graph=True)
    assert got[0] == (CUDA_EP, {"device_id": "0", "enable_cuda_graph": "1"}) and got[1:] == CPU_ONLY
    given = providers_for("cpu", [(CUDA_EP, {"device_id": "1"}), "CPUExecutionProvider"], cuda_graph=True)
    assert given[0] == (CUDA_EP, {"device_id": "1", "enable_cuda_graph": "1"})
    with pytest.raises(ann2snn.ConfigError, match="CUDA graphs run on a GPU only"):
        providers_for("cpu", CPU_ONLY, cuda_graph=True)


def test_no_gpu_package_is_a_clear_error(no_gpu_package, mnist_snn: Path) -> None:
    missing = r"needs onnxruntime-gpu, but this onnxruntime .* has no CUDAExecutionProvider .*pip install 'ann2snn\[gpu\]'"
    with pytest.raises(DeviceError, match=missing):
        SpikingSession(mnist_snn, device="cuda")
    with pytest.raises(DeviceError, match=missing):  # before the pipeline runs
        ann2snn.CompileConfig(device="cuda")
    assert issubclass(DeviceError, ann2snn.ConfigError)


def test_gpu_package_without_gpu_is_another_error(gpu_package_no_gpu, mnist_snn: Path) -> None:
    with pytest.raises(DeviceError, match=r"onnxruntime-gpu is installed but could not use the GPU .*nvidia-smi"):
        SpikingSession(mnist_snn, device="cuda")


def test_cuda_session_creation_failure_is_reported(monkeypatch, mnist_snn: Path) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, *CPU_ONLY])

    def failing(*args, **kw):
        raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected\nmore lines")
    monkeypatch.setattr(ort, "InferenceSession", failing)
    with pytest.raises(DeviceError, match=r"could not create a CUDA session for .*: CUDA failure 100: no CUDA-capable "
                                          r"device is detected; check that a GPU is visible"):
        SpikingSession(mnist_snn, device="cuda")


def test_argument_checks(gpu_package_no_gpu, mnist_snn: Path) -> None:
    with pytest.raises(ann2snn.ConfigError, match=r"cuda_graph=True \(--cuda-graph\) needs device='cuda'"):
        SpikingSession(mnist_snn, cuda_graph=True)
    with pytest.raises(ann2snn.ConfigError, match="cuda_graph=True needs resident=True"):
        SpikingSession(mnist_snn, device="cuda", cuda_graph=True, resident=False)
    with pytest.raises(ann2snn.ConfigError, match=r"kernels run on the CPU only: drop kernels=True"):
        SpikingSession(mnist_snn, device="cuda", kernels=True)
    with pytest.raises(ann2snn.ConfigError, match="providers is a list"):
        SpikingSession(mnist_snn, providers="CPUExecutionProvider")


def test_explicit_cpu_providers(mnist_snn: Path) -> None:
    x = {"input": np.load(MODELS / "data" / "mnist_test.npz")["input"][:2]}
    a = SpikingSession(mnist_snn, providers=["CPUExecutionProvider"]).run(x, 6)
    b = SpikingSession(mnist_snn).run(x, 6)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def _cli(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_device_errors(no_gpu_package, mnist_snn: Path, tmp_path: Path) -> None:
    data = MODELS / "data" / "mnist_test.npz"
    for args in (["run", mnist_snn, "--input", data, "-T", "4", "-o", tmp_path / "o.npz", "--device", "cuda"],
                 ["eval", MODELS / "mnist_cnn.onnx", mnist_snn, "--data", data, "-T", "4", "--device", "cuda"],
                 ["report", mnist_snn, "--data", data, "-T", "4", "--device", "cuda"],
                 ["compile", MODELS / "mnist_cnn.onnx", "--calib", MODELS / "data" / "mnist_calib.npz", "-o",
                  tmp_path / "m.onnx", "--device", "cuda"]):
        result = _cli(*args)
        assert result.exit_code == 2, (args[0], result.output)
        assert "needs onnxruntime-gpu" in result.output and "ann2snn[gpu]" in result.output, result.output
    assert not (tmp_path / "o.npz").exists() and not (tmp_path / "m.onnx").exists()
    result = _cli("run", mnist_snn, "--input", data, "-T", "4", "-o", tmp_path / "o.npz", "--cuda-graph")
    assert result.exit_code == 2 and "needs device='cuda' (--device cuda)" in result.output
    result = _cli("eval", MODELS / "mnist_cnn.onnx", mnist_snn, "--data", data, "--device", "cuda", "--ray")
    assert result.exit_code == 2 and "--ray runs its workers on CPUs" in result.output


def test_cli_device_cpu_runs(mnist_snn: Path, tmp_path: Path) -> None:
    data = MODELS / "data" / "mnist_test.npz"
    result = _cli("run", mnist_snn, "--input", data, "-T", "4", "-o", tmp_path / "o.npz", "--device", "cpu")
    assert result.exit_code == 0, result.output


# -- the device-resident step form on the CPU -----------------------------------------------------
def test_resident_runs_and_repeats(mnist_snn: Path) -> None:
    """Readouts at several T and windows, two batch sizes in turn, one session: the step form's
    bytes every time; states stay on the device, so step() afterwards starts from rest."""
    x = np.load(MODELS / "data" / "mnist_test.npz")["input"][:5]
    step = SpikingSession(mnist_snn, mode="step", guard=False)
    resident = SpikingSession(mnist_snn, mode="step", resident=True)
    for batch in (5, 2, 5):
        feeds = {"input": x[:batch]}
        want = step.run_many(feeds, [1, 4, 9, 13], t0=2)
        got = resident.run_many(feeds, [1, 4, 9, 13], t0=2)
        assert resident.last_form == "resident"
        for T in want:
            for k in want[T]:
                assert got[T][k].tobytes() == want[T][k].tobytes(), (batch, T, k)
    assert resident.guard_verdicts == {("resident", 5, 0): True, ("resident", 2, 0): True}
    resident.step(feeds)  # from rest, as after reset()
    ref = SpikingSession(mnist_snn, mode="reference")
    ref.reset(5)
    assert resident.readout()[ref.output_names[0]].tobytes() == (ref.step(feeds), ref.readout())[1][
        ref.output_names[0]].tobytes()


def test_resident_is_not_the_cpu_default(mnist_snn: Path) -> None:
    s = SpikingSession(mnist_snn, mode="step")
    assert not s.resident and s._resident is None and s.device == "cpu"
    s.run({"input": np.load(MODELS / "data" / "mnist_test.npz")["input"][:3]}, 4)
    assert s.last_form == "step"


# -- the benchmark script -------------------------------------------------------------------------
def test_gpu_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.py --device cpu --quick: the whole script on tiny settings."""
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "| fashion_vgg |" in text and "| mobilenet_v2" in text and "CPU" in text, text


def test_gpu_benchmark_without_gpu_says_so() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    if CUDA_EP in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no CUDA GPU" in proc.stderr


# -- on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name,data", [("mnist_cnn", "mnist"), ("fashion_resnet", "fashion")])
def test_gpu_resident_matches_the_cpu(name: str, data: str, tmp_path: Path) -> None:
    """On the GPU the resident form, with and without CUDA graphs, reads out what the CPU does
    (the GPU's convolutions sum in another order, so a spike may flip at a threshold: the top-1
    class and the mean output are compared, not the bytes), in captured replays too; and the
    calibration runs there."""
    with np.load(MODELS / "data" / f"{data}_calib.npz") as z:
        calib = {"input": z["input"][:64]}
    path = tmp_path / f"{name}.snn.onnx"
    ann2snn.compile(MODELS / f"{name}.onnx", calib, path, iters=4, batch=16)
    x = {"input": np.load(MODELS / "data" / f"{data}_test.npz")["input"][:8]}
    cpu = SpikingSession(path).run_many(x, [4, 16])
    gpu = SpikingSession(path, device="cuda")
    graph = SpikingSession(path, device="cuda", cuda_graph=True)
    assert gpu.resident and gpu._resident is not None
    for _ in range(2):  # CUDA graphs are captured after onnxruntime's warm-up runs: replays too
        a, b = gpu.run_many(x, [4, 16]), graph.run_many(x, [4, 16])
        assert gpu.last_form == graph.last_form == "resident"
        for T in cpu:
            for k, ref in cpu[T].items():
                for got in (a[T][k], b[T][k]):
                    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75, (T, k)
                    assert np.abs(got - ref).mean() <= 0.05 * max(float(np.abs(ref).mean()), 1e-6), (T, k)
    compiled = ann2snn.compile(MODELS / f"{name}.onnx", calib, iters=4, batch=16, device="cuda")
    assert isinstance(compiled, onnx.ModelProto)


def test_ray_calibration_with_cuda_is_refused() -> None:
    """compile --ray calibrates on CPU workers: asking for the GPU too is refused before anything runs."""
    from ann2snn import CompileConfig

    with pytest.raises(ConfigError, match="drop --ray"):
        CompileConfig(ray="local", device="cuda")
