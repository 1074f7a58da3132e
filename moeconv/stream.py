"""Streaming: an output tensor as chunks of rows, each produced from source rows through its op chain.

Used by `execute` (to write) and `verify` (to recompute and compare). A chunk is a block of rows of
the tensor's first axis, about `budget` bytes, or part of one row when a single row is bigger (a
235 MB Mixtral expert, when the node can produce part of a row). Tensors whose rows are source
bytes as they are (a pass-through, experts stacked or concatenated along axis 0) are produced as
those bytes, never through torch.
"""

import math
from collections.abc import Iterator
from typing import NamedTuple

from moeconv import dtypes
from moeconv.errors import InternalError, OpError
from moeconv.plan import PlannedTensor

CHUNK_BYTES = 32 * 2**20  # one gpt-oss expert (33 MB bf16) per chunk at most


class Chunk(NamedTuple):
    """Rows start:stop of axis 0; with `inner` = (a, b), rows a:b of axis 1 of the single row
    `start` (stop = start + 1): part of a row too big for one chunk."""

    start: int
    stop: int
    inner: tuple[int, int] | None = None

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.inner is None:
            return (self.stop - self.start, *full[1:])
        return (1, self.inner[1] - self.inner[0], *full[2:])

    def byte_offset(self, full: tuple[int, ...], nbytes: int) -> int:
        """Where this chunk starts inside the tensor's bytes."""
        row_bytes = nbytes // full[0]
        inner = self.inner[0] * (row_bytes // full[1]) if self.inner else 0
        return self.start * row_bytes + inner


def chunks(tensor: PlannedTensor, budget: int = CHUNK_BYTES) -> Iterator[Chunk | None]:
    """Chunks covering the tensor in byte order, or one None for a 0-d tensor."""
    node = tensor.node
    if not node.shape:
        yield None
        return
    rows = node.shape[0]
    if node.nbytes == 0:  # however many rows it claims: one empty chunk
        yield Chunk(0, rows)
        return
    row_bytes = node.nbytes // max(rows, 1)
    if node.splits_rows and len(node.shape) >= 2 and node.shape[1] > 1 and row_bytes > budget:
        step = max(1, budget // max(row_bytes // node.shape[1], 1))
        for row in range(rows):
            for a in range(0, node.shape[1], step):
                yield Chunk(row, row + 1, (a, min(a + step, node.shape[1])))
        return
    if node.single_chunk:
        step = max(rows, 1)
    else:  # whole blocks of the node's row multiple (a scale's block of rows)
        multiple = node.row_multiple
        step = max(multiple, budget // max(row_bytes, 1) // multiple * multiple)
    for start in range(0, rows, step):
        yield Chunk(start, min(start + step, rows))


def chunk_nbytes(tensor: PlannedTensor, rows: Chunk | None) -> int:
    node = tensor.node
    return node.nbytes if rows is None else math.prod(rows.shape(node.shape)) * dtypes.itemsize(node.dtype)


def produce(tensor: PlannedTensor, rows: Chunk | None):
    """Chunk `rows` of the tensor: a contiguous tensor, or for a byte copy a tuple of memoryviews
    (one per source range: a stacked expert's gate rows, then its up rows) to write in turn.
    A chunk that disagrees with the plan is an InternalError naming the rule and key."""
    node = tensor.node
    if node.copies_bytes:
        if rows is None:  # a 0-d tensor: a source's own
            return (node.checkpoint.read_bytes(node.key),)
        found = node.pieces(rows.start, rows.stop) if rows.inner is None else node.pieces(*rows.inner, within=rows.start)
        return tuple(source.checkpoint.read_bytes(source.key, a, b, within=within) for source, a, b, within in found)
    try:
        if rows is None:
            chunk = node.whole()
        elif rows.inner is None:
            chunk = node.rows(rows.start, rows.stop)
        else:
            chunk = node.rows_within(rows.start, *rows.inner).unsqueeze(0)
    except OpError as error:  # data-dependent problems (fp16 overflow) only show up here
        raise OpError(f"'{tensor.key}' (rule '{'/'.join(tensor.rules)}'): {error}") from None
    expected = node.shape if rows is None else rows.shape(node.shape)
    if tuple(chunk.shape) != tuple(expected) or dtypes.to_safetensors(chunk.dtype) != node.dtype:
        raise InternalError(
            f"rule '{'/'.join(tensor.rules) or 'pass-through'}' produced {chunk.dtype} {list(chunk.shape)} for "
            f"'{tensor.key}' rows {rows}, the plan says {node.dtype} {list(expected)}: this is a moeconv bug"
        )
    return chunk.contiguous()


def as_bytes(chunk) -> bytes:
    """A produced chunk's bytes (for comparisons; a conversion writes the chunk as it is)."""
    if isinstance(chunk, tuple):
        return b"".join(piece.tobytes() for piece in chunk)
    import torch

    return chunk.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
