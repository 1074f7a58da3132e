"""Recycled memory for chunk-sized buffers while a conversion runs.

A conversion allocates the same few sizes over and over (a chunk of source rows, its dequantized
and transposed forms). Fresh memory is expensive: the kernel zeroes every new page, and on this
kind of machine (a VM, 2 cores) zeroing took a third of all CPU time of a gpt-oss conversion,
more than the dequantize kernel. glibc cannot help: blocks above 32 MiB are always mmap'ed fresh
and unmapped on free. So buffers are kept here and handed out again: `empty()` views one as a
tensor, `window()` as raw bytes (pass-through copies, which run before torch is even imported).

Every buffer is an anonymous map: page-aligned, so O_DIRECT reads go straight into it, and backed
by transparent huge pages where the kernel offers them (4 KiB first-touch faults of a fresh chunk
cost as much as the MXFP4 kernel; see moeconv/__init__.py). A buffer is reused only when nothing
refers to it any more: every tensor and memoryview made from it holds a reference to its map,
so its reference count says so, and reuse is invisible to the code that holds them.

Recycling is on only inside `recycling()` (the executor's run) and keeps at most `budget` bytes;
outside it, or past the budget, `empty()` is `torch.empty` and `window()` a map of its own.
"""

from __future__ import annotations  # torch is imported by the first tensor asked for

import contextlib
import math
import mmap
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MIN_BYTES = 1 << 20  # smaller tensors come from malloc's own free lists

_lock = threading.Lock()
_maps: list[mmap.mmap] = []  # the pool
_free_count: dict[int, int] = {}  # id(map) -> its reference count when only the pool holds it (see _count)
_budget = 0  # bytes the pool may keep; 0 = recycling off
_depth = 0  # nested recycling() blocks


def _count(buffer: mmap.mmap) -> int:
    # Called with the map in a local variable and in `_maps`, the same way when it is created as
    # when it is checked, so an idle map always gives its recorded count.
    return sys.getrefcount(buffer)


def _new_map(nbytes: int) -> mmap.mmap:
    buffer = mmap.mmap(-1, max(nbytes, 1))  # page-aligned
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def _take(nbytes: int) -> mmap.mmap | None:
    """An idle pooled map of nbytes (up to twice that), or a new pooled one; None when recycling
    is off, the request is small, or the pool is over budget."""
    if not _budget or nbytes < MIN_BYTES:
        return None
    with _lock:
        idle = [buffer for buffer in _maps if _count(buffer) == _free_count[id(buffer)]]
        fits = [buffer for buffer in idle if nbytes <= len(buffer) <= 2 * nbytes]
        if fits:  # the smallest, so the big ones stay free for big requests
            return min(fits, key=len)
        kept = sum(len(buffer) for buffer in _maps)
        # Over budget: drop idle buffers nobody asks for to keep one of this size. A fresh buffer
        # costs the same zeroing either way, but a kept one is reused by the next request.
        for dropped in sorted(idle, key=len):
            if kept + nbytes <= _budget:
                break
            del _maps[next(i for i, buffer in enumerate(_maps) if buffer is dropped)]
            del _free_count[id(dropped)]
            kept -= len(dropped)
        if kept + nbytes > _budget:
            return None
        buffer = _new_map(nbytes)
        _maps.append(buffer)
        _free_count[id(buffer)] = _count(buffer)
        return buffer


def window(nbytes: int) -> memoryview:
    """`nbytes` of writable, page-aligned memory (recycled when a free buffer fits), as bytes."""
    buffer = _take(nbytes)
    if buffer is None:
        buffer = _new_map(nbytes)
    return memoryview(buffer)[:nbytes]


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor, in recycled memory when a free buffer of its size (or
    up to twice it) exists."""
    import torch

    nbytes = math.prod(shape) * dtype.itemsize
    buffer = _take(nbytes)
    if buffer is None:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(memoryview(buffer)[:nbytes], dtype=torch.uint8).view(dtype).view(shape)


@contextlib.contextmanager
def recycling(budget: int) -> Iterator[None]:
    """Recycle up to `budget` bytes of buffers inside the block; they are freed when it ends."""
    global _budget, _depth
    with _lock:
        _depth += 1
        _budget = max(_budget, budget)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _budget = 0
                _maps.clear()  # tensors and views still out there keep their map alive; the pool lets go
                _free_count.clear()
