"""Recycled memory for chunk-sized tensors while a conversion runs.

A conversion allocates the same few sizes over and over (a chunk of source rows, its dequantized
and transposed forms). Fresh memory is expensive: the kernel zeroes every new page, and on this
kind of machine (a VM, 2 cores) zeroing took a third of all CPU time of a gpt-oss conversion,
more than the dequantize kernel. glibc cannot help: blocks above 32 MiB are always mmap'ed fresh
and unmapped on free. So `empty()` hands out views of buffers kept here, and a buffer is reused
only when no tensor refers to its storage any more (torch's storage use count says so), which
makes reuse invisible to the code that holds the tensors.

Recycling is on only inside `recycling()` (the executor's run) and keeps at most `budget` bytes;
outside it, or past the budget, `empty()` is `torch.empty`.
"""

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

MIN_BYTES = 1 << 20  # smaller tensors come from malloc's own free lists
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: without it, no recycling

_lock = threading.Lock()
_buffers: list[tuple[torch.Tensor, int]] = []  # (uint8 buffer, storage use count when nobody else holds it)
_budget = 0  # bytes the pool may keep; 0 = recycling off
_depth = 0  # nested recycling() blocks


def _count(buffer: torch.Tensor) -> int:
    return _use_count(buffer.untyped_storage()._cdata)


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor, in recycled memory when a free buffer of its size (or
    up to twice it) exists."""
    nbytes = math.prod(shape) * dtype.itemsize
    if _budget == 0 or nbytes < MIN_BYTES or _use_count is None:
        return torch.empty(shape, dtype=dtype)
    with _lock:
        idle = [entry for entry in _buffers if _count(entry[0]) == entry[1]]
        fits = [buffer for buffer, _ in idle if nbytes <= buffer.numel() <= 2 * nbytes]
        if fits:  # the smallest, so the big ones stay free for big requests
            return min(fits, key=torch.Tensor.numel)[:nbytes].view(dtype).view(shape)
        kept = sum(buffer.numel() for buffer, _ in _buffers)
        # Over budget: drop idle buffers nobody asks for to keep one of this size. A fresh buffer
        # costs the same zeroing either way, but a kept one is reused by the next request.
        for entry in sorted(idle, key=lambda entry: entry[0].numel()):
            if kept + nbytes <= _budget:
                break
            del _buffers[next(i for i, kept_entry in enumerate(_buffers) if kept_entry is entry)]  # not remove(): == on tensors
            kept -= entry[0].numel()
        if kept + nbytes > _budget:
            return torch.empty(shape, dtype=dtype)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        _buffers.append((buffer, _count(buffer)))
        return buffer.view(dtype).view(shape)


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
                _buffers.clear()  # tensors still out there keep their storage alive; the pool lets go
