"""The CLI's error handling, shared by its command modules: an Ann2SnnError becomes one
message on stderr and its exit code."""
from __future__ import annotations

import traceback
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from ..errors import Ann2SnnError


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Ann2SnnError -> one message on stderr and its exit code (traceback with --verbose);
    Ctrl-C -> exit 130."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except Ann2SnnError as exc:
            if ctx.obj.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            ctx.exit(130)
    return wrapper
