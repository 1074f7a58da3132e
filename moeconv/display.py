"""Small formatting helpers shared by the human views (inspect, plan, load report)."""

import re

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table

# C0/C1 controls (ESC starts terminal sequences, OSC sets titles), zero-width, line/paragraph
# separators and bidi overrides: never sent to a terminal as they are.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def visible(text: object) -> str:
    """`text` with control characters as visible escapes (ESC -> \\x1b, newline -> \\n): a key or
    name from a file can neither drive the terminal nor break a one-line message."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def safe(text: object) -> str:
    """A user-supplied string (key, rule name, config value) to embed in rich markup: shown exactly
    as typed (`[/bad]` is text, not a closing tag), control characters as `visible` escapes."""
    return escape(visible(text))


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
