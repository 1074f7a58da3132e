"""Lazy tensors: what the plan builds and `stream` pulls rows from.

A node knows its dtype (a safetensors name) and shape without data (ops' shape rules) and produces
rows start:stop of its first axis on demand. How an op node does that is the op's own row map
(moeconv.ops): `SameRows` applies the op to the matching rows of its inputs, so a
[128, 2880, 5760] output is computed expert by expert; `MovesRows` gathers input rows as they are
(and when those are source bytes, `pieces` says where, so they are copied as bytes); an op with no
row map is computed whole once and sliced (`materializes` says so, and the plan reports it).
Nothing here names an op.
"""

from __future__ import annotations

import importlib
import math
import threading
from typing import TYPE_CHECKING

from moeconv import arena, dtypes, ops

if TYPE_CHECKING:
    import torch

SourcePiece = tuple["SourceNode", int, int, "int | None"]  # (source tensor, start, stop, within)


class Node:
    """A tensor that can be produced in row blocks of its first axis."""

    dtype: str  # safetensors name
    shape: tuple[int, ...]
    materializes: bool = False  # computed whole before slicing (memory grows with this tensor)
    splits_rows: bool = False  # rows_within (and pieces within a row) produce only what they return
    copies_bytes: bool = False  # every row is some source tensor's rows as they are: `pieces` says where
    row_multiple: int = 1  # row blocks starting at a multiple of this are computed without waste
    single_chunk: bool = False  # produce it in one piece (any smaller piece recomputes the whole)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of axis 0 (only for tensors with at least one dimension)."""
        raise NotImplementedError

    def rows_within(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the first axis of row `index` (for rows too big for one chunk)."""
        return self.rows(index, index + 1)[0, start:stop]

    def whole(self) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Drop any cached data (called once the tensor is written)."""

    def pieces(self, start: int, stop: int, within: int | None = None) -> list[SourcePiece]:
        """Where rows start:stop (of row `within`'s own first axis, when given) are in the source,
        in byte order; only when `copies_bytes`."""
        raise TypeError(f"{type(self).__name__}: its rows are computed, not source bytes")


class SourceNode(Node):
    """A tensor of the source checkpoint, read by row blocks."""

    splits_rows = True
    copies_bytes = True

    def __init__(self, checkpoint, key: str, dtype: str, shape: tuple[int, ...]):
        self.checkpoint, self.key, self.dtype, self.shape = checkpoint, key, dtype, shape

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.checkpoint.read(self.key, start, stop)

    def rows_within(self, index: int, start: int, stop: int) -> torch.Tensor:
        return self.checkpoint.read(self.key, start, stop, within=index)

    def whole(self) -> torch.Tensor:
        return self.checkpoint.read(self.key)

    def pieces(self, start: int, stop: int, within: int | None = None) -> list[SourcePiece]:
        return [(self, start, stop, within)]


class OpNode(Node):
    """Output `index` of a registered op applied to input nodes (params already checked)."""

    def __init__(self, op: str, params: dict, inputs: list[Node], index: int, dtype: str, shape: tuple):
        self.op, self.params, self.inputs, self.index = op, params, inputs, index
        self.dtype, self.shape = dtype, tuple(shape)
        specs = [(node.dtype, node.shape) for node in inputs]
        self.map = ops.get_op(op).rows(params, specs, index) if self.shape else None
        self.materializes = self.map is None and bool(inputs[0].shape)
        moves = isinstance(self.map, ops.MovesRows)
        inputs_split = all(node.splits_rows for node in inputs)
        self.splits_rows = moves and self.map.within_ok and (inputs_split or not self.map.passes_within)
        # Rows moved as they are from nodes that are themselves source bytes: copied as bytes.
        self.copies_bytes = (
            moves
            and all(node.copies_bytes and node.dtype == self.dtype for node in inputs)
            and (inputs_split or not self.map.asks_within)
        )
        # rows within rows of an input that cannot produce part of a row: each would compute the row
        self.single_chunk = self.materializes or (moves and self.map.asks_within and not inputs_split)
        if isinstance(self.map, ops.SameRows):
            self.row_multiple = math.lcm(self.map.multiple, *(node.row_multiple for node in inputs))
        self._cache: torch.Tensor | None = None
        self._lock = threading.Lock()

    def _apply(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return ops.run(self.op, tensors, self.params)[self.index]

    def _moved(self, start: int, stop: int, within: int | None) -> torch.Tensor:
        """Rows gathered from the inputs' rows, flat, in byte order."""
        import torch

        parts = []
        for i, a, b, row in self.map.pieces(start, stop, within):
            node = self.inputs[i]
            part = node.rows(a, b) if row is None else node.rows_within(row, a, b)
            parts.append(part.reshape(-1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.map, ops.MovesRows):
            return self._moved(start, stop, None).view(stop - start, *self.shape[1:])
        if isinstance(self.map, ops.SameRows):
            step = self.row_multiple
            lo, hi = start - start % step, min(-(-stop // step) * step, self.shape[0])  # whole blocks
            ranges = self.map.inputs(lo, hi) if self.map.inputs else [(lo, hi)] * len(self.inputs)
            out = self._apply([node.rows(a, b) for node, (a, b) in zip(self.inputs, ranges)])
            return out if (lo, hi) == (start, stop) else out[start - lo : stop - lo]
        with self._lock:  # compute threads asking for different rows share one whole computation
            if self._cache is None:
                with arena.lending(None):  # it outlives the chunk that asked first
                    self._cache = self.whole()
            return self._cache[start:stop]

    def rows_within(self, index: int, start: int, stop: int) -> torch.Tensor:
        if self.splits_rows:
            return self._moved(start, stop, index).view(stop - start, *self.shape[2:])
        return super().rows_within(index, start, stop)

    def whole(self) -> torch.Tensor:
        if self._cache is not None:
            return self._cache
        return self._apply([node.whole() for node in self.inputs])

    def pieces(self, start: int, stop: int, within: int | None = None) -> list[SourcePiece]:
        if not self.copies_bytes:
            return super().pieces(start, stop, within)
        found = []
        for i, a, b, row in self.map.pieces(start, stop, within):
            found += self.inputs[i].pieces(a, b, row)
        return found

    def release(self) -> None:
        with self._lock:
            self._cache = None
        for node in self.inputs:
            node.release()

    def __getstate__(self) -> dict:
        """Pickled without its lock, cache and row map (closures): a plan slice sent to another
        process (moeconv.distributed) holds op names and parameters, and the row map is rebuilt there."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("map", "_cache", "_lock")}
        state["module"] = ops.get_op(self.op).fn.__module__  # imported there if it registers an op of its own
        return state

    def __setstate__(self, state: dict) -> None:
        module = state.pop("module")
        if state["op"] not in ops.OPS:
            importlib.import_module(module)
        self.__dict__.update(state)
        specs = [(node.dtype, node.shape) for node in self.inputs]
        self.map = ops.get_op(self.op).rows(self.params, specs, self.index) if self.shape else None
        self._cache, self._lock = None, threading.Lock()


def infer_outputs(op: str, params: dict, inputs: list[Node]) -> list[ops.Spec]:
    """Output dtypes and shapes of an op on these inputs, from metadata only."""
    return ops.infer(op, [(node.dtype, node.shape) for node in inputs], params)
