"""`run --ray`, `eval --ray` and `compile --ray` on a local Ray cluster: the results of one
process, exactly (calibration: to float rounding, rtol 1e-6).

Marked ``ray`` (deselected by default; `make test-ray` installs Ray and runs them). The shard
arithmetic needs no Ray and always runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ann2snn
from ann2snn.cli import main
from ann2snn.config import CompileConfig
from ann2snn.distributed import KILL_ONCE_ENV, shards
from ann2snn.errors import ConfigError
from ann2snn.modelio import load_model
from ann2snn.pipeline import run_until

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.parametrize("n, batch, workers", [(1, 4, 2), (100, 16, 2), (100, 7, 3), (4096, 32, 2), (5, 1, 8)])
def test_shards_are_whole_batches_covering_every_sample_once(n: int, batch: int, workers: int) -> None:
    ranges = shards(n, batch, workers)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a == b_prev for (_, b_prev), (a, _) in zip(ranges, ranges[1:]))  # contiguous, no overlap
    assert all(a % batch == 0 for a, _ in ranges)  # each starts a batch one process would run
    assert len(ranges) <= max(1, workers * 4)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ray = pytest.importorskip("ray")
    d = tmp_path_factory.mktemp("ray")
    marker = d / "killed"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {KILL_ONCE_ENV: str(marker)}})
    snn = d / "digits.snn.onnx"
    ann2snn.compile(MODELS / "digits_cnn.onnx", MODELS / "data" / "digits_calib.npz", snn, iters=20)
    test = dict(np.load(MODELS / "data" / "digits_test.npz"))
    np.savez(d / "test.npz", input=test["input"], label=test["label"])
    yield {"dir": d, "snn": snn, "data": d / "test.npz", "marker": marker}
    ray.shutdown()


def invoke(*args: object) -> object:
    result = CliRunner().invoke(main, ["-q", *[str(a) for a in args]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.ray
def test_a_killed_worker_is_retried_and_nothing_is_lost_or_counted_twice(cluster: dict[str, Path]) -> None:
    """The first task kills its own worker process; Ray runs that shard again and the output
    is still exactly the one-process output."""
    assert not cluster["marker"].exists()
    d = cluster["dir"]
    invoke("run", cluster["snn"], "--input", cluster["data"], "-T", "12", "--batch-size", "16", "-o", d / "one.npz")
    invoke("run", cluster["snn"], "--input", cluster["data"], "-T", "12", "--batch-size", "16", "-o", d / "ray.npz",
           "--ray")
    assert cluster["marker"].exists()  # a worker died during the distributed run
    assert (d / "ray.npz").read_bytes() == (d / "one.npz").read_bytes()


@pytest.mark.ray
@pytest.mark.parametrize("form", ["step", "auto"])
def test_run_with_ray_writes_the_bytes_of_one_process(cluster: dict[str, Path], form: str) -> None:
    d = cluster["dir"]
    for batch in ("7", "64"):
        invoke("run", cluster["snn"], "--input", cluster["data"], "-T", "9", "--form", form, "--batch-size", batch,
               "-o", d / "one.npz")
        invoke("run", cluster["snn"], "--input", cluster["data"], "-T", "9", "--form", form, "--batch-size", batch,
               "-o", d / "ray.npz", "--ray")
        assert (d / "ray.npz").read_bytes() == (d / "one.npz").read_bytes(), batch


@pytest.mark.ray
def test_eval_with_ray_gives_the_one_process_result(cluster: dict[str, Path]) -> None:
    d = cluster["dir"]
    ann = MODELS / "digits_cnn.onnx"
    invoke("eval", ann, cluster["snn"], "--data", cluster["data"], "-T", "4,16", "--batch-size", "24",
           "--no-progress", "--json", d / "one.json")
    invoke("eval", ann, cluster["snn"], "--data", cluster["data"], "-T", "4,16", "--batch-size", "24",
           "--no-progress", "--json", d / "ray.json", "--ray")
    one, ray = json.loads((d / "one.json").read_text()), json.loads((d / "ray.json").read_text())
    assert ray["snn"] == one["snn"]  # float for float, not approximately
    assert ray["ann_accuracy"] == one["ann_accuracy"] and ray["samples"] == one["samples"]


@pytest.mark.ray
def test_ray_refuses_what_it_does_not_shard(cluster: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["eval", str(MODELS / "digits_cnn.onnx"), str(cluster["snn"]), "--data",
                                       str(cluster["data"]), "--allow-nonfinite", "--ray"])
    assert result.exit_code == 2
    assert "classification eval --ray stops at a non-finite output; drop --allow-nonfinite" in result.output


@pytest.mark.ray
def test_an_ann2snn_error_in_a_worker_reaches_the_driver_as_itself(cluster: dict[str, Path]) -> None:
    """A shard whose data file is gone raises the DataError one process would, not a Ray
    traceback, and is not retried as if its worker had died."""
    import ray

    from ann2snn.distributed import _gather, _run_shard
    from ann2snn.errors import DataError

    task = ray.remote(num_cpus=1, max_retries=3)(_run_shard)
    futures = [task.remote(str(cluster["snn"]), str(cluster["dir"] / "gone.npz"), 0, 8, 8, 4, None, "auto", False, 1)]
    with pytest.raises(DataError, match="gone.npz' does not exist"):
        _gather(ray, futures, [8], "simulating", False, lambda i, r: None)


@pytest.mark.ray
@pytest.mark.parametrize("with_ann", [False, True])
def test_report_with_ray_gives_the_one_process_report(cluster: dict[str, Path], with_ann: bool) -> None:
    d = cluster["dir"]
    extra = ["--ann", str(MODELS / "digits_cnn.onnx")] if with_ann else []
    for name, ray in (("one", []), ("ray", ["--ray"])):
        invoke("report", cluster["snn"], "--data", cluster["data"], "-T", "4,16", "--batch-size", "24",
               "--no-progress", "--json", d / f"{name}.json", *extra, *ray)
    one, ray = json.loads((d / "one.json").read_text()), json.loads((d / "ray.json").read_text())
    assert ray == one


# -- calibration (compile --ray) ----------------------------------------------------------
def _calibrated(model: Path, calib: Path, workers: int | None, **options: object) -> list:
    """The sites after calibration: in this process (workers None) or on ``workers`` Ray actors."""
    from ann2snn.data.arrays import CalibrationSource, input_specs
    from ann2snn.distributed_calibration import calibrate_ray

    proto = load_model(model)
    cfg = CompileConfig(**options)
    if workers is None:
        return run_until(proto, cfg, calib, "calibrate_thresholds").sites
    state = run_until(proto, CompileConfig(**options, ray="local"), calib, "partition_graph")
    calibrate_ray(state, CalibrationSource(calib, input_specs(proto)), workers=workers)
    return state.sites


@pytest.mark.ray
@pytest.mark.parametrize("model, calib, granularity", [
    ("digits_cnn.onnx", "digits_calib.npz", "channel"),
    ("fashion_resnet.onnx", "fashion_calib.npz", "layer"),  # residual: a site's input skips over sites
])
def test_ltb_on_two_workers_with_b_each_equals_one_process_with_2b(cluster: dict[str, Path], model: str, calib: str,
                                                                   granularity: str) -> None:
    """The issue's law: each worker's statistic for the same θ, averaged by the driver, is the
    larger batch's; site by site, so every layer is clipped with the batch's updated θ'."""
    paths = (MODELS / model, MODELS / "data" / calib)
    options = {"iters": 6, "batch": 32, "granularity": granularity}
    one = _calibrated(*paths, None, **options)
    for workers in (1, 2):
        got = _calibrated(*paths, workers, **options)
        for a, b in zip(one, got):
            assert a.node == b.node
            np.testing.assert_allclose(b.theta, a.theta, rtol=1e-6, atol=0, err_msg=f"{a.node}, {workers} workers")
            # the mean activations (for the readout delay only) differ by one process's float32 batch
            # mean, which is itself off by up to batch * 2^-24 relative
            np.testing.assert_allclose(b.mean_act, a.mean_act, rtol=1e-5, atol=1e-6 * float(a.mean_act.max()))
    assert max(float(np.abs(a.theta).max()) for a in one) > 0  # the law is not met by zeros


