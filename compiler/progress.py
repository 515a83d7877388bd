"""Progress bars on stderr for long work (calibration, simulation)."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import click

T = TypeVar("T")


def progress(items: Iterable[T], length: int, label: str, enabled: bool) -> Iterator[T]:
    """Iterate ``items`` with a click progress bar on stderr when ``enabled``."""
    if not enabled:
        yield from items
        return
    with click.progressbar(items, length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        yield from bar
