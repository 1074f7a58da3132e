"""Streaming, atomic safetensors writer.

Why not `safetensors.torch.save_file`: it needs every tensor of a file in memory at once (a 120b
MoE shard is tens of GB), and it pads the header to 8 bytes only, so every tensor after an
odd-sized one starts misaligned. Here the layout (header, order, offsets) comes from the plan
(`format.layout_shard`), the header is written first, tensor bytes are streamed in whatever chunks
the caller produces (with O_DIRECT from an aligned staging buffer, see directio), and each file
appears under its final name only when complete (temp file in the same folder -> rename).
"""

from __future__ import annotations  # torch is imported by whoever hands over a tensor

import ctypes
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from moeconv import checksum as checksums
from moeconv import directio, dtypes
from moeconv.errors import InternalError, MoeconvError, WriteError
from moeconv.format import INDEX_NAME, ShardLayout, TensorSpec

if TYPE_CHECKING:
    import torch


def fsync_file(path: Path) -> None:
    """fsync a file by path (one written earlier with fsync left for later)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_tensor(data) -> bool:
    return not isinstance(data, bytes | bytearray | memoryview) and hasattr(data, "data_ptr")


def _safetensors_name(dtype) -> str | None:
    try:
        return dtypes.to_safetensors(dtype)
    except MoeconvError:
        return None


def _as_bytes(data) -> tuple[memoryview, torch.Tensor | None]:
    """A flat byte view of `data` without copying (the tensor is returned to keep it alive)."""
    if _is_tensor(data):
        if data.device.type != "cpu":
            data = data.cpu()
        if not data.is_contiguous():
            data = data.contiguous()
        nbytes = data.numel() * data.element_size()
        if nbytes == 0:
            return memoryview(b""), data
        buffer = (ctypes.c_ubyte * nbytes).from_address(data.data_ptr())
        return memoryview(buffer).cast("B"), data
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view, None


class ShardWriter:
    """Write one planned shard: header at once, tensor bytes streamed in layout order.

    with ShardWriter(out_dir, layout) as writer:
        for spec in layout.order:
            for chunk in chunks_of(spec):
                writer.write(spec.key, chunk)
        path = writer.finish()

    The file lives under a temporary name in out_dir until finish() renames it; leaving the
    with-block (or close()) without finish() deletes it. Every byte is hashed as it is written with
    `checksum` (a name in moeconv.checksum.ALGORITHMS), so the report needs no second read.
    """

    def __init__(self, out_dir: Path, layout: ShardLayout, final: Path | None = None, checksum: str = checksums.DEFAULT):
        self.out_dir = Path(out_dir)
        self.layout = layout
        self.final = Path(final) if final is not None else self.out_dir / layout.name  # execute stages shards under another name
        self.algorithm = checksum
        self._hash = checksums.new_hasher(checksum)  # of every byte written, so the report needs no second read
        self._index = 0  # position in layout.order of the tensor being written
        self._done = 0  # bytes of it written so far
        self._finished = False
        try:
            fd, temp = _temp_file(self.final)
        except OSError as error:
            raise WriteError(f"{self.final}: cannot create a file in {self.out_dir}: {error.strerror or error}") from None
        self.temp = Path(temp)
        self._fd = fd
        try:
            try:
                self._file = directio.Appender(fd)  # bytes go to disk straight from an aligned buffer
            except OSError as error:
                raise WriteError(f"{self.final}: cannot set up writing: {error.strerror or error}") from None
            self._put(memoryview(layout.header))
        except BaseException:  # an error, or Ctrl-C, before the caller holds this writer to close it
            self.close()
            raise

    # -- writing ----------------------------------------------------------------------------------

    def _put(self, view: memoryview, tensor: torch.Tensor | None = None) -> None:
        try:
            self._file.append(view, tensor)
        except OSError as error:
            raise WriteError(f"{self.final}: write failed: {error.strerror or error}") from None
        self._hash.update(view)

    @property
    def checksum(self) -> str:
        """Hex digest (with `self.algorithm`) of the bytes written so far (the whole file once finish() returned)."""
        return self._hash.hexdigest()

    def _fail(self, message: str) -> InternalError:
        return InternalError(f"{self.layout.name}: {message}: this is a moeconv bug")

    def _seek_key(self, key: str) -> TensorSpec:
        order = self.layout.order
        if self._finished or self._fd is None:
            raise self._fail(f"'{key}' written after the shard was finished or closed")
        position, done = self._index, self._done
        while position < len(order) and order[position].key != key:
            if done != order[position].nbytes:  # skipping is only allowed over complete tensors
                break
            position, done = position + 1, 0
        if position < len(order) and order[position].key == key:
            self._index, self._done = position, done
            return order[position]
        if key not in self.layout.offsets:
            raise self._fail(f"'{key}' is not in this shard")
        expected = order[self._index] if self._index < len(order) else None
        if expected is not None and self._done < expected.nbytes:
            raise self._fail(f"'{key}' arrived out of order while '{expected.key}' has {self._done} of {expected.nbytes} bytes")
        raise self._fail(f"'{key}' arrived out of order (already written, or a non-empty tensor before it was skipped)")

    def write(self, key: str, data) -> None:
        """Append a chunk of `key`'s bytes (bytes-like or a CPU tensor of the planned dtype)."""
        spec = self._seek_key(key)
        if _is_tensor(data) and _safetensors_name(data.dtype) != spec.dtype:
            raise self._fail(f"'{key}' got a {data.dtype} chunk, the layout says {spec.dtype}")
        view, keep = _as_bytes(data)
        if self._done + view.nbytes > spec.nbytes:
            raise self._fail(f"'{key}' got {self._done + view.nbytes} bytes, more than its {spec.nbytes}")
        if view.nbytes:
            self._put(view, keep)
        self._done += view.nbytes
        del keep

    def finish(self, *, sync: bool = True) -> Path:
        """Check every tensor got exactly its bytes, fsync (unless not `sync`), rename to the final
        name; the final path."""
        order = self.layout.order
        position, done = self._index, self._done
        while position < len(order) and done == order[position].nbytes:
            position, done = position + 1, 0
        if position < len(order):
            spec = order[position]
            self.close()
            raise self._fail(f"'{spec.key}' got {done} of its {spec.nbytes} bytes when the shard was finished")
        try:
            self._file.finish()
            written = os.fstat(self._fd).st_size
            if written != self.layout.size:
                self.close()
                raise self._fail(f"file is {written} bytes, the layout says {self.layout.size}")
            if sync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.temp, self.final)
        except OSError as error:
            self.close()
            raise WriteError(f"{self.final}: cannot complete the file: {error.strerror or error}") from None
        self._finished = True
        if sync:
            fsync_dir(self.out_dir)
        return self.final

    def close(self) -> None:
        """Abandon an unfinished file (delete the temp file); no-op after finish()."""
        if self._finished:
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_UMASK = os.umask(0)
os.umask(_UMASK)


