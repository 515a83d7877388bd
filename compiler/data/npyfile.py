"""Arrays read from ``.npy`` / ``.npz`` files a batch at a time, and ``.npz`` files written the same way.

``run``, ``eval`` and ``report`` go through a data file batch by batch; reading the whole file
first made their memory grow with the number of samples (4,096 MNIST images: 2.4 GB). Here
an array in a file is a :class:`FileArray`: its shape and dtype come from the ``.npy`` header,
and slicing it reads just those rows with one ``seek`` and ``readinto``, so a batch costs its
own bytes and nothing else. ``.npz`` members that ``np.savez`` stored uncompressed are read in
place; compressed ones (``np.savez_compressed``) are decompressed once into a temporary file
when they are large (:data:`SPILL_BYTES`), read into memory when small.

:class:`NpzWriter` writes an ``.npz`` the same way, batch by batch, with the bytes of
a deterministic ``np.savez`` (fixed timestamps, entries in order): each entry is first streamed to a
temporary file, then copied into the archive, which is renamed into place only when complete.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

#: compressed .npz members larger than this (uncompressed) are spilled to a temporary file
SPILL_BYTES = 16 << 20
#: bytes copied at a time when spilling or assembling an archive
_COPY = 1 << 20
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _read_header(fh: BinaryIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise DataError(f"{where}: .npy format version {version} is not supported; write it with numpy.save")
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


class FileArray:
    """A C-ordered array inside a file, read a slice of rows at a time (axis 0 is the sample axis).

    ``a[i:j]`` and ``a[index_array]`` read only those rows; anything else, and
    ``np.asarray(a)``, reads the whole array.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int, shape: tuple[int, ...], dtype: np.dtype,
                 keep_alive: Any = None) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.shape = shape
        self.dtype = dtype
        self.ndim = len(shape)
        self._row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
        self._keep_alive = keep_alive  # a spilled temporary file lives as long as its arrays

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array."""
        return self._row * (self.shape[0] if self.shape else 1)

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
        if out.nbytes:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset + start * self._row)
                got = fh.readinto(memoryview(out.reshape(-1).view(np.uint8)))
            if got != out.nbytes:
                raise DataError(f"data file '{self.path}' ends early (rows {start}:{stop} of {self.shape[0]}); "
                                "the file is truncated: write it again")
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if not self.shape:
            return np.asarray(self)[key]
        n = self.shape[0]
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(n)
            return self._read(start, max(start, stop))
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {key} is out of bounds for axis 0 with size {n}")
            return self._read(i, i + 1)[0]
        index = np.asarray(key)
        if index.ndim == 1 and np.issubdtype(index.dtype, np.integer):
            index = np.where(index < 0, index + n, index)
            if index.size and (index.min() < 0 or index.max() >= n):
                raise IndexError(f"index out of bounds for axis 0 with size {n}")
            out = np.empty((len(index), *self.shape[1:]), self.dtype)
            # consecutive runs of rows are read at once (calibration indexes sorted samples)
            breaks = np.flatnonzero(np.diff(index) != 1) + 1
            for run in np.split(np.arange(len(index)), breaks):
                if run.size:
                    out[run[0]:run[-1] + 1] = self._read(int(index[run[0]]), int(index[run[-1]]) + 1)
            return out
        return np.asarray(self)[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self._read(0, self.shape[0]).reshape(self.shape) if self.shape else self._read(0, 1).reshape(())
        return whole if dtype is None else whole.astype(dtype)

    def __repr__(self) -> str:
        return f"FileArray('{self.path}', shape={self.shape}, dtype={self.dtype})"


class _Spilled:
    """Owns a spilled temporary file: it is removed when the last array reading it is gone."""

    def __init__(self, path: str) -> None:
        self.path = path
        weakref.finalize(self, os.unlink, path)


def _spill(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Spilled:
    """Decompress a member into a temporary file."""
    fd, tmp = tempfile.mkstemp(prefix="ann2snn-", suffix=".npy")
    owner = _Spilled(tmp)
    with os.fdopen(fd, "wb") as out, zf.open(info) as src:
        shutil.copyfileobj(src, out, _COPY)
    return owner


def open_arrays(path: str | os.PathLike[str], what: str = "data") -> dict[str, Any]:
    """The arrays of a ``.npz`` (by name) or ``.npy`` (key '') file, read lazily where possible:
    :class:`FileArray` for C-ordered numeric arrays, plain arrays otherwise. No pickles."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file '{p}' does not exist; pass a .npz (arrays keyed by input name) or a .npy file")
    try:
        if p.suffix == ".npy":
            with open(p, "rb") as fh:
                shape, fortran, dtype = _read_header(fh, f"{what} file '{p}'")
                offset = fh.tell()
            if fortran or dtype.hasobject or not shape:
                return {"": np.load(p, allow_pickle=False)}
            return {"": FileArray(p, offset, shape, dtype)}
        out: dict[str, Any] = {}
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[:-4]
                out[key] = _open_member(p, zf, info, f"{what} file '{p}', entry '{key}'")
        return out
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{what} file '{p}' could not be read as .npz/.npy ({exc}); write it with numpy.savez") from None


