"""Round trips of the NIR export through third-party readers (sinabs, snnTorch, Norse):
the exported file is loaded by each reader and simulated with its own neurons; the readout
is compared with ann2snn's runtime on the same compiled model (benchmarks/nir_readers.py).

Needs torch and the reader (``pip install torch==2.13.0 nir==1.0.8 nirtorch==2.6 snntorch==1.0.0 norse==1.1.0 matplotlib && pip install --no-deps sinabs==3.1.3``); each
test is skipped cleanly where one is missing. The fast tests use the digits CNN and few
images; ``-m slow`` runs the MNIST CNN and the Fashion VGG at T = 128.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("nir")
pytest.importorskip("torch")
pytest.importorskip("nirtorch")


def _bench():
    spec = importlib.util.spec_from_file_location("nir_readers_bench", ROOT / "benchmarks" / "nir_readers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("nir_readers")


def _reader(name: str) -> None:
    pytest.importorskip({"sinabs": "sinabs.nir", "snntorch": "snntorch.import_nir",
                         "norse": "norse.torch.utils.import_nir"}[name])


def _rows(bench, workdir, model, reader, T, limit, configs):
    rows = bench.compare(model, reader, [T], limit, workdir, configs=configs)
    for r in rows:
        assert r.get("agree") is not None, r.get("error")
    return rows


# --- fast: the digits CNN, 40 images, T = 32 --------------------------------------------------


def test_sinabs_matched_reproduces_ann2snn_exactly(bench, workdir):
    """sinabs' IAF resets by subtraction and fires at v >= θ: with SingleSpike, v(0) from
    ann2snn.v_init and no membrane floor it is ann2snn's neuron; the spikes per layer agree."""
    _reader("sinabs")
    (r,) = _rows(bench, workdir, "digits", "sinabs", 32, 40, bench.CONFIGS["sinabs"][:1])
    assert r["agree"] == 1.0
    assert r["rel_err"] < 1e-4
    assert r["layer_diff"] < 1e-4


def test_snntorch_with_beta_one_agrees(bench, workdir):
    """snnTorch reads IF as Leaky(beta = 0.9); set to 1 it differs only in firing at v > θ."""
    _reader("snntorch")
    matched, defaults, placeholder = _rows(bench, workdir, "digits", "snntorch", 32, 40, bench.CONFIGS["snntorch"])
    assert matched["agree"] >= 0.95 and matched["rel_err"] < 0.1 and matched["layer_diff"] < 0.05
    assert defaults["rel_err"] > matched["rel_err"]  # the leak costs
    assert placeholder["rel_err"] > matched["rel_err"]  # the AvgPool2d placeholder costs


def test_norse_resets_to_zero(bench, workdir):
    """Norse's IAF resets to v_reset = 0: it loads and runs, with fewer spikes than ann2snn."""
    _reader("norse")
    (r,) = _rows(bench, workdir, "digits", "norse", 32, 40, bench.CONFIGS["norse"][:1])
    assert r["agree"] >= 0.8
    assert r["spikes"] < r["ann2snn_spikes"]


def test_cumulative_maxpool_module_matches_maxpool_on_constant_input(bench):
    torch = pytest.importorskip("torch")
    _, CumMaxPool2d = bench._torch_modules()
    pool = CumMaxPool2d([2, 2], [2, 2], [0, 0])
    x = torch.as_tensor(np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32))
    ref = torch.nn.functional.max_pool2d(x, 2)
    for _ in range(3):
        assert torch.allclose(pool(x), ref, atol=1e-6)


# --- slow: every model at T = 128 (the targets) ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mnist", "digits", "fashion"])
@pytest.mark.parametrize("reader, least", [("sinabs", 0.99), ("snntorch", 0.97), ("norse", 0.5)])
def test_readers_t128(bench, workdir, model, reader, least):
    """T = 128, each reader in its first (best matched) configuration. sinabs is the issue's
    target (>= 99 % top-1 agreement, spike counts per layer equal); snnTorch differs only in
    firing at v > θ; Norse resets to zero, which loses the residue of every spike: loosely bounded."""
    _reader(reader)
    (r,) = _rows(bench, workdir, model, reader, 128, 200, bench.CONFIGS[reader][:1])
    assert r["agree"] >= least
    if reader == "sinabs":
        assert r["layer_diff"] < 1e-3
