"""Small formatting helpers shared by the human views (inspect, plan, load report)."""

from rich.console import Console, RenderableType
from rich.table import Table

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}


def safe(text: str) -> str:
    """A string from a file or recipe, ready for a rich markup string: markup escaped
    (`m.[/bad].w` stays text) and control characters (ESC, OSC, NUL, newlines) shown as \\xNN."""
    from rich.markup import escape

    return escape(str(text).translate(_CONTROL))


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


def print_all(console: Console, *parts: RenderableType) -> None:
    """Print tables and lines. Off a terminal (pipes, tests, CI logs) the console is widened to the
    widest table for the duration, so every row stays one greppable line."""
    width = console.width
    if not console.is_terminal:
        options = console.options.update(width=1_000_000)
        widths = [p.__rich_measure__(console, options).maximum for p in parts if isinstance(p, Table)]
        console.width = max([width, *widths])
    try:
        for part in parts:
            console.print(part, highlight=False)
    finally:
        console.width = width
