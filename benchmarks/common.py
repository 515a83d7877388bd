"""What the benchmark scripts share: where the repository is, the command that made a result
(every result a script writes starts with it), markdown tables by T, and plots against T.

Each script in benchmarks/ answers one question (the list is in docs/architecture.md); it
imports this module as ``common`` (scripts run as ``python benchmarks/<script>.py``, so this
folder is on ``sys.path``). matplotlib is optional: ``pyplot()`` is None without it.
"""
from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """The running command as results record it: ``python benchmarks/<script>.py <arguments>``."""
    return f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def md_row(cells: Iterable[Any]) -> str:
    """One row of a markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_rule(columns: int) -> str:
    """The line under the header of a markdown table of ``columns`` columns."""
    return "|" + "---|" * columns


def T_header(first: Sequence[str], Ts: Sequence[int], last: Sequence[str] = ()) -> list[str]:
    """Header and rule of a table with the columns ``first``, one per T (``T=4``), ``last``."""
    cells = [*first, *(f"T={T}" for T in Ts), *last]
    return [md_row(cells), md_rule(len(cells))]


def mac_share_cell(pct: dict[str, float], keys: Sequence[str], sep: str = " / ") -> str:
    """Shares (%) of a compiled model's MACs (metadata ``macs`` in percent) in the order ``keys``,
    with the share of the weighted ops that read another weighted op's current (``analog_current``,
    absent from models compiled before it was counted apart) appended where there is one."""
    cell = sep.join(f"{pct.get(k, 0):.0f}" for k in keys)
    return cell + (f" (+ {pct['analog_current']:.0f} on currents)" if pct.get("analog_current") else "")


def write_results(text: str, md: Path | None, json_path: Path | None, payload: dict[str, Any]) -> None:
    """Print ``text``; write it to ``md`` and ``payload`` (which holds the command) to ``json_path``."""
    print(text)
    if md:
        md.write_text(text + "\n")
    if json_path:
        json_path.write_text(json.dumps(payload, indent=1) + "\n")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def T_axis(ax: Any, Ts: Sequence[int], title: str, ylabel: str) -> None:
    """An axis against T: log2 scale with a tick at every T, title, labels, grid and legend."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(Ts, [str(T) for T in Ts])
    ax.set_title(title)
    ax.set_xlabel("T (timesteps)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out and write a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def extra_options(pairs: list[str]) -> dict[str, object]:
    """``--extra key=value`` compile options: integers and true / false parsed, dashes as underscores."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        parsed: object = value
        if value.lstrip("-").isdigit():
            parsed = int(value)
        elif value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        out[key.replace("-", "_")] = parsed
    return out
