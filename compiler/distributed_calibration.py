"""Threshold calibration on Ray actors (``compile --ray``): the thresholds of one process.

Every calibration batch (the batch one process would draw: same seed, same indices) is split
into one contiguous part per actor. Each actor opens the data file or image folder itself and
reads only its part's samples, so the data travel by reference, never through the driver.

- ``ltb``: an activation becomes ``min(ReLU(z), θ')`` with ``θ' = θ + 2η·mean(ReLU(z − θ))``
  over the whole batch, and the layers after it see the clipped values. So the actors advance
  site by site, in topological order: each runs the graph from its inputs and the clipped
  outputs of the earlier sites up to the next site's pre-activation (one cut of the graph per
  site) and returns the sum and count of ReLU(z − θ) for the common θ; the driver adds them
  (weighted by the samples, exactly as the larger batch's mean), computes θ' once and sends it
  back with the next site's request. One round trip per site and batch: equal to one process
  with the same batch up to float rounding (the mean is summed in float64 in parts instead of
  in one float32 reduction).
- ``max``: the per-actor maxima merge by maximum, exactly.
- ``percentile``: exact only over all the values, so the actors send their pre-activations to
  the driver, which holds them as one process does (the percentile of the gathered values is
  the one-process percentile; the work of the forward passes is what is shared).

The mean activations (for the readout delay) are sums of per-actor sums over the batch size.
A worker process that dies makes the batch run again on fresh actors, from the thresholds
before it: the driver changes nothing until a batch is complete.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import numpy as np

from ann2snn.data.arrays import CalibrationSource
from ann2snn.errors import Ann2SnnError, ConfigError
from ann2snn.state import PassState, Site

log = logging.getLogger(__name__)

#: how many times a batch runs again on fresh actors after a worker process died
MAX_RETRIES = 3


def _site_info(site: Site, granularity: str, keep_clip_cap: bool) -> dict[str, Any]:
    return {"pre": site.pre, "post": site.post, "shape": tuple(site.shape), "channel_axis": site.channel_axis,
            "theta_shape": site.theta_shape(granularity),
            "cap": site.cap if site.cap is not None and keep_clip_cap else None}


def site_order(state: PassState) -> list[int]:
    """Indices of ``state.sites`` in topological order of their activation nodes."""
    graph = state.graph.copy().toposort()
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    return sorted(range(len(state.sites)), key=lambda i: position[state.sites[i].node])


def cut_segments(state: PassState, order: list[int]) -> list[tuple[bytes, list[str]]]:
    """Per site (in ``order``): the model computing its pre-activation from the model inputs and
    the outputs of the sites before it, serialised, and the inputs it reads."""
    from ann2snn.passes._graph import export

    segments = []
    for k, i in enumerate(order):
        graph = state.graph.copy()
        tensors = graph.tensors()
        cuts = []
        for j in order[:k]:
            site = state.sites[j]
            t = tensors[site.post]
            t.inputs.clear()  # the earlier site's clipped output is fed, not computed
            t.dtype, t.shape = np.float32, ["N", *site.shape]
            cuts.append(t)
        pre = tensors[state.sites[i].pre]
        pre.dtype = np.float32
        graph.inputs = list(graph.inputs) + cuts
        graph.outputs = [pre]
        graph.cleanup(remove_unused_graph_inputs=True).toposort()
        segments.append((export(graph, state.opset).SerializeToString(), [t.name for t in graph.inputs]))
    return segments


class CalibrationShard:
    """A Ray actor: one part of every calibration batch, read from the data by index."""

    def __init__(self, data: str, specs: list[Any], preprocess: Any, threads: int, sites: list[dict[str, Any]],
                 segments: list[tuple[bytes, list[str]]] | None, stats_model: bytes | None) -> None:
        """Open the data (checked by the driver) and the sessions: one per LTB segment, or the
        unclipped ANN with every site's pre-activation as output (max / percentile)."""
        from ann2snn.ortsession import make_session

        self.source = CalibrationSource(data, specs, preprocess, check=False)
        self.sites = sites
        self.segments = [(make_session(_model(m), threads), names) for m, names in segments or []]
        self.stats_sess = make_session(_model(stats_model), threads) if stats_model is not None else None
        # the last segment reading each site's output: it is dropped after that
        self.last_use = {name: k for k, (_, names) in enumerate(self.segments) for name in names}
        self.feeds: dict[str, np.ndarray] = {}
        self.n = 0
        self.relu: np.ndarray | None = None

    def ltb_site(self, k: int, theta: np.ndarray, indices: np.ndarray | None = None,
                 clip_previous: np.ndarray | None = None) -> tuple[np.ndarray, int, np.ndarray]:
        """Clip site k-1 with its new threshold ``clip_previous`` (or, at k = 0, read the samples
        ``indices``), run up to site k's pre-activation and return, for ``theta``: the sum of
        ReLU(z − θ) per threshold, the count it is over, and the sum over the samples of ReLU(z)."""
        from ann2snn.distributed import _maybe_die
        from ann2snn.ortsession import run_checked

        _maybe_die()
        if indices is not None:
            self.n = len(indices)
            self.feeds = self.source.take(indices) if self.n else {}
        if clip_previous is not None and self.n:
            prev = self.sites[k - 1]
            self.feeds[prev["post"]] = np.minimum(self.relu, clip_previous)
        site = self.sites[k]
        if not self.n:
            return np.zeros(site["theta_shape"]), 0, np.zeros(site["shape"])
        sess, names = self.segments[k]
        (z,) = run_checked(sess, None, {name: self.feeds[name] for name in names}, "calibration data")
        for name in names:  # the samples are read again for the next batch
            if self.last_use[name] == k:
                del self.feeds[name]
        relu = np.maximum(z, np.float32(0))
        if site["cap"] is None or site["cap"] >= 0:  # as the one-process graph computes it (θ >= 0 there)
            excess = relu - np.minimum(relu, theta)
        else:
            excess = np.maximum(z - theta, np.float32(0))
        axes = tuple(a for a in range(relu.ndim) if site["theta_shape"][a] == 1)
        self.relu = relu
        return (excess.sum(axis=axes, dtype=np.float64, keepdims=True), relu.size // theta.size,
                relu.sum(axis=0, dtype=np.float64))

    def stats(self, indices: np.ndarray, method: str, per_channel: bool) -> list[tuple[Any, np.ndarray]]:
        """Per site, for samples ``indices``: the per-row maxima (max) or the rows themselves
        (percentile), and the sum over the samples of ReLU(z)."""
        from ann2snn.ortsession import run_checked
        from ann2snn.passes._thresholds import channel_rows

        if not len(indices):
            return []
        out = []
        for site, z in zip(self.sites, run_checked(self.stats_sess, [s["pre"] for s in self.sites],
                                                   self.source.take(indices), "calibration data")):
            rows = channel_rows(z, Site("", "", "", None, site["channel_axis"], site["shape"]), per_channel)
            out.append((rows.max(axis=1) if method == "max" else rows.astype(np.float32),
                        np.maximum(z, 0).sum(axis=0, dtype=np.float64)))
        return out


