"""`moeconv inspect`: what is inside a checkpoint, from its headers only.

`inspect_json` is the machine view (every tensor); `render` is the human view, where keys that
differ only in layer/expert indices collapse into one row as long as dtype and shape agree.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from moeconv.display import human_bytes, print_all
from moeconv.keys import collapse_keys, natural_key
from moeconv.source import Checkpoint, TensorInfo

ALIGN = 16  # what "aligned" means here: the data of a tensor starts at a multiple of 16 bytes


def _relative(info: TensorInfo, root: Path) -> str:
    try:
        return str(info.file.relative_to(root))
    except ValueError:
        return str(info.file)


def inspect_json(checkpoint: Checkpoint) -> dict:
    """Every tensor with its file, absolute offset, size and 16-byte alignment."""
    by_dtype: dict[str, int] = {}
    tensors = []
    for info in checkpoint.tensors.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
        tensors.append(
            {
                "key": info.key,
                "dtype": info.dtype,
                "shape": list(info.shape),
                "file": _relative(info, checkpoint.root),
                "offset": info.begin,
                "nbytes": info.nbytes,
                "aligned16": info.begin % ALIGN == 0,
            }
        )
    return {
        "path": str(checkpoint.root),
        "files": [str(p.relative_to(checkpoint.root)) for p in checkpoint.files],
        "tensors": tensors,
        "total_bytes": sum(by_dtype.values()),
        "bytes_by_dtype": dict(sorted(by_dtype.items())),
    }


@dataclass
class Row:
    """One line of the human view: keys sharing a pattern, dtype and shape."""

    pattern: str
    dtype: str
    shape: tuple[int, ...]
    members: list[TensorInfo]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.members)

    @property
    def aligned(self) -> int:
        return sum(m.begin % ALIGN == 0 for m in self.members)


def group_rows(checkpoint: Checkpoint) -> list[Row]:
    """Collapse numeric key segments, splitting a group wherever dtype or shape differ."""
    rows = []
    for _, members in collapse_keys(checkpoint.tensors):
        parts: dict[tuple, list[str]] = {}
        for key in members:
            info = checkpoint.tensors[key]
            parts.setdefault((info.dtype, info.shape), []).append(key)
        for (dtype, shape), keys in parts.items():
            # Re-collapse the part alone so its pattern shows only its own indices.
            ((pattern, _),) = collapse_keys(keys)
            rows.append(Row(pattern, dtype, shape, [checkpoint.tensors[k] for k in keys]))
    rows.sort(key=lambda row: natural_key(row.members[0].key))
    return rows


_SHARD_NAME = re.compile(r"^(.*-)(\d+)(-of-\d+\.safetensors)$")


def _files_cell(names: list[str]) -> str:
    """One name, or the shard numbers collapsed: model-{00001...00003}-of-00003.safetensors."""
    names = sorted(set(names))
    if len(names) == 1:
        return names[0]
    matches = [_SHARD_NAME.match(n) for n in names]
    if all(matches) and len({(m[1], m[3]) for m in matches}) == 1:
        numbers = [m[2] for m in matches]
        values = [int(n) for n in numbers]
        if values == list(range(values[0], values[-1] + 1)):
            middle = f"{numbers[0]}...{numbers[-1]}"
        else:
            middle = ",".join(numbers)
        return f"{matches[0][1]}{{{middle}}}{matches[0][3]}"
    if len(names) == 2:
        return ", ".join(names)
    return f"{len(names)} files: {names[0]} .. {names[-1]}"


def render(checkpoint: Checkpoint, console: Console) -> None:
    """The human view: grouped tensor table, bytes per dtype, totals."""
    root = checkpoint.root
    table = Table(title=Text(str(root)), title_justify="left", box=None, pad_edge=False)
    table.add_column("key", overflow="fold")
    table.add_column("dtype")
    table.add_column("shape", overflow="fold")
    table.add_column("count", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("files", overflow="fold")
    table.add_column(f"aligned{ALIGN}", justify="right")
    rows = group_rows(checkpoint)
    for row in rows:
        cells = (
            row.pattern,
            row.dtype,
            str(list(row.shape)),
            f"x{len(row.members)}",
            human_bytes(row.nbytes),
            _files_cell([_relative(m, root) for m in row.members]),
            f"{row.aligned}/{len(row.members)}",
        )
        table.add_row(*map(Text, cells))  # Text: names from the file are never read as markup

    by_dtype: dict[str, list[int]] = {}
    for info in checkpoint.tensors.values():
        entry = by_dtype.setdefault(info.dtype, [0, 0])
        entry[0] += 1
        entry[1] += info.nbytes
    dtype_table = Table(title="bytes by dtype", title_justify="left", box=None, pad_edge=False)
    dtype_table.add_column("dtype")
    dtype_table.add_column("tensors", justify="right")
    dtype_table.add_column("bytes", justify="right")
    for dtype, (count, nbytes) in sorted(by_dtype.items()):
        dtype_table.add_row(*map(Text, (dtype, str(count), f"{human_bytes(nbytes)} ({nbytes})")))

    total = sum(info.nbytes for info in checkpoint.tensors.values())
    aligned = sum(info.begin % ALIGN == 0 for info in checkpoint.tensors.values())
    count = len(checkpoint.tensors)
    print_all(console, table, "", dtype_table, "")
    console.print(
        f"total: {count} tensors, {human_bytes(total)} ({total} bytes), {len(checkpoint.files)} files, "
        f"{aligned}/{count} {ALIGN}-byte aligned",
        markup=False,
        highlight=False,
    )
