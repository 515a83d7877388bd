"""Calibration and evaluation data: loading, checking against the model, batching."""
from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from ..errors import DataError

log = logging.getLogger(__name__)

ArrayDict = dict[str, np.ndarray]
DataLike = Union[str, os.PathLike, np.ndarray, Mapping[str, np.ndarray], Iterable[Any]]


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and shape (None or a str for symbolic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of a model (graph inputs that are not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        specs.append(InputSpec(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), tuple(dims)))
    return specs


def load_arrays(path: str | os.PathLike[str], what: str = "data") -> ArrayDict:
    """Read a ``.npz`` (arrays by name) or ``.npy`` (one array, key '') file; no pickles."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file '{p}' does not exist; pass a .npz (arrays keyed by input name) or a .npy file")
    try:
        if p.suffix == ".npy":
            return {"": np.load(p, allow_pickle=False)}
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{what} file '{p}' could not be read as .npz/.npy ({exc}); write it with numpy.savez") from None


def as_array_dict(data: Any, specs: Sequence[InputSpec], what: str, lazy: bool = False) -> ArrayDict:
    """Turn a path, array or mapping into {input name: array} (extra keys kept). With ``lazy``, a
    file's arrays are :class:`~ann2snn.data.npyfile.FileArray` s, read a slice at a time."""
    if isinstance(data, (str, os.PathLike)):
        if lazy:
            from .npyfile import open_arrays

            data = open_arrays(data, what)
        else:
            data = load_arrays(data, what)
    if isinstance(data, np.ndarray):
        data = {"": data}
    if not isinstance(data, Mapping):
        raise DataError(f"{what} must be a path, an array or a mapping of input name to array, got {type(data).__name__}")
    out = dict(data)
    if "" in out:
        if len(specs) != 1:
            raise DataError(f"{what} holds one unnamed array but the model has inputs {', '.join(s.name for s in specs)}; "
                            "save a .npz keyed by input name")
        out[specs[0].name] = out.pop("")
    return out


def check_arrays(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], what: str) -> None:
    """Check names, dtypes, shapes and finiteness of the model inputs in ``arrays``."""
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise DataError(f"{what} has no array for model input(s) {', '.join(repr(m) for m in missing)}; "
                        f"it has {', '.join(repr(k) for k in arrays) or 'nothing'} (key the .npz by input name)")
    n = None
    for s in specs:
        a = _array_like(arrays[s.name])  # FileArrays are checked without reading them whole
        if a.dtype != s.dtype:
            raise DataError(f"{what} input '{s.name}' has dtype {a.dtype} but the model expects {s.dtype}; "
                            f"convert it with .astype(np.{s.dtype})")
        if a.ndim != len(s.shape):
            raise DataError(f"{what} input '{s.name}' has shape {a.shape} but the model expects rank {len(s.shape)} "
                            f"{_fmt_shape(s.shape)}")
        for i, (got, want) in enumerate(zip(a.shape, s.shape)):
            if i > 0 and isinstance(want, int) and want > 0 and got != want:  # axis 0 is the batch
                raise DataError(f"{what} input '{s.name}' has shape {a.shape} but the model expects "
                                f"{_fmt_shape(s.shape)} (axis {i}: {got} != {want})")
        if a.shape[0] == 0:
            raise DataError(f"{what} input '{s.name}' is empty (0 samples); provide at least one sample")
        if n is not None and a.shape[0] != n:
            raise DataError(f"{what} inputs have different sample counts ({n} and {a.shape[0]} for '{s.name}')")
        n = a.shape[0]
        if np.issubdtype(a.dtype, np.floating):
            _check_finite(a, f"{what} input '{s.name}'")


def _array_like(a: Any) -> Any:
    """``a`` itself when it is an array or a FileArray, else ``np.asarray(a)``."""
    from .npyfile import FileArray

    return a if isinstance(a, (np.ndarray, FileArray)) else np.asarray(a)


#: bytes of data checked for NaN/Inf at a time (a file's arrays are read in such slices)
_CHECK_BYTES = 1 << 20


