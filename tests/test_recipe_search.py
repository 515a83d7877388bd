"""The recipe search (``compile --target-T``, issue 15) and the convergence probe.

The search holds out a seeded part of the calibration data, scores candidate recipes on it
at the target T, records what it tried (metadata, --report) and compiles the best on the whole
set: the recorded options alone give the same model. It respects its time budget, refuses a
calibration set too small to split, and never writes a model below its agreement floor.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import MODELS, build

import ann2snn
from ann2snn.analysis.probe import format_probe, probe_layers
from ann2snn.cli import main
from ann2snn.errors import DataError, SearchError
from ann2snn.modelio import serialize
from ann2snn.search import Recipe, candidates, choose, format_search, holdout_size, split_calibration

DIGITS = MODELS / "digits_cnn.onnx"
DIGITS_CALIB = MODELS / "data" / "digits_calib.npz"
OLD = MODELS / "old_exports"
#: few LTB iterations keep the suite fast; the search's behaviour does not depend on them
FAST = {"iters": 20, "batch": 32}


def search_record(model) -> dict:
    return json.loads({p.key: p.value for p in model.metadata_props}["ann2snn.search"])


def without_search(model):
    keep = [p for p in model.metadata_props if p.key != "ann2snn.search"]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    return model


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """The digits CNN compiled with a search at T = 16, with its report."""
    report = tmp_path_factory.mktemp("search") / "report.json"
    snn = ann2snn.compile(DIGITS, DIGITS_CALIB, target_T=16, search_budget=60, report=report, **FAST)
    return snn, json.loads(report.read_text())


def test_search_records_every_candidate_and_the_choice(searched) -> None:
    snn, report = searched
    record = search_record(snn)
    assert record["target_T"] == 16
    assert record["holdout"] == {"seed": 0, "held_out": 75, "calibration": 225, "stats_calibration": 225}
    tried = [c for c in record["candidates"] if c["status"] == "scored"]
    assert len(tried) >= 3
    for c in tried:
        assert set(c["options"]) == {"method", "granularity", "neuron", "burst", "keep_clip_cap", "resolution"}
        assert 0.0 <= c["agreement"] <= 1.0 and c["relative_error"] >= 0.0
        assert "seconds" not in c  # the model's bytes do not depend on timings
    chosen = next(c for c in record["candidates"] if c["recipe"] == record["chosen_recipe"])
    assert chosen["agreement"] >= max(c["agreement"] for c in tried) - 1 / 75 - 1e-9
    # the report has the same record with seconds, and the chosen options as its options
    assert all("seconds" in c for c in report["search"]["candidates"] if c["status"] == "scored")
    assert report["options"] == record["chosen"]
    assert report["search"]["seconds"] > 0
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    # options at their defaults that came later (resolution) are left out of the recorded config
    assert {k: meta["config"].get(k, getattr(ann2snn.CompileConfig, k)) for k in chosen["options"]} == chosen["options"]


def test_chosen_recipe_is_reproducible_from_the_report(searched) -> None:
    snn, report = searched
    again = ann2snn.compile(DIGITS, DIGITS_CALIB, **report["options"])
    assert serialize(without_search(snn.__deepcopy__({}))) == serialize(again)
    assert not any(p.key == "ann2snn.search" for p in again.metadata_props)


def test_tiny_budget_stops_after_the_first_candidate() -> None:
    snn = ann2snn.compile(DIGITS, DIGITS_CALIB, target_T=8, search_budget=0.001, **FAST)
    statuses = [c["status"] for c in search_record(snn)["candidates"]]
    assert statuses[0] == "scored"
    assert set(statuses[1:]) == {"skipped (budget)"}
    assert search_record(snn)["chosen_recipe"] == search_record(snn)["candidates"][0]["recipe"]


def test_too_small_calibration_set_is_an_error_naming_the_fix() -> None:
    x = np.load(DIGITS_CALIB)["input"][:20]
    with pytest.raises(DataError, match=r"has 20 samples, too few for the recipe search.*holds out 16.*needs 32 or "
                                       r"more.*--calib"):
        ann2snn.compile(DIGITS, {"input": x}, target_T=16)
    snn = ann2snn.compile(DIGITS, {"input": x}, **FAST)  # without a search the same data compile
    assert not any(p.key == "ann2snn.search" for p in snn.metadata_props)


def test_iterable_calibration_cannot_be_split() -> None:
    x = np.load(DIGITS_CALIB)["input"]
    with pytest.raises(DataError, match="needs calibration data as a .npz/.npy file, arrays or images"):
        ann2snn.compile(DIGITS, [{"input": x[:64]}, {"input": x[64:128]}], target_T=16)


def test_nothing_acceptable_is_an_error_with_the_figures_and_writes_nothing(tmp_path) -> None:
    out = tmp_path / "m.snn.onnx"
    with pytest.raises(SearchError, match=r"(?s)agrees with the ANN on .*% of the 8 held-out samples.*below "
                                          r"--min-agreement 1.*\| 1 \| .*--min-agreement 0 writes the best recipe "
                                          r"anyway \(its options: --method ") as info:
        ann2snn.compile(OLD / "squeezenet.onnx", OLD / "calib.npz", out, target_T=2, search_budget=0.001,
                        min_agreement=1.0)
    assert not out.exists()
    assert info.value.record["candidates"][0]["status"] == "scored"
    # the floor at 0 writes the best recipe
    ann2snn.compile(OLD / "squeezenet.onnx", OLD / "calib.npz", out, target_T=2, search_budget=0.001,
                    min_agreement=0.0)
    assert out.exists()


def test_cli_prints_the_table_and_checks_the_floor_option(tmp_path) -> None:
    out = tmp_path / "d.snn.onnx"
    args = ["compile", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB), "--iters", "20", "--batch", "32",
            "--target-T", "8", "--search-budget", "0.001", "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    # a budget this small also holds out the fewest samples (scoring must fit the budget)
    assert "recipe search at T = 8: 8 held-out samples" in r.output and "(chosen)" in r.output
    assert "skipped (budget)" in r.output
    r = CliRunner().invoke(main, [*args[:-1], "--min-agreement", "1.01"])
    assert r.exit_code == 2 and "min_agreement is a fraction in [0, 1]" in r.output


def test_split_is_seeded_disjoint_and_complete() -> None:
    calib, held = split_calibration(300, 0)
    assert len(held) == 75 and len(calib) == 225
    assert set(calib) | set(held) == set(range(300)) and not set(calib) & set(held)
    assert np.array_equal(split_calibration(300, 0)[1], held)
    assert not np.array_equal(split_calibration(300, 1)[1], held)
    assert len(split_calibration(5000, 0)[1]) == 256  # capped: scoring time does not grow with the set


def test_holdout_shrinks_for_costly_models_but_not_below_the_minimum() -> None:
    assert holdout_size(300, 100_000, 64, 120.0) == 75  # the digits CNN: a quarter
    assert holdout_size(256, 300_000_000, 64, 120.0) == 8  # MobileNetV2-sized: the floor for costly models
    assert 16 < holdout_size(1000, 20_000_000, 64, 120.0) < 250
    assert holdout_size(1000, 140_000_000, 64, 120.0) == 16  # 16 still fit in a quarter of the budget
    assert holdout_size(1000, 150_000_000, 64, 120.0) == 15  # 15 do: what fits, down to the costly floor


def test_candidates_skip_what_cannot_differ_and_order_by_T() -> None:
    small, large = candidates(64, has_cap=False), candidates(256, has_cap=False)
    assert all(r.keep_clip_cap for r in small) and len(small) == len(set(small)) == 12
    capped = candidates(64, has_cap=True)
    assert len(capped) == 28 and sum(not r.keep_clip_cap for r in capped) == 14
    assert small[0] == Recipe("ltb", "channel", "signed", 2)
    # measured on EfficientNet-Lite1, then the recipe measured on MobileNetV2
    assert capped[:3] == [Recipe("percentile", "layer", "signed", 4, resolution=2),
                          Recipe("percentile", "channel", "signed", 4, resolution=2),
                          Recipe("percentile", "channel", "signed", 2)]
    assert len(candidates(128, has_cap=True)) == 24
    assert large[0] == Recipe("max", "channel", "signed", 2)
    assert Recipe("percentile", "channel", "signed", 2, False).label == "percentile/channel signed burst 2, cap dropped"


def test_choice_ties_agreements_within_one_held_out_sample() -> None:
    a = {"agreement": 0.90, "relative_error": 0.30}
    b = {"agreement": 0.88, "relative_error": 0.10}  # one sample of 50 fewer: tied, lower error wins
    c = {"agreement": 0.80, "relative_error": 0.01}
    assert choose([a, b, c], 50) is b
    assert choose([a, b, c], 500) is a


def test_config_rejects_bad_search_options() -> None:
    with pytest.raises(ann2snn.ConfigError, match="--target-T"):
        ann2snn.CompileConfig(target_T=-1)
    with pytest.raises(ann2snn.ConfigError, match="--search-budget"):
        ann2snn.CompileConfig(search_budget=0)


def test_probe_finds_the_clipping_floor_and_bursts_lift_it() -> None:
    """The old-export SqueezeNet with LTB thresholds: the SNN's output error at large T sits on
    the clipped ANN's, which is far from 0; bursts of 2 lift the neurons' ceiling to 2θ."""
    x = np.load(OLD / "test.npz")["input"][:8]
    ltb = probe_layers(OLD / "squeezenet.onnx", OLD / "calib.npz", {"input": x}, [16, 512])
    out = ltb["output"]
    assert out["clip_error"] > 0.05
    assert abs(out["snn_error"][512] - out["clip_error"]) < 0.3 * out["clip_error"]
    assert any(layer["clipped_fraction"] > 0 for layer in ltb["layers"])
    assert len(ltb["layers"]) == 13 and "clip error" in format_probe(ltb)
    burst = probe_layers(OLD / "squeezenet.onnx", OLD / "calib.npz", {"input": x}, [16, 512], neuron="signed", burst=2)
    assert burst["output"]["clip_error"] < 0.5 * out["clip_error"]
    assert burst["output"]["snn_error"][512] < 0.5 * out["snn_error"][512]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeezenet", "shufflenet", "inception", "densenet", "alexnet", "googlenet"])
def test_old_export_converges_with_the_chosen_recipe(name: str) -> None:
    """Issue 15's target: with the recipe the search chooses, the error at T = 256 is at most
    half that at T = 64 (the default LTB IF recipe levels off: benchmarks/results/recipe_search.md)."""
    from ann2snn.runtime import SpikingSession

    x = np.load(OLD / "test.npz")["input"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(OLD / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    snn = ann2snn.compile(OLD / f"{name}.onnx", OLD / "calib.npz", target_T=64, min_agreement=0.0)
    runs = SpikingSession(snn).run_many({"input": x}, [64, 256])
    err = {T: float(np.abs(runs[T]["logits"] - ref).mean() / np.abs(ref).mean()) for T in (64, 256)}
    assert err[256] <= 0.5 * err[64], err


def test_probe_command_prints_a_row_per_layer_and_writes_json(tmp_path) -> None:
    data = tmp_path / "x.npy"
    np.save(data, np.load(OLD / "test.npz")["input"][:4])
    r = CliRunner().invoke(main, ["probe", str(OLD / "squeezenet.onnx"), "--calib", str(OLD / "calib.npz"),
                                  "--data", str(data), "-T", "8,32", "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert r.output.count("| /features/") == 13 and "output `logits`" in r.output
    result = json.loads((tmp_path / "p.json").read_text())
    assert set(result["output"]["snn_error"]) == {"8", "32"}


CAPPED_TEXT = """
g (float[N,4] x, float[8,4] W1, float[8] b1, float[3,8] W2, float[3] b2) => (float[N,3] y) {
  h = Gemm <transB=1> (x, W1, b1)
  r = Clip <min=0.0, max=1.0> (h)
  y = Gemm <transB=1> (r, W2, b2)
}
"""


def test_bursts_never_let_a_capped_neuron_exceed_its_cap() -> None:
    """A ReLU6-style cap kept (θ <= c): a neuron with bursts of N may stand for up to N·θ, so at
    a capped site its burst is limited to max(1, floor(c/θ)) per channel; the SNN then converges
    to the capped ANN. Without the cap the shared scalar burst stays."""
    from conftest import build

    from ann2snn.runtime import SpikingSession

    rng = np.random.default_rng(0)
    model = build(CAPPED_TEXT, {"W1": rng.normal(0, 1, (8, 4)), "b1": rng.normal(0, 0.5, 8),
                                "W2": rng.normal(0, 1, (3, 8)), "b2": np.zeros(3)}, opset=10)
    x = rng.normal(0, 1, (256, 4)).astype(np.float32)
    snn = ann2snn.compile(model, x, method="max", neuron="signed", burst=2)
    limits = {i.name: onnx_array(i) for i in snn.graph.initializer if "max_spikes" in i.name}
    assert list(limits) == ["Clip_3/max_spikes_per_step"] and np.all(limits["Clip_3/max_spikes_per_step"] == 1)
    ref = run_model(model, x)
    y = SpikingSession(snn).run({"x": x}, 256)["y"]
    assert np.abs(y - ref).mean() / np.abs(ref).mean() < 0.02
    dropped = ann2snn.compile(model, x, method="max", neuron="signed", burst=2, keep_clip_cap=False)
    assert [i.name for i in dropped.graph.initializer if "max_spikes" in i.name] == ["ann2snn/max_spikes_per_step"]


def onnx_array(tensor) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def run_model(model, x: np.ndarray) -> np.ndarray:
    from conftest import run_ort

    return run_ort(model, {"x": x})[0]


def test_a_candidate_from_the_shared_calibration_is_the_full_compile() -> None:
    """Candidates that share a calibration are emitted from copies of one calibrated state; each
    must be byte for byte what a full compile of its options gives."""
    from ann2snn.config import CompileConfig
    from ann2snn.modelio import load_model
    from ann2snn.passes.emit_spiking import emit_spiking
    from ann2snn.search import _calibrated

    proto = load_model(DIGITS)
    x = {"input": np.load(DIGITS_CALIB)["input"][:100]}
    cache: dict = {}
    for neuron, burst in (("signed", 2), ("if", 1), ("signed", 1)):
        cfg = CompileConfig(neuron=neuron, burst=burst, **FAST)
        shared = emit_spiking(_calibrated(proto, cfg, x, cache))
        assert serialize(shared) == serialize(ann2snn.compile(proto, x, neuron=neuron, burst=burst, **FAST))
    assert len(cache) == 1


def chain_net(depth: int, seed: int = 0) -> onnx.ModelProto:
    """``depth`` MatMul + ReLU layers of width 8 in one chain, then a linear output of 4: a deep network
    (for the default search rule) that costs nothing to simulate. Weights keep the activations alive."""
    rng = np.random.default_rng(seed)
    lines, weights, prev = [], {}, "x"
    for i in range(depth):
        weights[f"w{i}"] = (np.eye(8) + 0.3 * rng.standard_normal((8, 8))).astype(np.float32)
        lines += [f"m{i} = MatMul({prev}, w{i})", f"h{i} = Relu(m{i})"]
        prev = f"h{i}"
    weights["wo"] = rng.standard_normal((8, 4)).astype(np.float32)
    lines.append(f"y = MatMul({prev}, wo)")
    inputs = ", ".join(f"float[8, 8] w{i}" for i in range(depth))
    text = f"net (float[N, 8] x, {inputs}, float[8, 4] wo) => (float[N, 4] y) {{\n" + "\n".join(lines) + "\n}"
    return build(text, weights)


def chain_calib() -> dict[str, np.ndarray]:
    return {"x": np.abs(np.random.default_rng(1).standard_normal((96, 8))).astype(np.float32)}


def test_deep_network_without_recipe_options_searches_by_default(caplog) -> None:
    from ann2snn.config import DEEP_CHAIN, DEFAULT_TARGET_T
    from ann2snn.search import neuron_depth
    from ann2snn.pipeline import run_until

    net = chain_net(DEEP_CHAIN)
    assert neuron_depth(run_until(net, ann2snn.CompileConfig(), None, "partition_graph")) == DEEP_CHAIN
    with caplog.at_level("WARNING", logger="ann2snn"):
        snn = ann2snn.compile(net, chain_calib(), search_budget=0.001, **FAST)
    record = search_record(snn)
    assert record["target_T"] == DEFAULT_TARGET_T and record["default"]["neuron_depth"] == DEEP_CHAIN
    assert "(chosen)" in format_search(record)
    assert "choosing the recipe from the data for T = 64" in caplog.text and "--target-T 0" in caplog.text
    # the same as asking for it, less the note; --target-T 0 or any recipe option turns it off
    asked = ann2snn.compile(net, chain_calib(), target_T=DEFAULT_TARGET_T, search_budget=0.001, **FAST)
    assert serialize(without_search(snn)) == serialize(without_search(asked))
    plain = ann2snn.compile(net, chain_calib(), target_T=0, **FAST)
    assert not any(p.key == "ann2snn.search" for p in plain.metadata_props)
    for option in ({"neuron": "if"}, {"method": "ltb"}, {"keep_clip_cap": True}):
        given = ann2snn.compile(net, chain_calib(), **option, **FAST)
        assert serialize(given) == serialize(plain)
    config = ann2snn.CompileConfig(neuron="signed", **FAST)  # a config that sets a recipe option
    assert not any(p.key == "ann2snn.search" for p in ann2snn.compile(net, chain_calib(), config=config).metadata_props)


def test_shallower_network_keeps_the_default_recipe_byte_for_byte(caplog) -> None:
    from ann2snn.config import DEEP_CHAIN

    net = chain_net(DEEP_CHAIN - 1)
    with caplog.at_level("WARNING", logger="ann2snn"):
        snn = ann2snn.compile(net, chain_calib(), **FAST)
    assert "recipe" not in caplog.text
    assert serialize(snn) == serialize(ann2snn.compile(net, chain_calib(), target_T=0, **FAST))


def test_deep_network_with_unsplittable_data_compiles_the_defaults_with_a_warning(caplog) -> None:
    from ann2snn.config import DEEP_CHAIN

    net, x = chain_net(DEEP_CHAIN), chain_calib()["x"]
    with caplog.at_level("WARNING", logger="ann2snn"):
        snn = ann2snn.compile(net, {"x": x[:20]}, **FAST)
    assert "cannot be split for the recipe search" in caplog.text and "--calib" in caplog.text
    assert not any(p.key == "ann2snn.search" for p in snn.metadata_props)


def test_cli_says_when_it_searched_by_default_and_explicit_flags_turn_it_off(tmp_path) -> None:
    from ann2snn.config import DEEP_CHAIN

    model, calib = tmp_path / "deep.onnx", tmp_path / "calib.npz"
    onnx.save(chain_net(DEEP_CHAIN), model)
    np.savez(calib, **chain_calib())
    args = ["compile", str(model), "-o", str(tmp_path / "d.snn.onnx"), "--calib", str(calib), "--iters", "20",
            "--batch", "32", "--search-budget", "0.001", "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert f"the network is {DEEP_CHAIN} neuron layers deep" in r.output and "--target-T 0" in r.output
    assert "recipe search at T = 64" in r.output
    for extra in (["--target-T", "0"], ["--neuron", "if"], ["--keep-clip-cap"]):
        r = CliRunner().invoke(main, [*args, *extra])
        assert r.exit_code == 0 and "recipe search" not in r.output, (extra, r.output)
    toml = tmp_path / "c.toml"
    toml.write_text('method = "ltb"\n')  # a recipe option from --config counts as given
    r = CliRunner().invoke(main, [*args, "--config", str(toml)])
    assert r.exit_code == 0 and "recipe search" not in r.output, r.output


def test_costly_models_calibrate_stats_candidates_on_a_subset_never_below_the_minimum() -> None:
    from ann2snn.search import MIN_STATS_CALIBRATION, stats_calibration_size

    assert stats_calibration_size(225, 100_000, 120.0) == 225  # the digits CNN: all
    assert stats_calibration_size(240, 300_000_000, 120.0) == MIN_STATS_CALIBRATION  # MobileNetV2-sized
    assert stats_calibration_size(40, 300_000_000, 120.0) == 40  # never more than there are
    assert stats_calibration_size(240, 0, 120.0) == 240  # MACs unknown: all


def test_resolution_divides_thresholds_and_keeps_the_capped_ceiling() -> None:
    """``--resolution N``: the ReLU sites' thresholds are θ/N and a neuron may emit N·burst spikes per
    step, at a kept cap at most ⌊c·N/θ⌋, so the most per step never exceeds the cap; the SNN still
    converges to the capped ANN, and at the same T its error is smaller than with N = 1."""
    from ann2snn.runtime import SpikingSession

    rng = np.random.default_rng(0)
    model = build(CAPPED_TEXT, {"W1": rng.normal(0, 1, (8, 4)), "b1": rng.normal(0, 0.5, 8),
                                "W2": rng.normal(0, 1, (3, 8)), "b2": np.zeros(3)}, opset=10)
    x = rng.normal(0, 1, (256, 4)).astype(np.float32)
    one = ann2snn.compile(model, x, method="max", neuron="signed", burst=2)
    four = ann2snn.compile(model, x, method="max", neuron="signed", burst=2, resolution=4)
    t1 = next(onnx_array(i) for i in one.graph.initializer if i.name.endswith("/threshold"))
    t4 = next(onnx_array(i) for i in four.graph.initializer if i.name.endswith("/threshold"))
    np.testing.assert_allclose(t4, t1 / 4, rtol=1e-6)
    limits = next(onnx_array(i) for i in four.graph.initializer if "max_spikes" in i.name)
    assert np.all(limits * t4 <= 1.0 + 1e-6) and np.all(limits >= 4)  # cap c = 1, θ <= c
    ref = run_model(model, x)
    err = {name: np.abs(SpikingSession(m).run({"x": x}, 32)["y"] - ref).mean() / np.abs(ref).mean()
           for name, m in (("one", one), ("four", four))}
    assert err["four"] < 0.5 * err["one"], err
    y = SpikingSession(four).run({"x": x}, 256)["y"]
    assert np.abs(y - ref).mean() / np.abs(ref).mean() < 0.01
    info = json.loads({p.key: p.value for p in four.metadata_props}["ann2snn"])
    assert info["config"]["resolution"] == 4
    assert "resolution" not in json.loads({p.key: p.value for p in one.metadata_props}["ann2snn"])["config"]


def test_resolution_needs_signed_neurons_and_an_integer() -> None:
    # a network with IF neurons only cannot burst (signed sites can: tests/test_signed_activations.py)
    with pytest.raises(ann2snn.ConfigError, match="--neuron signed"):
        ann2snn.compile(DIGITS, DIGITS_CALIB, resolution=2)
    with pytest.raises(ann2snn.ConfigError, match="--resolution"):
        ann2snn.CompileConfig(neuron="signed", resolution=0)
    assert Recipe("percentile", "channel", "signed", 2, resolution=2).label == \
        "percentile/channel signed burst 2 resolution 2"
