"""Chunk memory: the executor lends each chunk it computes an arena, and the chunk's reads and
kernel outputs are carved from it.

Why: a conversion allocates the same few sizes over and over (a chunk of source rows, its
dequantized and transposed forms, tens of MB each), and fresh memory is expensive: every new page
is a fault and a zeroing, which took more CPU than the kernels themselves on 2 cores. An arena is
page-aligned memory handed out front to back; the executor owns a fixed ring of them and reuses
one only once the chunk made in it has been written (moeconv.execute), so reuse is safe by
construction. Outside a lending (planning, verify, tests) `empty` is `torch.empty` and `aligned`
a fresh map.
"""

from __future__ import annotations  # torch is imported by the first tensor asked for

import contextlib
import math
import mmap
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PAGE = 4096
_lent = threading.local()  # .arena: the arena lent to this thread's current chunk, if any


def _fresh(nbytes: int) -> mmap.mmap:
    buffer = mmap.mmap(-1, max(nbytes, 1))  # page-aligned
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)  # one fault per 2 MiB where the kernel can
    return buffer


class Arena:
    """`nbytes` of page-aligned memory, handed out front to back until `reset`."""

    def __init__(self, nbytes: int):
        self.buffer = _fresh(nbytes)
        self.used = 0

    def take(self, nbytes: int) -> memoryview | None:
        """The next page-aligned `nbytes`, or None when they do not fit."""
        start = -(-self.used // PAGE) * PAGE
        if start + nbytes > len(self.buffer):
            return None
        self.used = start + nbytes
        return memoryview(self.buffer)[start : start + nbytes]

    def reset(self) -> None:
        self.used = 0


@contextlib.contextmanager
def lending(arena: Arena | None) -> Iterator[None]:
    """Within the block, this thread's `empty` and `aligned` carve from `arena` (None: fresh memory)."""
    previous = getattr(_lent, "arena", None)
    _lent.arena = arena
    try:
        yield
    finally:
        _lent.arena = previous


def aligned(nbytes: int) -> memoryview:
    """`nbytes` of writable, page-aligned memory: from the lent arena when it fits, else fresh."""
    arena = getattr(_lent, "arena", None)
    view = arena.take(nbytes) if arena is not None else None
    return view if view is not None else memoryview(_fresh(nbytes))[:nbytes]


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor: in the lent arena when it fits, else `torch.empty`."""
    import torch

    arena = getattr(_lent, "arena", None)
    nbytes = math.prod(shape) * dtype.itemsize
    view = arena.take(nbytes) if arena is not None and nbytes else None
    if view is None:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(shape)
