"""One exception family for everything ann2snn reports to its users.

Every message names what is wrong (a node, an input, a file), the problem and the
remedy. The CLI turns these into a one-paragraph message and an exit code; the
traceback is shown only under ``--verbose``.
"""
from __future__ import annotations

from dataclasses import dataclass


class Ann2SnnError(Exception):
    """Base class of all errors ann2snn raises on purpose."""

    exit_code: int = 1


class ConfigError(Ann2SnnError):
    """An option has a value that cannot work (e.g. ``T <= 0``)."""

    exit_code = 2


class ModelLoadError(Ann2SnnError):
    """The file is not a readable, valid ONNX model."""

    exit_code = 3


@dataclass(frozen=True)
class NodeProblem:
    """One offending node: its name, ``domain::op_type``, the problem and the remedy."""

    node: str
    op: str
    problem: str
    remedy: str

    def __str__(self) -> str:
        return f"node '{self.node}' ({self.op}) {self.problem}; {self.remedy}"


class UnsupportedModelError(Ann2SnnError):
    """The graph contains nodes the compiler cannot convert; all of them are listed."""

    exit_code = 3

    def __init__(self, problems: list[NodeProblem], header: str | None = None) -> None:
        self.problems = list(problems)
        head = header or f"the model has {len(self.problems)} node(s) that ann2snn cannot convert"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class PassError(Ann2SnnError):
    """A pass failed; the message names the pass and the passes that ran before it."""

    exit_code = 3


class DataError(Ann2SnnError):
    """Calibration, evaluation or runtime data do not match the model."""

    exit_code = 4


class ResourceError(Ann2SnnError):
    """A job would exceed a resource limit the user can raise (e.g. --max-memory)."""

    exit_code = 5


class NonFiniteError(Ann2SnnError):
    """A run produced NaN or inf in an output; the message names the output and the step."""

    exit_code = 4


class SearchError(Ann2SnnError):
    """The recipe search found no candidate good enough; the message gives the figures and the
    best recipe, and ``record`` the whole search (what ``--report`` would hold)."""

    exit_code = 3

    def __init__(self, message: str, record: dict | None = None) -> None:
        super().__init__(message)
        self.record = record or {}
