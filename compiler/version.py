"""The package version, in a module of its own so that any module can name it without
importing the package's ``__init__`` (which imports the compiler)."""
from __future__ import annotations

__version__ = "0.1.0"
