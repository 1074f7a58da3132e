"""Small formatting helpers shared by the human views (inspect, plan, load report, progress).

Tables of keys keep every key whole at any width: `key_table` takes the first layout that fits, from
full keys with every column; long notes (op chains) as numbered references listed under the table;
keys as a tree (the part up to a layer or expert index becomes a heading line, the rows under it
indented); optional columns dropped; to, at last, one record per key. Off a terminal (pipes, CI
logs) the first always fits: every row stays one greppable line.
"""

import re
import unicodedata
from dataclasses import dataclass

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def _visible(char: str) -> str:
    if char in _BIDI or unicodedata.category(char) == "Cc":
        return char.encode("unicode_escape").decode("ascii")
    return char


def printable(text: str) -> str:
    """`text` with control characters (and bidi overrides) as visible escapes such as `\\x1b`, so a
    key or file name cannot move the cursor, recolour the terminal or reorder what follows."""
    text = str(text)
    return text if text.isprintable() else "".join(map(_visible, text))


def safe(text: str) -> str:
    """`text` (a key, rule name or path from the user's files) ready to print with rich markup on:
    `printable`, and `[...]` escaped so rich shows it instead of reading it as a style."""
    return escape(printable(text))


def human_bytes(count: int) -> str:
    """1536 -> '1.50 KiB'; exact bytes below 1 KiB. Binary units everywhere (tables, progress)."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.2f} {unit}"
    raise AssertionError("unreachable")


def shape_text(shape) -> str:
    """(4, 64) -> '[4, 64]'."""
    return "[" + ", ".join(map(str, shape)) + "]"


def print_all(console: Console, *parts: RenderableType, wide: bool = False) -> None:
    """Print tables and lines. Off a terminal (pipes, tests, CI logs), or `wide`, the console is
    widened to the widest table for the duration, so every row stays one greppable line."""
    width = console.width
    if wide or not console.is_terminal:
        console.width = max([width, *(_width(console, p) for p in parts if isinstance(p, Table))])
    try:
        for part in parts:
            console.print(part, highlight=False)
    finally:
        console.width = width


def _width(console: Console, table: Table) -> int:
    return table.__rich_measure__(console, console.options.update(width=1_000_000)).maximum


# ---- tables of keys --------------------------------------------------------------------------------

# The end of a tree level: a numeric key segment, or a collapsed index set ({0...23}, {0,2}), then a dot.
_LEVEL_END = re.compile(r"(?:^|(?<=\.))(?:[0-9]+|\{[0-9][0-9.,]*\})\.")


def key_levels(pattern: str) -> list[str]:
    """'model.layers.{0...3}.mlp.experts.{0...7}.w1.weight' ->
    ['model.layers.{0...3}.', 'mlp.experts.{0...7}.', 'w1.weight']."""
    levels, start = [], 0
    for match in _LEVEL_END.finditer(pattern):
        levels.append(pattern[start : match.end()])
        start = match.end()
    return [*levels, pattern[start:]] if start < len(pattern) else levels


def key_tree(patterns: list[str]) -> list[tuple[str, int | None]]:
    """Lines of the key column: (text, index of the row) or (heading text, None). Consecutive rows
    sharing a level (at least two) get it as a heading and are indented under it, so
    `model.layers.{0...23}.` is written once; heading + indented parts = the whole key."""
    levels = [key_levels(p) for p in patterns]
    lines: list[tuple[str, int | None]] = []

    def walk(rows: list[int], depth: int) -> None:
        i = 0
        while i < len(rows):
            parts = levels[rows[i]]
            j = i + 1
            if depth < len(parts) - 1:
                while j < len(rows) and len(levels[rows[j]]) - 1 > depth and levels[rows[j]][depth] == parts[depth]:
                    j += 1
            if j - i >= 2:
                lines.append(("  " * depth + parts[depth], None))
                walk(rows[i:j], depth + 1)
            else:
                lines.append(("  " * depth + "".join(parts[depth:]), rows[i]))
                j = i + 1
            i = j

    walk(list(range(len(patterns))), 0)
    return lines


@dataclass(frozen=True)
class Column:
    """A column of a key table (after the key column)."""

    header: str
    right: bool = False  # right-justified (numbers)
    optional: bool = False  # may be dropped when the console is too narrow (the last optional one first)
    legend: str = ""  # a line printed under the table while the column is shown (what its values stand for)


@dataclass(frozen=True)
class KeyRow:
    """One row: a key (pattern), plain-text cells (one per Column), and a long note for the last
    column (an op chain; shown inline or as a numbered reference), styles per cell optional."""

    key: str
    cells: tuple[str, ...]
    note: str = ""
    styles: tuple[str, ...] = ()


def key_table(
    console: Console, title: str, columns: list[Column], rows: list[KeyRow], *, note_header: str = "", wide: bool = False
) -> list[RenderableType]:
    """The table (and the notes' legend) that shows every key whole on `console`; see the module doc.
    `wide`: full keys and inline notes whatever the width (lines may be longer than the terminal)."""
    note_header = note_header if any(row.note for row in rows) else ""
    optional = [i for i, c in enumerate(columns) if c.optional]
    # (keys as a tree, notes inline, columns dropped), from the widest layout to the narrowest
    tiers = [(False, True, ()), (False, False, ()), (True, True, ()), (True, False, ())]
    tiers += [(True, False, tuple(optional[-k:])) for k in range(1, len(optional) + 1)]
    limit = console.width if console.is_terminal and not wide else None
    seen = set()
    for tree, inline, dropped in tiers:
        inline = inline or not note_header
        if (tree, inline, dropped) in seen:
            continue
        seen.add((tree, inline, dropped))
        parts = _build(title, columns, rows, note_header, tree=tree, inline=inline, dropped=dropped)
        if limit is None or _width(console, parts[0]) <= limit:
            return parts
    return _records(title, columns, rows)


def _notes(rows: list[KeyRow]) -> dict[str, str]:
    """note -> its reference, '(1)', '(2)', ... in order of first use."""
    refs: dict[str, str] = {}
    for row in rows:
        if row.note and row.note not in refs:
            refs[row.note] = f"({len(refs) + 1})"
    return refs


def _build(title, columns, rows, note_header, *, tree: bool, inline: bool, dropped: tuple[int, ...]) -> list[RenderableType]:
    kept = [i for i in range(len(columns)) if i not in dropped and any(row.cells[i] for row in rows)]
    table = Table(title=Text(printable(title)), title_justify="left", box=None, pad_edge=False)
    table.add_column("key", no_wrap=True)
    for i in kept:
        table.add_column(columns[i].header, justify="right" if columns[i].right else "left", no_wrap=True)
    if note_header:
        table.add_column(note_header, no_wrap=True)
    refs = _notes(rows)
    lines = key_tree([r.key for r in rows]) if tree else [(r.key, i) for i, r in enumerate(rows)]
    for text, index in lines:
        if index is None:
            table.add_row(Text(printable(text), style="bold"))
            continue
        row = rows[index]
        styles = row.styles or ("",) * len(row.cells)
        cells = [Text(printable(row.cells[i]), style=styles[i]) for i in kept]
        if note_header:
            cells.append(Text(printable(row.note) if inline else refs.get(row.note, "")))
        table.add_row(Text(printable(text)), *cells)
    parts: list[RenderableType] = [table]
    if note_header and not inline:
        parts += [Text(f"{ref} {printable(note)}") for note, ref in refs.items()]
    parts += [Text(printable(columns[i].legend)) for i in kept if columns[i].legend]
    if dropped:
        names = ", ".join(columns[i].header for i in dropped)
        parts.append(Text(f"({names}: not shown at this width; --wide shows every column)", style="dim"))
    return parts


def _records(title: str, columns: list[Column], rows: list[KeyRow]) -> list[RenderableType]:
    """The narrowest layout: each key on its own line, its values on the next."""
    parts: list[RenderableType] = [Text(printable(title))]
    for row in rows:
        values = [f"{c.header} {cell}" for c, cell in zip(columns, row.cells) if cell]
        if row.note:
            values.append(row.note)
        parts += [Text(printable(row.key)), Text(printable("    " + ", ".join(values)))]
    return parts
