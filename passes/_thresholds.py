"""The arithmetic that LTB / max / percentile calibration shares between one process
(calibrate_thresholds) and Ray workers (ann2snn.distributed_calibration): the threshold update,
the per-channel rows, and how the gathered statistics become the sites' thresholds."""
from __future__ import annotations

import math

import numpy as np

from ann2snn.config import CompileConfig
from ann2snn.errors import DataError
from ann2snn.state import PassState, Site


def check_finite(values: np.ndarray, site: Site, what: str) -> None:
    """Stop with an error naming the site when ``values`` (its threshold) is not finite."""
    if not np.all(np.isfinite(values)):
        raise DataError(
            f"calibration overflowed at activation '{site.node}': its {what} is not finite (NaN/Inf in float32); "
            "check the calibration data's scale and the model's weights"
        )


def ltb_step(theta: np.ndarray, mean_excess: np.ndarray, eta: float, cap: float | None) -> np.ndarray:
    """θ' = θ + 2η·mean(ReLU(z − θ)), capped at ``cap``, in float32 as the calibration graph computes it."""
    new = np.asarray(theta, np.float32) + np.asarray(mean_excess, np.float32) * np.float32(2.0 * eta)
    return np.minimum(new, np.float32(cap)) if cap is not None else new


def finish_ltb(state: PassState, thetas: list[np.ndarray], stats: list[np.ndarray], n_batches: int,
               samples: int) -> None:
    """Set the sites' thresholds and mean activations after LTB (``stats``: per site, the sum over
    batches of each batch's mean ReLU(z) per neuron)."""
    if n_batches == 0:
        raise DataError("calibration saw no batch; provide calibration data with at least one sample")
    state.metadata["calibration"] = {"method": "ltb", "batches": n_batches, "samples": samples}
    for site, th, st in zip(state.sites, thetas, stats):
        check_finite(th, site, "threshold")
        site.theta = th.reshape(-1).astype(np.float32)
        site.mean_act = (st / n_batches).astype(np.float32)


def stats_iters(cfg: CompileConfig, n: int | None) -> int:
    """Batches seen by max / percentile calibration: ``iters``, at most one pass over ``n`` samples."""
    return cfg.iters if n is None else min(cfg.iters, max(1, math.ceil(n / cfg.batch)))


def channel_rows(z: np.ndarray, site: Site, per_channel: bool) -> np.ndarray:
    """Pre-activations as rows: one per channel (``per_channel``) or one row for the layer."""
    zc = np.moveaxis(np.asarray(z), site.channel_axis, 0).reshape(site.shape[site.channel_axis - 1], -1)
    return zc if per_channel else zc.reshape(1, -1)


def finish_stats(state: PassState, maxima: list[np.ndarray | None], values: list[list[np.ndarray]],
                 sums: list[np.ndarray], seen: int) -> None:
    """Set the sites' thresholds (max or percentile of the rows gathered) and mean activations
    (``sums``: per site, the sum over batches of each batch's mean ReLU(z) per neuron)."""
    cfg = state.config
    if seen == 0:
        raise DataError("calibration saw no batch; provide calibration data with at least one sample")
    state.metadata["calibration"] = {"method": cfg.method, "batches": seen}
    for j, site in enumerate(state.sites):
        if cfg.method == "max":
            th = maxima[j]
        else:
            th = np.percentile(np.concatenate(values[j], axis=1), cfg.percentile, axis=1)
        th = np.maximum(np.asarray(th, np.float64), 0.0)
        if site.cap is not None and cfg.keep_clip_cap:
            th = np.minimum(th, site.cap)
        check_finite(th, site, "threshold")
        site.theta = th.astype(np.float32).reshape(-1)
        site.mean_act = (sums[j] / seen).astype(np.float32)