def _temp_file(final: Path) -> tuple[int, str]:
    """A hidden temp file next to `final`, with the permissions a plain open() would give
    (mkstemp makes it 0600, and a served checkpoint must be readable by others)."""
    fd, temp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    return fd, temp


def atomic_write_bytes(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write `data` to `path` via a temp file in the same folder, fsync (unless not `sync`) and rename."""
    path = Path(path)
    try:
        fd, temp = _temp_file(path)
    except OSError as error:
        raise WriteError(f"{path}: cannot create a file in {path.parent}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as error:
        Path(temp).unlink(missing_ok=True)
        raise WriteError(f"{path}: write failed: {error.strerror or error}") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)


def index_bytes(layouts: list[ShardLayout]) -> bytes | None:
    """model.safetensors.index.json as transformers writes it; None (no index) for one shard."""
    if len(layouts) <= 1:
        return None
    weight_map = {spec.key: layout.name for layout in layouts for spec in layout.order}
    total = sum(spec.nbytes for layout in layouts for spec in layout.order)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_index(out_dir: Path, layouts: list[ShardLayout]) -> Path | None:
    """Write the index (`index_bytes`) into out_dir; its path, or None for one shard."""
    data = index_bytes(layouts)
    if data is None:
        return None
    path = Path(out_dir) / INDEX_NAME
    atomic_write_bytes(path, data)
    return path