def _open_member(p: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Any:
    with zf.open(info) as fh:
        shape, fortran, dtype = _read_header(fh, where)  # type: ignore[arg-type]
        header = fh.tell()
    stored = info.compress_type == zipfile.ZIP_STORED
    if fortran or dtype.hasobject or not shape or (not stored and info.file_size <= SPILL_BYTES):
        with zf.open(info) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)
    if stored:
        with open(p, "rb") as raw:  # the member's data start after its local header
            raw.seek(info.header_offset)
            local = raw.read(30)
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        return FileArray(p, info.header_offset + 30 + name_len + extra_len + header, shape, dtype)
    owner = _spill(zf, info)
    return FileArray(owner.path, header, shape, dtype, keep_alive=owner)


class NpzWriter:
    """Write an ``.npz`` archive entry by entry and batch by batch, atomically and deterministically.

    ``append(name, rows)`` adds rows to an entry (axis 0 grows); ``put(name, array)`` sets a
    whole entry. ``close()`` writes the archive (entries in first-use order, the bytes
    ``np.savez`` would write for the concatenated arrays, with fixed timestamps) and renames it into place;
    until then ``path`` is untouched. Rows go to a temporary file as they come, except object
    arrays (a ZipMap's dicts), which are kept until ``close`` and pickled as ``np.savez`` does. Use it as a context manager: an exception discards it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        self._entries: dict[str, dict[str, Any]] = {}

    def _entry(self, name: str, like: np.ndarray) -> dict[str, Any]:
        e = self._entries.get(name)
        if e is None:
            raw = os.path.join(self._dir, f"{len(self._entries)}.raw")
            e = {"raw": raw, "fh": open(raw, "wb"), "dtype": like.dtype, "tail": like.shape[1:], "rows": 0,
                 "whole": None}
            self._entries[name] = e
        return e

    def append(self, name: str, rows: np.ndarray) -> None:
        """Add ``rows`` (axis 0) to entry ``name``; dtypes and trailing shapes must match."""
        rows = np.ascontiguousarray(rows)
        e = self._entry(name, rows)
        if rows.dtype.hasobject:  # e.g. a ZipMap's dicts: pickled at the end, as np.savez does
            e.setdefault("objects", []).append(rows)
            return
        if rows.dtype != e["dtype"] or rows.shape[1:] != e["tail"]:
            raise DataError(f"output '{name}' changed from {e['dtype']} {e['tail']} to {rows.dtype} {rows.shape[1:]} "
                            "per sample between batches; write it with --batch-size equal to the sample count")
        e["fh"].write(memoryview(rows.reshape(-1).view(np.uint8)) if rows.size else b"")
        e["rows"] += rows.shape[0]

    def put(self, name: str, array: np.ndarray) -> None:
        """Set entry ``name`` to ``array`` (small entries: metadata, file lists)."""
        e = self._entry(name, np.asanyarray(array))
        e["whole"] = np.asanyarray(array)

    def close(self) -> None:
        """Assemble the archive and move it into place."""
        from ..modelio import write_atomic_from

        tmp = os.path.join(self._dir, "archive.npz")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, e in self._entries.items():
                e["fh"].close()
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16
                whole = np.concatenate(e["objects"]) if "objects" in e else e["whole"]
                if whole is not None:
                    import io
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, whole, allow_pickle=whole.dtype.kind == "O")
                    zf.writestr(info, buf.getvalue())
                    os.unlink(e["raw"])
                    continue
                head = _header_bytes((e["rows"], *e["tail"]), e["dtype"])
                info.file_size = len(head) + os.path.getsize(e["raw"])
                with zf.open(info, "w") as dst, open(e["raw"], "rb") as src:
                    dst.write(head)
                    shutil.copyfileobj(src, dst, _COPY)
                os.unlink(e["raw"])
        write_atomic_from(self.path, tmp)
        self._cleanup()

    def _cleanup(self) -> None:
        for e in self._entries.values():
            if not e["fh"].closed:
                e["fh"].close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is None:
            self.close()
        else:
            self._cleanup()


def _header_bytes(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The .npy header ``np.save`` writes for an array of this shape and dtype (C order)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()
