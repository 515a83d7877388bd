"""ann2snn: training-free conversion of pretrained ONNX ANNs into spiking ONNX graphs.

This package is the compiler proper (``compile``, ``CompileConfig``, the pipeline and what
it needs); ``cli``, ``data``, ``analysis`` and ``export`` are the tools around it, and
``passes`` and ``runtime`` live in folders of their own (docs/architecture.md).
"""
from __future__ import annotations

import onnxruntime as _ort

# onnxruntime logs its own errors to stderr before raising them; ann2snn turns every one it
# expects into a single clean message, so only fatal onnxruntime logs remain visible.
_ort.set_default_logger_severity(4)

from .api import compile  # noqa: E402
from .config import CompileConfig  # noqa: E402
from .errors import (  # noqa: E402
    Ann2SnnError,
    ConfigError,
    DataError,
    ModelLoadError,
    NonFiniteError,
    PassError,
    ResourceError,
    UnsupportedModelError,
)
from .version import __version__  # noqa: E402

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
