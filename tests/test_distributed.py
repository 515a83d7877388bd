"""`run --ray` and `eval --ray` on a local Ray cluster: the results of one process, exactly.

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
from ann2snn.distributed import KILL_ONCE_ENV, shards

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
                                       str(cluster["data"]), "--task", "segmentation", "--ray"])
    assert result.exit_code == 2
    assert "--ray shards run, report and classification eval for now" in result.output


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
