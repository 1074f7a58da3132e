"""The one I/O seam for tensor bytes: `Reader` (source files) and `Appender` (output shards).

Direct I/O (O_DIRECT): the disk moves tensor bytes straight to and from our buffers.

Why: a conversion is CPU-bound, and on this kind of machine (a VM, 2 cores) the kernel's copies
through the page cache cost more CPU than the conversion's own kernels. Reading the 3.3 GB input
of a 2-layer gpt-oss checkpoint took 3.7-4.0 s of system time buffered and 0.25 s with O_DIRECT;
writing its 5.6 GB output 2.8-10 s buffered and 0.4-0.5 s direct, at the same or better wall time
O_DIRECT wants file offsets, lengths and memory addresses aligned to the
device's block; ALIGN (4096) covers every common device. Where a filesystem refuses it (tmpfs,
some FUSE mounts; macOS has no O_DIRECT) the same calls fall back to buffered I/O: same bytes.
"""

from __future__ import annotations  # torch is imported by whoever hands over a tensor

import errno
import fcntl
import mmap
import os
from typing import TYPE_CHECKING

from moeconv import arena

if TYPE_CHECKING:
    import torch

ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)
STAGE_BYTES = 16 * 2**20  # per write(): big requests keep the disk busy; one buffer of this much memory
COPY_WITH_TORCH = 1 << 20  # appended tensors this big are copied by torch, which releases the GIL
DIRECT_BYTES = 1 << 20  # reads this big bypass the page cache; smaller ones use it


def round_up(n: int) -> int:
    """n rounded up to a whole number of ALIGN blocks."""
    return -(-n // ALIGN) * ALIGN


def set_direct(fd: int, on: bool) -> bool:
    """Switch O_DIRECT on or off for an open file; False when the filesystem refuses it."""
    if not O_DIRECT:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT if on else flags & ~O_DIRECT)
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    return on


class Reader:
    """Reads byte ranges of one file: ranges of DIRECT_BYTES or more with O_DIRECT into page-aligned
    memory, smaller ones (and all of them where the filesystem refuses O_DIRECT) through the page
    cache. Raises OSError; EOFError when the file ends before the range does."""

    def __init__(self, path: os.PathLike | str):
        self.fd = os.open(path, os.O_RDONLY)
        self.direct_fd: int | None = None
        if O_DIRECT:
            try:
                self.direct_fd = os.open(path, os.O_RDONLY | O_DIRECT)
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    os.close(self.fd)
                    raise

    def read(self, offset: int, nbytes: int) -> memoryview:
        """Bytes offset:offset+nbytes in chunk memory (moeconv.arena; page-aligned when read direct)."""
        if nbytes >= DIRECT_BYTES and self.direct_fd is not None:
            start = offset - offset % ALIGN  # whole blocks around the range
            window = arena.aligned(round_up(offset + nbytes - start))
            if self._fill_direct(window, start, offset + nbytes - start):
                return window[offset - start : offset - start + nbytes]
        view = arena.aligned(nbytes) if nbytes >= DIRECT_BYTES else memoryview(bytearray(nbytes))
        self.read_into(view, offset)
        return view

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill byte `view` from `offset`, through the page cache."""
        done = 0
        while done < view.nbytes:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise EOFError(offset + done)
            done += got

    def _fill_direct(self, window: memoryview, offset: int, needed: int) -> bool:
        """Fill `window` from aligned `offset` until `needed` bytes are in; False when the request
        cannot go direct (refused, or a short read left an unaligned remainder)."""
        done = 0
        while done < needed:
            if done % ALIGN:
                return False
            try:
                got = os.preadv(self.direct_fd, [window[done:]], offset + done)
            except OSError as error:
                if error.errno == errno.EINVAL:
                    return False
                raise
            if got == 0:
                return False  # the end of the file: the buffered read says so
            done += got
        return True

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None


class Appender:
    """Appends bytes to a new empty file through an aligned staging buffer written with O_DIRECT,
    or buffered where the filesystem refuses O_DIRECT. `finish()` writes the tail (padded to a
    block, then the file is cut back to its size). The caller owns and closes `fd`."""

    def __init__(self, fd: int):
        self.fd = fd
        self.direct = set_direct(fd, True)
        self._stage = mmap.mmap(-1, STAGE_BYTES)  # anonymous maps are page-aligned
        self._staged: torch.Tensor | None = None  # the stage as a tensor, once a tensor is appended
        self._fill = 0
        self.size = 0  # bytes appended

    def append(self, view: memoryview, tensor: torch.Tensor | None = None) -> None:
        """Append the bytes of flat byte `view`; `tensor` (optional): the contiguous tensor they belong to."""
        total, done = view.nbytes, 0
        # Big copies go through torch, which releases the GIL that the compute threads need.
        flat = None
        if tensor is not None and total >= COPY_WITH_TORCH:
            import torch

            flat = tensor.reshape(-1).view(torch.uint8)
            if self._staged is None:
                self._staged = torch.frombuffer(self._stage, dtype=torch.uint8)
        while done < total:
            take = min(total - done, STAGE_BYTES - self._fill)
            if flat is None:
                self._stage[self._fill : self._fill + take] = view[done : done + take]
            else:
                self._staged[self._fill : self._fill + take].copy_(flat[done : done + take])
            self._fill += take
            done += take
            if self._fill == STAGE_BYTES:
                self._write(STAGE_BYTES)
        self.size += total

    def finish(self) -> None:
        """Write what is staged; the file then holds exactly `size` bytes."""
        if not self._fill:
            return
        if not self.direct:
            self._write(self._fill)
            return
        padded = round_up(self._fill)
        self._stage[self._fill : padded] = bytes(padded - self._fill)
        self._write(padded)
        os.ftruncate(self.fd, self.size)

    def _write(self, count: int) -> None:
        view = memoryview(self._stage)[:count]
        done = 0
        while done < count:
            try:
                done += os.write(self.fd, view[done:])
            except OSError as error:
                if not (self.direct and error.errno == errno.EINVAL):
                    raise
                self.direct = set_direct(self.fd, False)  # refused after all: buffered from here on
            if done % ALIGN and self.direct:
                self.direct = set_direct(self.fd, False)
        self._fill = 0
