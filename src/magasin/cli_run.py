"""Running a CLI command's coroutine: a store or bus error is one red line and exit 1."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import typer
from rich.console import Console

from magasin.shared.errors import MagasinError

T = TypeVar("T")
console = Console()


def run_command(coro: Coroutine[Any, Any, T]) -> T:
    """The coroutine's result; a MagasinError (server down, unknown id…) printed in red,
    then exit status 1, without a traceback."""
    try:
        return asyncio.run(coro)
    except MagasinError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