@pytest.mark.ray
def test_a_calibration_worker_that_dies_has_its_batch_run_again(cluster: dict[str, Path]) -> None:
    """The first actor call kills its worker process mid-batch; the batch runs again on fresh
    actors from the θ before it, and the thresholds are still one process's."""
    cluster["marker"].unlink(missing_ok=True)  # armed again (the run test above used it)
    paths = (MODELS / "digits_cnn.onnx", MODELS / "data" / "digits_calib.npz")
    one = _calibrated(*paths, None, iters=4, batch=32)
    got = _calibrated(*paths, 2, iters=4, batch=32)
    assert cluster["marker"].exists()
    for a, b in zip(one, got):
        np.testing.assert_allclose(b.theta, a.theta, rtol=1e-6, atol=0)


@pytest.mark.ray
def test_compile_with_ray_shows_one_progress_bar_over_the_workers(cluster: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["compile", str(MODELS / "digits_cnn.onnx"), "--calib",
                                       str(MODELS / "data" / "digits_calib.npz"), "--iters", "3", "-o",
                                       str(cluster["dir"] / "bar.onnx"), "--ray"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("calibrating (LTB, 2 workers)") == 1


@pytest.mark.ray
@pytest.mark.parametrize("method", ["max", "percentile"])
def test_max_and_percentile_on_workers_are_exactly_one_process(cluster: dict[str, Path], method: str) -> None:
    paths = (MODELS / "fashion_resnet.onnx", MODELS / "data" / "fashion_calib.npz")
    options = {"iters": 3, "batch": 40, "method": method, "percentile": 99.0}
    one = _calibrated(*paths, None, **options)
    got = _calibrated(*paths, 2, **options)
    for a, b in zip(one, got):
        np.testing.assert_array_equal(b.theta, a.theta)  # maxima merge exactly; the percentile sees every value
        np.testing.assert_allclose(b.mean_act, a.mean_act, rtol=1e-5, atol=1e-6 * float(a.mean_act.max()))


@pytest.mark.ray
def test_compile_with_ray_gives_the_thresholds_of_one_process(cluster: dict[str, Path]) -> None:
    from onnx import numpy_helper

    d = cluster["dir"]
    calib = MODELS / "data" / "digits_calib.npz"
    for name, ray in (("one", []), ("ray", ["--ray"])):
        invoke("compile", MODELS / "digits_cnn.onnx", "--calib", calib, "--iters", "8", "--batch", "48",
               "-o", d / f"c_{name}.onnx", *ray)
    one, ray = (load_model(d / f"c_{name}.onnx") for name in ("one", "ray"))
    theta = [{i.name: numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith("/threshold")}
             for m in (one, ray)]
    assert len(theta[0]) == 3 and theta[0].keys() == theta[1].keys()
    for k in theta[0]:
        np.testing.assert_allclose(theta[1][k], theta[0][k], rtol=1e-6, atol=0)
    meta = [json.loads(next(p.value for p in m.metadata_props if p.key == "ann2snn")) for m in (one, ray)]
    assert meta[1]["config"] == meta[0]["config"]  # --ray is how, not what: the model does not record it


@pytest.mark.ray
def test_compile_with_ray_refuses_data_it_cannot_shard_by_reference(cluster: dict[str, Path]) -> None:
    data = dict(np.load(MODELS / "data" / "digits_calib.npz"))
    with pytest.raises(ConfigError, match="--ray reads the calibration data on the workers by reference"):
        ann2snn.compile(MODELS / "digits_cnn.onnx", data, iters=2, ray="local")
    from PIL import Image

    folder = cluster["dir"] / "images" / "zero"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "a.png")
    with pytest.raises(ConfigError, match="--crop-mode random draws each crop from the sampler of one process"):
        ann2snn.compile(MODELS / "digits_cnn.onnx", folder.parent, iters=2, crop=8, crop_mode="random",
                        channel_order="L", ray="local")


# -- segmentation and detection eval --------------------------------------------------------
@pytest.fixture(scope="module")
def dense_files(cluster: dict[str, Path]) -> dict[str, Path]:
    from test_tasks import det_model, inputs, run_ort, seg_model

    import onnx

    d = cluster["dir"]
    paths = {}
    # segmentation: the label-output model, whose confusion matrix grows to the largest id seen
    for task, model, n in (("segmentation", seg_model(labels=True), 21), ("detection", det_model(), 19)):
        x = inputs(n, 7)
        y = run_ort(model, {"x": x})[0]
        onnx.save(model, d / f"{task}.onnx")
        np.savez(d / f"{task}_calib.npz", x=inputs(64, 8))
        if task == "segmentation":
            mask = y.copy()
            mask[:, 0, 0] = 255
            mask[13, :2] = 4  # an id only one shard sees: the merged matrix must grow as one process's does
            np.savez(d / f"{task}_test.npz", x=x, mask=mask)
        else:
            np.savez(d / f"{task}_test.npz", x=x, boxes=y[:, 3:7], box_labels=y[:, 1].astype(np.int64),
                     box_image=y[:, 0].astype(np.int64))
        ann2snn.compile(d / f"{task}.onnx", d / f"{task}_calib.npz", d / f"{task}.snn.onnx", iters=10, batch=32)
        paths[task] = d
    return paths


@pytest.mark.ray
@pytest.mark.parametrize("task, extra", [
    ("segmentation", ["--t0-frac", "0.5"]),
    ("detection", ["--t0", "2"]),
])
def test_dense_eval_with_ray_gives_the_one_process_figures(dense_files: dict[str, Path], task: str,
                                                           extra: list[str]) -> None:
    """Confusion matrices add (integer counts), detections concatenate in sample order: mIoU and
    mAP float for float."""
    d = dense_files[task]
    for name, ray in (("one", []), ("ray", ["--ray"])):
        invoke("eval", d / f"{task}.onnx", d / f"{task}.snn.onnx", "--data", d / f"{task}_test.npz", "--task", task,
               "-T", "8,32", "--batch-size", "4", "--no-progress", "--json", d / f"{task}_{name}.json", *extra, *ray)
    one, ray = (json.loads((d / f"{task}_{name}.json").read_text()) for name in ("one", "ray"))
    one.pop("form"), ray.pop("form")
    assert ray == one
    metric = "miou" if task == "segmentation" else "map50"
    assert all(row[metric] is not None for row in one["snn"])
