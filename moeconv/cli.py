"""The command line: parse, call the library, render. Thin on purpose.

Every MoeconvError becomes one line on stderr and exit code 1 (MOECONV_DEBUG=1 shows the traceback);
usage errors are typer's exit code 2. Machine output (--json) is the only thing on stdout.
"""

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moeconv.errors import MoeconvError

app = typer.Typer(
    name="moeconv",
    help="Convert Mixture-of-Experts checkpoints into the layout a backend wants, before it is loaded.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)



def command(name: str | None = None, **kwargs) -> Callable:
    """app.command() plus the one error funnel: MoeconvError -> one line on stderr, exit code 1."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(*args, **kw):
            try:
                return fn(*args, **kw)
            except MoeconvError as error:
                if os.environ.get("MOECONV_DEBUG") == "1":
                    raise
                stderr.print(f"error: {error}", markup=False, highlight=False)
                raise typer.Exit(1) from None

        return app.command(name, **kwargs)(guarded)

    return decorate


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]


# ---- inspect ---------------------------------------------------------------------------------------
# (owned by the foundation work: reader + inspect rendering)


# ---- entry point -----------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    app()