def _check_finite(a: Any, where: str) -> None:
    n = a.shape[0]
    per = max(1, _CHECK_BYTES // max(1, int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize))
    for i in range(0, n, per):
        bad = ~np.isfinite(np.asarray(a[i:i + per]))
        if bad.any():
            idx = i + int(np.argwhere(bad.reshape(bad.shape[0], -1).any(axis=1))[0][0])
            count = int(bad.sum()) + sum(int((~np.isfinite(np.asarray(a[j:j + per]))).sum())
                                         for j in range(i + per, n, per))
            raise DataError(f"{where} contains {count} NaN/Inf value(s) (first in sample {idx}); "
                            "clean the data before calibrating")


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


class CalibrationSource:
    """Batches for calibration: K seeded, reshuffled batches from arrays, or an iterable's batches."""

    def __init__(self, data: DataLike, specs: Sequence[InputSpec], preprocess: Any = None, *,
                 check: bool = True) -> None:
        """``check=False`` skips the data checks (a Ray worker opening data the driver has checked)."""
        from .images import ImageSource, Preprocess, is_image_source

        self.specs = list(specs)
        #: the file or image folder the data come from (None for in-memory data): what Ray workers open
        self.path = os.fspath(data) if isinstance(data, (str, os.PathLike)) else None
        self.preprocess = preprocess
        self._arrays: ArrayDict | None = None
        self._iterable: Iterable[Any] | None = None
        self._images: ImageSource | None = None
        if isinstance(data, (str, os.PathLike)) and is_image_source(data):
            if len(self.specs) != 1:
                raise DataError(f"image data feed single-input models; this one has inputs "
                                f"{', '.join(s.name for s in self.specs)} (use a .npz keyed by input name)")
            self._images = ImageSource(data, preprocess or Preprocess())
            if check:
                check_arrays({self.specs[0].name: self._images.load([0])}, self.specs, f"image data '{data}'")
        elif isinstance(data, (str, os.PathLike, np.ndarray, Mapping)):
            arrays = as_array_dict(data, specs, "calibration data", lazy=True)
            if check:
                check_arrays(arrays, specs, "calibration data")
            self._arrays = {s.name: _array_like(arrays[s.name]) for s in specs}
        elif isinstance(data, Iterable):
            self._iterable = data
        else:
            raise DataError("calibration data must be a .npz/.npy path, an array, a mapping or an iterable of batches")

    @property
    def size(self) -> int | None:
        """Number of samples, when known."""
        if self._images is not None:
            return len(self._images)
        if self._arrays is None:
            return None
        return int(next(iter(self._arrays.values())).shape[0])

    def first(self, n: int) -> ArrayDict | None:
        """The first ``n`` samples of array data (None for iterables, which may be one-shot)."""
        if self._images is not None:
            return {self.specs[0].name: self._images.load(range(min(n, len(self._images))))}
        if self._arrays is None:
            return None
        return {k: v[:n] for k, v in self._arrays.items()}

    def take(self, indices: Sequence[int]) -> ArrayDict:
        """The samples at ``indices`` as arrays (array and image data; an iterable cannot be indexed)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self._images is not None:
            return {self.specs[0].name: self._images.load(idx)}
        if self._arrays is None:
            raise DataError("this needs calibration data as arrays, a .npz/.npy file or images, not an iterable of "
                            "batches (its samples cannot be indexed)")
        order = np.argsort(idx, kind="stable")  # files are read in order; the result keeps the order asked for
        out = {k: np.asarray(v[idx[order]]) for k, v in self._arrays.items()}
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {k: v[inverse] for k, v in out.items()}

    def batch_indices(self, iters: int, batch: int, seed: int) -> Iterator[np.ndarray]:
        """The sorted sample indices of the ``iters`` batches that :meth:`batches` yields for ``seed``
        (array and image data; with random crops the crops draw from the same generator, so
        this plan holds only for the first batch)."""
        return self._plan(iters, batch, np.random.default_rng(seed))

    def _plan(self, iters: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        n = self.size or 0
        if n < batch:
            log.warning("calibration data has %d samples, fewer than the batch size %d; using batches of %d", n, batch, n)
            batch = n
        order = rng.permutation(n)
        pos = 0
        for _ in range(iters):
            if pos + batch > n:
                order, pos = rng.permutation(n), 0
            yield np.sort(order[pos:pos + batch])
            pos += batch

    def batches(self, iters: int, batch: int, seed: int) -> Iterator[ArrayDict]:
        """Yield ``iters`` batches of (at most) ``batch`` samples, deterministically for a seed."""
        if self._arrays is not None or self._images is not None:
            rng = np.random.default_rng(seed)
            # lazily: each batch's random crops draw from rng before the next permutation, as always
            for idx in self._plan(iters, batch, rng):
                if self._images is not None:  # decoded per batch: the set never sits in memory whole
                    yield {self.specs[0].name: self._images.load(idx, rng)}
                else:
                    yield {k: v[idx] for k, v in self._arrays.items()}
            return
        produced = 0
        reiterable = isinstance(self._iterable, Sequence)
        while produced < iters:
            got_any = False
            for item in self._iterable:  # type: ignore[union-attr]
                arrays = as_array_dict(item, self.specs, "calibration batch")
                check_arrays(arrays, self.specs, "calibration batch")
                got_any = True
                yield {s.name: np.asarray(arrays[s.name]) for s in self.specs}
                produced += 1
                if produced >= iters:
                    return
            if not got_any:
                raise DataError("calibration data is empty: the iterable yielded no batch")
            if not reiterable:
                log.warning("calibration iterable ran out after %d batch(es) of the %d asked for", produced, iters)
                return
