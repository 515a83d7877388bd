"""ann2snn: training-free conversion of pretrained ONNX ANNs into spiking ONNX graphs.

This package is the compiler proper (``compile``, ``CompileConfig``, the pipeline and what
it needs); ``cli``, ``data``, ``analysis`` and ``export`` are the tools around it, and
``passes`` and ``runtime`` live in folders of their own (docs/architecture.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    Ann2SnnError,
    ConfigError,
    DataError,
    ModelLoadError,
    NonFiniteError,
    PassError,
    ResourceError,
    UnsupportedModelError,
)
from .version import __version__

if TYPE_CHECKING:
    from .api import compile
    from .config import CompileConfig


def __getattr__(name: str) -> Any:
    """``compile`` and ``CompileConfig`` are imported on first use: the command line's start-up
    (``ann2snn --help``, ``ann2snn run``) then loads neither the passes nor onnx-graphsurgeon."""
    if name == "compile":
        from .api import compile as value
    elif name == "CompileConfig":
        from .config import CompileConfig as value
    else:
        raise AttributeError(f"module 'ann2snn' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "Ann2SnnError",
    "CompileConfig",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "NonFiniteError",
    "PassError",
    "ResourceError",
    "UnsupportedModelError",
    "__version__",
    "compile",
]
