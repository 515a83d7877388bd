"""Reading untrusted ONNX files and writing outputs atomically."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import ModelLoadError

log = logging.getLogger(__name__)


def _all_tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _check_external_locations(model: onnx.ModelProto, base: Path) -> None:
    """Refuse external-data locations that leave the model's folder, before anything is read."""
    base_real = base.resolve()
    for tensor in _all_tensors(model.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise ModelLoadError(
                f"tensor '{tensor.name}' stores its data at '{location}', outside the model's folder; "
                "ann2snn only reads external data from files beside the model (re-export with relative locations)"
            )
        target = (base / location).resolve()
        if base_real not in target.parents:
            raise ModelLoadError(
                f"tensor '{tensor.name}' points at '{location}', which resolves outside the model's folder "
                f"({target}); move the data file beside the model"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"tensor '{tensor.name}' needs the external data file '{location}', which is missing; "
                f"place it beside the model in {base}"
            )


def load_model(source: str | os.PathLike[str] | onnx.ModelProto | bytes) -> onnx.ModelProto:
    """Load an ONNX model from a path, bytes or a ModelProto, with its external data.

    Raises ModelLoadError for anything that is not a valid ONNX model.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        base = Path.cwd()
        name = "<model>"
    else:
        if isinstance(source, bytes):
            data, base, name = source, Path.cwd(), "<bytes>"
        else:
            path = Path(source)
            name = str(path)
            if not path.is_file():
                raise ModelLoadError(f"model file '{path}' does not exist; pass the path of an exported .onnx file")
            data, base = path.read_bytes(), path.parent
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise ModelLoadError(
                f"'{name}' is not an ONNX model (protobuf parse failed: {exc}); "
                "check that the file is complete and was written by an ONNX exporter"
            ) from None
    if not model.HasField("graph") or not model.opset_import or len(model.graph.node) == 0:
        raise ModelLoadError(
            f"'{name}' does not contain an ONNX graph (no nodes or no opset); "
            "check that the file is complete and was written by an ONNX exporter"
        )
    _check_external_locations(model, base)
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise ModelLoadError(f"could not read the external data of '{name}': {exc}") from None
    try:  # full_check adds strict shape inference: declared shapes must agree with the graph
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"'{name}' is not a valid ONNX model: {first}; re-export it or repair it with onnx.checker"
        ) from None
    _check_no_empty_tensors(model, name)
    return model


def _check_no_empty_tensors(model: onnx.ModelProto, name: str) -> None:
    """Zero-sized weights or inputs make layers without neurons: refuse them by name. Other
    empty initializers are valid ONNX (e.g. Resize's unused ``roi``) and are accepted."""
    weights = {n.input[1] for n in model.graph.node
               if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1}
    weights |= {n.input[0] for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and n.input}
    for init in model.graph.initializer:
        if 0 in init.dims and init.name in weights:
            raise ModelLoadError(f"'{name}': initializer '{init.name}' has a zero-sized shape {list(init.dims)}; "
                                 "re-export the model without empty layers")
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            raise ModelLoadError(f"'{name}': graph input/output '{vi.name}' has a zero-sized dimension; "
                                 "re-export the model with its real input size")


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic serialisation: the same model always gives the same bytes."""
    return model.SerializeToString(deterministic=True)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` so that ``path`` is either complete or untouched: temp file, fsync, rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _sync_dir(target.parent)


def write_atomic_from(path: str | os.PathLike[str], tmp: str | os.PathLike[str]) -> None:
    """Move the complete file ``tmp`` (on the same file system) to ``path`` durably: fsync, rename."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _sync_dir(Path(path).parent)


def _sync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the file system allows it)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


#: protobuf cannot serialise a message of 2 GiB or more: larger models keep their weights
#: in an external data file beside the model
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str],
               external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """Save a model atomically and deterministically.

    A model of ``external_threshold`` bytes or more is written with its weights in
    ``<name>.data`` beside it (the data file first, then the model, each atomically).
    """
    target = Path(path)
    if model.ByteSize() < external_threshold:
        write_atomic(target, serialize(model))
        return
    out = onnx.ModelProto()
    out.CopyFrom(model)
    location = f"{target.name}.data"
    external_data_helper.convert_model_to_external_data(out, all_tensors_to_one_file=True, location=location,
                                                        size_threshold=1024, convert_attribute=False)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        external_data_helper.write_external_data_tensors(out, tmp)
        data = Path(tmp) / location
        with open(data, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(data, target.parent / location)
    write_atomic(target, serialize(out))

