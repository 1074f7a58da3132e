"""Small formatting helpers shared by the human views (inspect, plan, load report)."""

from rich.console import Console, RenderableType
from rich.table import Table


def human_bytes(count: int) -> str:
    """1536 -> '1.50 KiB'; exact bytes below 1 KiB."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.2f} {unit}"
    raise AssertionError("unreachable")


def wide_console(console: Console, *tables: Table) -> Console:
    """Off a terminal (pipes, tests, CI logs) a console as wide as the widest table, so every row
    stays one greppable line; on a terminal the console itself (rich wraps to the screen)."""
    if console.is_terminal:
        return console
    widths = [t.__rich_measure__(console, console.options.update(width=1_000_000)).maximum for t in tables]
    return Console(file=console.file, width=max([console.width, *widths]), soft_wrap=True, color_system=None, highlight=False)


def print_all(console: Console, *parts: RenderableType) -> None:
    """Print tables and lines, widened off a terminal (see wide_console)."""
    console = wide_console(console, *(p for p in parts if isinstance(p, Table)))
    for part in parts:
        console.print(part, markup=False, highlight=False)
