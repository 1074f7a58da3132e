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

from moeconv.display import Column, KeyRow, human_bytes, key_table, print_all, printable, shape_text
from moeconv.keys import collapse_keys, natural_key
from moeconv.source import Checkpoint, TensorInfo

ALIGN = 16  # what "aligned" means here: the data of a tensor starts at a multiple of 16 bytes


def _relative_path(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _relative(info: TensorInfo, root: Path) -> str:
    return _relative_path(info.file, root)


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


def _numbers(values: list[int]) -> str:
    """[1, 2, 3] -> '1...3'; [1, 3] -> '1,3'."""
    values = sorted(set(values))
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}...{values[-1]}"
    return ",".join(map(str, values))


def _file_legend(names: list[str]) -> str:
    """What the file numbers stand for: '(file N = model-{00001...00003}-of-00003.safetensors)' when
    the numbers are the shard numbers, else every file with its number."""
    matches = [_SHARD_NAME.match(n) for n in names]
    if all(matches) and [int(m[2]) for m in matches] == list(range(1, len(names) + 1)):
        return f"(file N = {_files_cell(names)})"
    return "(files: " + ", ".join(f"{i} = {name}" for i, name in enumerate(names, 1)) + ")"


def render(checkpoint: Checkpoint, console: Console, *, wide: bool = False) -> None:
    """The human view: grouped tensor table (every key whole at the console's width, see
    moeconv.display.key_table), bytes per dtype, totals."""
    root = checkpoint.root
    names = [_relative_path(p, root) for p in checkpoint.files]
    number = {name: i for i, name in enumerate(names, 1)}
    columns = [Column("dtype"), Column("shape"), Column("count", right=True, optional=True), Column("bytes", right=True)]
    if len(names) > 1:
        columns.append(Column("file", optional=True, legend=_file_legend(names)))
    columns.append(Column(f"aligned{ALIGN}", right=True))
    rows = []
    for row in group_rows(checkpoint):
        cells = [row.dtype, shape_text(row.shape), f"x{len(row.members)}", human_bytes(row.nbytes)]
        if len(names) > 1:
            cells.append(_numbers([number[_relative(m, root)] for m in row.members]))
        cells.append(f"{row.aligned}/{len(row.members)}")
        rows.append(KeyRow(row.pattern, tuple(cells)))
    total = sum(info.nbytes for info in checkpoint.tensors.values())
    title = f"{checkpoint.origin}: {len(checkpoint.tensors)} tensors, {human_bytes(total)}"
    parts = key_table(console, title, columns, rows, wide=wide)

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
        dtype_table.add_row(*map(Text, (printable(dtype), str(count), f"{human_bytes(nbytes)} ({nbytes})")))

    aligned = sum(info.begin % ALIGN == 0 for info in checkpoint.tensors.values())
    count = len(checkpoint.tensors)
    print_all(console, *parts, "", dtype_table, "", wide=wide)
    console.print(
        f"total: {count} tensors, {human_bytes(total)} ({total} bytes), {len(checkpoint.files)} files, "
        f"{aligned}/{count} {ALIGN}-byte aligned",
        markup=False,
        highlight=False,
    )
