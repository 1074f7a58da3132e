"""Streaming, aligned, atomic safetensors writer.

Why not `safetensors.torch.save_file`: it needs every tensor of a file in memory at once (a 120b
MoE shard is tens of GB), and it pads the header to 8 bytes only, so every tensor after an
odd-sized one starts misaligned. Here the whole layout (header, order, offsets) is decided up front
from metadata alone (`layout_shard`), the header is written first, tensor bytes are streamed in
whatever chunks the caller produces (with O_DIRECT from an aligned staging buffer, see directio),
and each file appears under its final name only when complete (temp file in the same folder ->
fsync -> rename -> fsync folder).

Alignment: the data start (8 + header length) is padded with spaces to a multiple of N, then
tensors are ordered so as many as possible start at a multiple of N. The format forbids holes and
padding tensors break vLLM (it refuses unknown parameter names), so order is the only tool:
  1. tensors whose size is a multiple of N (natural key order): all aligned;
  2. pairs whose sizes' residues mod N sum to N (r with N-r, N/2 with N/2): the first of a pair
     starts aligned, the second cannot, and the pair ends aligned again;
  3. the leftovers (no partner), natural key order: the first starts aligned, the rest mostly not.
Keys that do not start aligned are listed in `ShardLayout.misaligned`. Same inputs -> same bytes.
"""

from __future__ import annotations  # torch is imported by whoever hands over a tensor

import ctypes
import json
import math
import os
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moeconv import checksum as checksums
from moeconv import directio, dtypes
from moeconv.errors import InternalError, MoeconvError, WriteError
from moeconv.keys import natural_key

if TYPE_CHECKING:
    import torch