def _model(data: bytes) -> Any:
    import onnx

    return onnx.load_from_string(data)


def _get(ray: Any, futures: list[Any]) -> list[Any]:
    """``ray.get``; an ann2snn error raised in an actor is raised here as itself."""
    try:
        return ray.get(futures)
    except Exception as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Ann2SnnError):
            raise cause from None
        raise


def _check_source(source: Any, state: PassState) -> CalibrationSource:
    if not isinstance(source, CalibrationSource) or source.path is None:
        raise ConfigError("--ray reads the calibration data on the workers by reference: pass a .npz/.npy file or "
                          "an image folder (not in-memory arrays or an iterable of batches), or calibrate without "
                          "--ray")
    from ann2snn.data.images import is_image_source

    if is_image_source(source.path) and state.config.crop_mode == "random":
        raise ConfigError("--crop-mode random draws each crop from the sampler of one process, which Ray workers "
                          "cannot share; use --crop-mode center with --ray, or calibrate without --ray")
    return source


def _bar(length: int, label: str, enabled: bool) -> Any:
    import click

    return click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True) if enabled else None


def calibrate_ray(state: PassState, source: Any, workers: int | None = None) -> None:
    """``calibrate_thresholds``' LTB / max / percentile with each batch split over Ray actors
    (``state.config.ray`` names the cluster; ``workers``: how many actors, default one per
    ``threads`` CPUs of the cluster). Sets the sites' ``theta`` and ``mean_act`` as one process
    would with the same batch."""
    from ann2snn.distributed import connect
    from ann2snn.passes._graph import export
    from ann2snn.passes._thresholds import finish_ltb, finish_stats, ltb_step, stats_iters

    cfg = state.config
    signed = [s.node for s in state.sites if s.signed]
    if signed:
        raise ConfigError(f"compile --ray does not calibrate signed activation sites yet ('{signed[0]}' and "
                          f"{len(signed) - 1} more: LeakyReLU / PReLU / SiLU / GELU / HardSwish neurons); drop --ray, "
                          "or pass --signed-sites off to keep those ops analog")
    source = _check_source(source, state)
    ray = connect(cfg.ray)
    threads = cfg.threads or 1
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    workers = max(1, min(workers, cfg.batch))
    order = site_order(state)
    sites = [state.sites[i] for i in order]
    info = [_site_info(s, cfg.granularity, cfg.keep_clip_cap) for s in sites]
    start = time.perf_counter()
    if cfg.method == "ltb":
        segments, stats_model = ray.put(cut_segments(state, order)), None
    else:
        graph = state.graph.copy()
        tensors = graph.tensors()
        graph.outputs = [tensors[s.pre] for s in sites]
        for t in graph.outputs:
            t.dtype = np.float32
        segments, stats_model = None, ray.put(export(graph.cleanup().toposort(), state.opset).SerializeToString())
    actor = ray.remote(num_cpus=threads)(CalibrationShard)
    actors: list[Any] = []

    def start_actors() -> None:
        for a in actors:
            ray.kill(a)
        actors[:] = [actor.remote(source.path, source.specs, source.preprocess, threads, info, segments, stats_model)
                     for _ in range(workers)]

    def retried(run_batch: Any) -> Any:
        """``run_batch()``; when a worker process died, the batch again on fresh actors (the
        driver changes nothing until a batch is complete, so nothing is counted twice)."""
        from ray.exceptions import RayActorError

        for attempt in range(MAX_RETRIES + 1):
            try:
                return run_batch()
            except RayActorError:
                if attempt == MAX_RETRIES:
                    raise
                log.warning("a calibration worker died; running the batch again on fresh workers")
                start_actors()

    start_actors()
    setup = time.perf_counter() - start
    try:
        if cfg.method == "ltb":
            thetas = [np.zeros(s["theta_shape"], np.float32) for s in info]
            sums = [np.zeros(s.shape, np.float64) for s in sites]
            n_batches = samples = 0
            bar = _bar(cfg.iters * cfg.batch, f"calibrating (LTB, {workers} workers)", cfg.progress)

            def ltb_batch(parts: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
                """The batch's new thresholds and, per site, the sum over its samples of ReLU(z)."""
                new_thetas, relu_sums = list(thetas), []
                new: np.ndarray | None = None
                for k, site in enumerate(info):
                    futures = [a.ltb_site.remote(k, new_thetas[k], parts[w] if k == 0 else None, new)
                               for w, a in enumerate(actors)]
                    results = _get(ray, futures)
                    excess = sum(r[0] for r in results)
                    count = sum(r[1] for r in results)
                    new = new_thetas[k] = ltb_step(new_thetas[k], excess / max(count, 1), cfg.eta, site["cap"])
                    relu_sums.append(sum(r[2] for r in results))
                return new_thetas, relu_sums

            for idx in source.batch_indices(cfg.iters, cfg.batch, cfg.seed):
                parts = np.array_split(idx, workers)
                thetas, relu_sums = retried(lambda: ltb_batch(parts))
                for k, r in enumerate(relu_sums):
                    sums[k] += r / len(idx)
                n_batches += 1
                samples += len(idx)
                if bar is not None:
                    bar.update(len(idx))
            if bar is not None:
                bar.render_finish()
            back = np.argsort(order)  # the results in the order of state.sites
            finish_ltb(state, [thetas[b] for b in back], [sums[b] for b in back], n_batches, samples)
        else:
            iters = stats_iters(cfg, source.size)
            per_channel = cfg.granularity == "channel"
            maxima: list[np.ndarray | None] = [None] * len(sites)
            values: list[list[np.ndarray]] = [[] for _ in sites]
            sums = [np.zeros(s.shape, np.float64) for s in sites]
            seen = 0
            bar = _bar(iters * cfg.batch, f"calibrating ({cfg.method}, {workers} workers)", cfg.progress)
            for idx in source.batch_indices(iters, cfg.batch, cfg.seed):
                parts = np.array_split(idx, workers)
                outs = retried(lambda: _get(ray, [a.stats.remote(p, cfg.method, per_channel)
                                                  for a, p in zip(actors, parts)]))
                for out in outs:
                    for j, (m, relu_sum) in enumerate(out):
                        sums[j] += relu_sum / len(idx)
                        if cfg.method == "max":
                            maxima[j] = m if maxima[j] is None else np.maximum(maxima[j], m)
                        else:
                            values[j].append(m)
                seen += 1
                if bar is not None:
                    bar.update(len(idx))
            if bar is not None:
                bar.render_finish()
            back = np.argsort(order)
            finish_stats(state, [maxima[b] for b in back], [values[b] for b in back], [sums[b] for b in back], seen)
    finally:
        for a in actors:
            ray.kill(a)
    elapsed = time.perf_counter() - start
    log.debug("Ray calibration (%s): %d workers, %.3f s (%.3f s to start them)", cfg.method, workers, elapsed, setup,
              extra={"ray_workers": workers, "ray_seconds": elapsed, "ray_setup_seconds": setup})
