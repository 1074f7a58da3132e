"""Lazy tensors: what the plan builds and the executor pulls rows from.

A node knows its dtype (a safetensors name) and shape without data (ops' shape rules) and produces
rows start:stop of its first axis on demand. Ops that leave axis 0 alone are applied to the same
rows of their inputs, so a [128, 2880, 5760] output is computed expert by expert and memory stays
bounded by a chunk. Ops that act on axis 0 route rows where they can (stack, concat, split,
unstack along dim 0); anything else is computed whole once and sliced (`materializes` says so, and
the plan reports it).
"""

from __future__ import annotations  # torch is imported by the first op that runs, not here

import math
import threading
from typing import TYPE_CHECKING

from moeconv import dtypes, ops

if TYPE_CHECKING:
    import torch


class Node:
    """A tensor that can be produced in row blocks of its first axis."""

    dtype: str  # safetensors name
    shape: tuple[int, ...]
    materializes: bool = False  # computed whole before slicing (memory grows with this tensor)
    splits_rows: bool = False  # rows_within reads only what it returns (a huge row can be chunked)
    copies_bytes: bool = False  # every row is some source tensor's rows as they are: `pieces` says where

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of axis 0 (only for tensors with at least one dimension)."""
        raise NotImplementedError

    def rows_within(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the second axis of row `index` (for rows too big for one chunk)."""
        return self.rows(index, index + 1)[0, start:stop]

    def whole(self) -> torch.Tensor:
        return self.rows(0, self.shape[0]) if self.shape else self._scalar()

    def _scalar(self) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Drop any cached data (called once the tensor is written)."""

    def pieces(self, start: int, stop: int, within: int | None = None) -> list[tuple[SourceNode, int, int, int | None]]:
        """Where rows start:stop (of row `within`'s own first axis, when given) are in the source,
        in order: (source tensor, start, stop, within) row ranges; only when `copies_bytes` (a
        conversion then copies them as bytes, without torch)."""
        raise TypeError(f"{type(self).__name__}: its rows are computed, not source bytes")


class SourceNode(Node):
    """A tensor of the source checkpoint, read zero-copy by row blocks."""

    splits_rows = True
    copies_bytes = True

    def __init__(self, checkpoint, key: str, dtype: str, shape: tuple[int, ...]):
        self.checkpoint, self.key, self.dtype, self.shape = checkpoint, key, dtype, shape

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.checkpoint.read(self.key, start, stop)

    def rows_within(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of row `index`'s own first axis (one expert's slice of a stacked tensor)."""
        return self.checkpoint.read(self.key, start, stop, within=index)

    def _scalar(self) -> torch.Tensor:
        return self.checkpoint.read(self.key)

    def pieces(self, start: int, stop: int, within: int | None = None) -> list[tuple[SourceNode, int, int, int | None]]:
        return [(self, start, stop, within)]


class OpNode(Node):
    """Output `index` of a registered op applied to input nodes."""

    def __init__(self, op: str, params: dict, inputs: list[Node], index: int, dtype: str, shape: tuple):
        self.op, self.params, self.inputs, self.index = op, params, inputs, index
        self.dtype, self.shape = dtype, tuple(shape)
        in_ndim = len(inputs[0].shape)
        dim_ndim = len(self.shape) if op == "stack" else in_ndim  # stack's dim counts in its output
        self._dim = params["dim"] % max(dim_ndim, 1) if "dim" in params else None
        self._leading = ops.get_op(op).touches_leading_axis(params, in_ndim)
        self._router = self._leading and self._route_rows()
        self.materializes = self._leading and self._router is None and in_ndim > 0
        # A stacked expert is rows of its member: a slice of it is a slice of the member.
        self.splits_rows = op == "stack" and callable(self._router) and not any(m.materializes for m in inputs)
        self._cache: torch.Tensor | None = None
        self._lock = threading.Lock()
        # Ops that only move whole rows along dim 0 (a stack of experts, a concat of gate and up)
        # of tensors that are themselves source bytes: their rows are source rows, copied as such.
        # (An unstack only of a source tensor or a stack: rows within rows go no deeper.)
        self.copies_bytes = (
            bool(self.shape)
            and callable(self._router)  # an op along dim 0 that only moves rows
            and self.op in ("stack", "concat", "split", "unstack")
            and all(node.copies_bytes and node.shape and node.dtype == self.dtype for node in inputs)
            and (self.op != "unstack" or isinstance(inputs[0], SourceNode) or inputs[0].op == "stack")
        )

    def _route_rows(self):
        """For ops along dim 0 that only move whole rows: a function (start, stop) -> rows."""
        if self._dim != 0:
            return None
        if self.op == "stack":
            return self._stack_rows
        if self.op == "unstack":
            return lambda a, b: self.inputs[0].rows_within(self.index, a, b)
        if self.op == "split":
            part = self.shape[0]
            return lambda a, b: self.inputs[0].rows(self.index * part + a, self.index * part + b)
        if self.op == "concat":
            return self._concat_rows
        return None

    def rows_within(self, index: int, start: int, stop: int) -> torch.Tensor:
        if self.splits_rows:
            return self.inputs[index].rows(start, stop)  # [stop-start, *member.shape[1:]]
        return super().rows_within(index, start, stop)

    def pieces(self, start: int, stop: int, within: int | None = None) -> list[tuple[SourceNode, int, int, int | None]]:
        if not self.copies_bytes:
            return super().pieces(start, stop, within)
        if within is not None:  # rows of one stacked member (splits_rows); only stacks are asked
            if self.op != "stack":
                raise TypeError(f"{self.op}: no rows within rows")
            return self.inputs[within].pieces(start, stop)
        if self.op == "stack":
            return [piece for member in self.inputs[start:stop] for piece in member.pieces(0, member.shape[0])]
        if self.op == "unstack":
            return self.inputs[0].pieces(start, stop, self.index)
        if self.op == "split":
            offset = self.index * self.shape[0]
            return self.inputs[0].pieces(offset + start, offset + stop)
        found, offset = [], 0  # concat
        for node in self.inputs:
            lo, hi = max(start, offset), min(stop, offset + node.shape[0])
            if lo < hi:
                found += node.pieces(lo - offset, hi - offset)
            offset += node.shape[0]
        return found

    def _stack_rows(self, start: int, stop: int) -> torch.Tensor:
        members = [m.whole() for m in self.inputs[start:stop]]
        if len(members) == 1:  # one expert per chunk (they are large): no copy
            return members[0].unsqueeze(0)  # [1, *member]
        return ops.stack(*members, dim=0)  # [stop-start, *member]

    def _concat_rows(self, start: int, stop: int) -> torch.Tensor:
        pieces, offset = [], 0
        for node in self.inputs:
            lo, hi = max(start, offset), min(stop, offset + node.shape[0])
            if lo < hi:
                pieces.append(node.rows(lo - offset, hi - offset))
            offset += node.shape[0]
        return pieces[0] if len(pieces) == 1 else ops.concat(*pieces, dim=0)

    def _apply(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return ops.apply(self.op, inputs, self.params)[self.index]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if not self._leading:
            return self._apply([node.rows(start, stop) for node in self.inputs])
        if self._router is not None:
            return self._router(start, stop)
        with self._lock:  # compute threads asking for different rows share one whole computation
            if self._cache is None:
                self._cache = self._apply([node.whole() for node in self.inputs])
            return self._cache[start:stop]

    def _scalar(self) -> torch.Tensor:
        return self._apply([node.whole() for node in self.inputs])

    def release(self) -> None:
        with self._lock:
            self._cache = None
        for node in self.inputs:
            node.release()


def infer_outputs(op: str, params: dict, inputs: list[Node]) -> list[ops.Spec]:
    """Output dtypes and shapes of an op on these inputs, from metadata only."""
    return ops.infer(op, [(node.dtype, node.shape) for node in inputs], params)


def chunk_rows(node: Node, budget: int) -> int:
    """How many rows of axis 0 to produce at once so a chunk stays near `budget` bytes."""
    # an unstacked member whose stacked input cannot produce part of a row is produced whole
    whole_member = isinstance(node, OpNode) and node.op == "unstack" and not node.inputs[0].splits_rows
    if not node.shape or node.materializes or whole_member:
        return max(node.shape[0], 1) if node.shape else 1
    row_bytes = max(node.nbytes // max(node.shape[0], 1), 1)
    return max(1, min(node.shape[0], budget // row_bytes))