HEADER_CAP = 100_000_000  # safetensors refuses larger headers
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """What will be written: key, safetensors dtype name and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class ShardLayout:
    """The complete byte layout of one output file, decided before any data exists."""

    name: str  # file name, e.g. "model-00001-of-00003.safetensors"
    order: list[TensorSpec]  # write order (chosen for alignment)
    offsets: dict[str, int]  # key -> ABSOLUTE file offset of the tensor's first byte
    header: bytes  # 8-byte length + JSON (+ space padding)
    size: int  # total file size
    misaligned: list[str]  # keys that could not start aligned

    @property
    def data_start(self) -> int:
        return len(self.header)


def _check_align(align: int) -> None:
    if not isinstance(align, int) or isinstance(align, bool) or align < 8 or align & (align - 1):
        raise WriteError(f"alignment {align!r} must be a power of two >= 8 (e.g. 16, 64, 4096)")


def _check_specs(name: str, tensors: list[TensorSpec]) -> None:
    seen = set()
    for spec in tensors:
        if spec.key in seen:
            raise WriteError(f"{name}: tensor '{spec.key}' appears twice")
        if spec.key == "__metadata__" or not spec.key:
            raise WriteError(f"{name}: '{spec.key}' cannot be a tensor name")
        if spec.dtype not in dtypes.ITEMSIZE:
            raise WriteError(f"{name}: tensor '{spec.key}' has unknown dtype '{spec.dtype}'")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec.shape):
            raise WriteError(f"{name}: tensor '{spec.key}' has invalid shape {list(spec.shape)}")
        seen.add(spec.key)


def aligned_order(tensors: list[TensorSpec], align: int) -> list[TensorSpec]:
    """Write order that lets the most tensors start at a multiple of `align` (see module doc)."""
    ordered = sorted(tensors, key=lambda t: natural_key(t.key))
    whole = [t for t in ordered if t.nbytes % align == 0]
    rest = [t for t in ordered if t.nbytes % align]
    # Greedy in natural order: each unplaced tensor takes the first unplaced tensor of the
    # complementary residue. Queues are only ever popped from the front, so a tensor reached by
    # the loop is at the front of its own queue. Per residue class this reaches
    # min(count_r, count_{N-r}) pairs (count_{N/2} // 2 for N/2), the maximum.
    waiting: dict[int, deque[int]] = {}
    for position, spec in enumerate(rest):
        waiting.setdefault(spec.nbytes % align, deque()).append(position)
    placed = [False] * len(rest)
    pairs: list[TensorSpec] = []
    leftovers: list[TensorSpec] = []
    for position, spec in enumerate(rest):
        if placed[position]:
            continue
        residue = spec.nbytes % align
        waiting[residue].popleft()  # == position (see above)
        placed[position] = True
        partners = waiting.get(align - residue)
        if partners:
            partner = partners.popleft()
            placed[partner] = True
            pairs += [spec, rest[partner]]
        else:
            leftovers.append(spec)
    return whole + pairs + leftovers


def layout_shard(name: str, tensors: list[TensorSpec], align: int = 16, metadata: dict[str, str] | None = None) -> ShardLayout:
    """Header, write order and absolute offsets of one file, from metadata alone."""
    _check_align(align)
    _check_specs(name, tensors)
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WriteError(f"{name}: metadata must map strings to strings")
    meta["format"] = "pt"  # transformers refuses files without it
    order = aligned_order(tensors, align)
    header: dict[str, object] = {"__metadata__": meta}
    relative, position = {}, 0
    for spec in order:
        header[spec.key] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [position, position + spec.nbytes]}
        relative[spec.key] = position
        position += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % align)  # trailing spaces: the legal way to align the data start
    if len(text) > HEADER_CAP:
        raise WriteError(f"{name}: header would be {len(text)} bytes, over the safetensors limit of {HEADER_CAP}")
    data_start = 8 + len(text)
    offsets = {key: data_start + rel for key, rel in relative.items()}
    misaligned = [spec.key for spec in order if offsets[spec.key] % align]
    return ShardLayout(
        name=name,
        order=order,
        offsets=offsets,
        header=len(text).to_bytes(8, "little") + text,
        size=data_start + position,
        misaligned=misaligned,
    )


def split_shards(tensors: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split in the given order, transformers-style: a new shard starts when the next tensor would
    push the current one over `max_shard_size` (tensor bytes); a bigger tensor gets its own shard.

    Unlike huggingface_hub, an oversized tensor's shard takes its place in the order (hub appends it
    ahead of the shard being filled); keys stay in order across shards either way.
    """
    if max_shard_size <= 0:
        raise WriteError(f"max shard size must be positive, got {max_shard_size}")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_size = 0
    for spec in tensors:
        size = spec.nbytes
        if size > max_shard_size:
            if current:
                shards.append(current)
                current, current_size = [], 0
            shards.append([spec])
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(spec)
        current_size += size
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    """File names exactly as transformers writes them."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(tensors: list[TensorSpec], max_shard_size: int, align: int = 16) -> list[ShardLayout]:
    """Split then lay out every shard. No tensors -> no shards."""
    _check_align(align)
    groups = split_shards(tensors, max_shard_size)
    return [layout_shard(name, group, align) for name, group in zip(shard_names(len(groups)), groups)]


def fsync_file(path: Path) -> None:
    """fsync a file by path (one written earlier with fsync left for later)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
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
            raise self._fail(
                f"'{key}' arrived out of order while '{expected.key}' has {self._done} of {expected.nbytes} bytes"
            )
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
            _fsync_dir(self.out_dir)
        return self.final

    def close(self) -> None:
        """Abandon an unfinished file (delete the temp file); no-op after finish()."""
        if self._finished:
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
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
        _fsync_dir(path.parent)


def write_index(out_dir: Path, layouts: list[ShardLayout]) -> Path | None:
    """model.safetensors.index.json as transformers writes it; None (no index) for one shard."""
    if len(layouts) <= 1:
        return None
    weight_map = {spec.key: layout.name for layout in layouts for spec in layout.order}
    total = sum(spec.nbytes for layout in layouts for spec in layout.order)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path = Path(out_dir) / INDEX_NAME
    atomic_write_bytes(path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path
