"""The safetensors format: header rules, shard layout and alignment, shared by reader and writer.

A file is an 8-byte little-endian header length N, N bytes of JSON (`__metadata__` plus one entry per
tensor: dtype, shape, data_offsets relative to the data buffer), then the data buffer. The reference
parser's rules, applied to every header we read (`check_header`): offsets cover the buffer with no
hole and no overlap, and the buffer ends at the end of the file. Whitespace after the JSON is legal:
it is how the writer aligns the data start.

Layout (`plan_shards`): a checkpoint is split into shards transformers-style, and each shard's header,
write order and absolute offsets are decided from metadata alone. The data start is padded with
spaces to a multiple of N, then tensors are ordered so as many as possible start at a multiple of N
(`aligned_order`: an exact search over the sizes' residues mod N, greedy past a bound). Holes are
forbidden and padding tensors break vLLM (it refuses unknown parameter names), so order is the only
tool. Same inputs -> same bytes.
"""

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from moeconv import dtypes
from moeconv.errors import CheckpointError, WriteError
from moeconv.keys import natural_key

HEADER_CAP = 100_000_000  # the reference parser refuses larger headers
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def quote(text: str) -> str:
    """Quote a name taken from a file so the message stays one line whatever it contains."""
    return json.dumps(text, ensure_ascii=False)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _supported() -> str:
    return ", ".join(dtypes.ITEMSIZE)


# ---- reading: the header rules ------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it; begin/end are ABSOLUTE file offsets."""

    key: str
    dtype: str  # safetensors name, e.g. "BF16", "U8"
    shape: tuple[int, ...]
    file: Path  # absolute path of the shard
    begin: int  # absolute offset of the first byte (8 + header_len + data_offsets[0])
    end: int  # absolute offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def unique_object(pairs: list[tuple[str, object]]) -> dict:
    """json.loads object hook: a key given twice is an error (parsers disagree on which one wins)."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {quote(key)}")
        seen[key] = value
    return seen


def check_header(path: Path, header: dict, data_start: int, size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Validate a decoded header of the file at `path` (data buffer at `data_start`, file `size` bytes).

    The one set of rules for every header, whether read from the file or fetched by ranged requests
    from the hub: entries, dtypes, shapes vs byte counts, no holes or overlaps, buffer ends at `size`.
    """
    path = Path(path).absolute()
    name = str(path)
    header = dict(header)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{name}: __metadata__ must be a map of strings to strings; the file is corrupt")

    tensors: list[TensorInfo] = []
    for key, entry in header.items():
        where = f"{name}: tensor {quote(key)}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: entry must be an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in dtypes.ITEMSIZE:
            raise CheckpointError(f"{where}: unsupported dtype {quote(str(dtype))}; supported: {_supported()}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {json.dumps(shape)} must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(f"{where}: data_offsets {json.dumps(offsets)} must be [begin, end] with 0 <= begin <= end")
        expected = math.prod(shape) * dtypes.itemsize(dtype)
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(
                f"{where}: shape {shape} x {dtype} is {expected} bytes but data_offsets {offsets} span {offsets[1] - offsets[0]}"
            )
        tensors.append(TensorInfo(key, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1]))

    # The reference parser's rule: sorted by offset, each tensor begins where the previous ends,
    # and the last one ends at the end of the file.
    tensors.sort(key=lambda t: (t.begin, t.end))
    position, previous = data_start, None
    for info in tensors:
        if info.begin != position:
            what = "a hole before" if info.begin > position else "an overlap with the previous tensor at"
            after = f" (after {quote(previous)})" if previous is not None else ""
            raise CheckpointError(
                f"{name}: tensor {quote(info.key)}: data is not contiguous: {what} data offset {info.begin - data_start}"
                f", expected {position - data_start}{after}; the file is corrupt"
            )
        position, previous = info.end, info.key
    if position != size:
        raise CheckpointError(
            f"{name}: tensor data ends at byte {position} but the file has {size} bytes"
            f" ({'truncated' if position > size else 'trailing bytes'}); the file is corrupt or incomplete"
        )
    return {t.key: t for t in tensors}, metadata, data_start


# ---- writing: layout and alignment --------------------------------------------------------------


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
    best_order: bool = True  # no order of these tensors aligns more (False: the greedy order, search too large)

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


SEARCH_STATES = 200_000  # beyond this many count vectors the exact order search gives way to the greedy one


def aligned_order(tensors: list[TensorSpec], align: int) -> tuple[list[TensorSpec], bool]:
    """(write order that lets the most tensors start at a multiple of `align`, whether that order
    is proven best). Tensors whose size is a multiple of `align` come first, in natural key order;
    the others follow in the order found by `_best_residue_order`, or, when that search would pass
    SEARCH_STATES states, by `_greedy_residue_order`."""
    ordered = sorted(tensors, key=lambda t: natural_key(t.key))
    whole = [t for t in ordered if t.nbytes % align == 0]
    rest = [t for t in ordered if t.nbytes % align]
    by_residue: dict[int, deque[TensorSpec]] = {}
    for spec in rest:
        by_residue.setdefault(spec.nbytes % align, deque()).append(spec)
    residues = _best_residue_order({r: len(q) for r, q in by_residue.items()}, align)
    exact = residues is not None
    if residues is None:
        return whole + _greedy_residue_order(rest, align), False
    return whole + [by_residue[r].popleft() for r in residues], exact


def _best_residue_order(counts: dict[int, int], align: int) -> list[int] | None:
    """The order of residues (mod `align`, each as often as `counts` says) with the most proper
    prefixes summing to 0 mod `align`: each such prefix is one more tensor starting aligned.

    Dynamic programming over count vectors (how many of each residue are placed): the prefix sum,
    and so whether the next tensor starts aligned, depends on the vector alone, not on the order
    that reached it. Layer by layer, each vector keeps its best count and the residue that got it
    there (smallest first: deterministic). None when the vectors would number over SEARCH_STATES."""
    kinds = sorted(counts)
    if math.prod(counts[r] + 1 for r in kinds) > SEARCH_STATES:
        return None
    total = sum(counts.values())
    start = (0,) * len(kinds)
    best: dict[tuple, tuple[int, tuple | None, int]] = {start: (0, None, 0)}  # vector -> (score, previous, residue)
    layer = [start]
    for placed in range(1, total + 1):
        following: dict[tuple, tuple[int, tuple | None, int]] = {}
        for vector in layer:
            score = best[vector][0]
            for i, residue in enumerate(kinds):
                if vector[i] == counts[residue]:
                    continue
                after = vector[:i] + (vector[i] + 1,) + vector[i + 1 :]
                aligned = placed < total and sum(c * r for c, r in zip(after, kinds)) % align == 0
                candidate = (score + aligned, vector, residue)
                if after not in following or candidate[0] > following[after][0]:
                    following[after] = candidate
        best.update(following)
        layer = sorted(following)
    order, vector = [], tuple(counts[r] for r in kinds)
    while vector != start:
        _, previous, residue = best[vector]
        order.append(residue)
        vector = previous
    return order[::-1]


def _greedy_residue_order(rest: list[TensorSpec], align: int) -> list[TensorSpec]:
    """Pairs of complementary residues, then the leftovers, in natural key order: the best order
    among pairs (each unplaced tensor takes the first unplaced one of the complementary residue)."""
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
        waiting[residue].popleft()  # == position: queues are popped from the front only
        placed[position] = True
        partners = waiting.get(align - residue)
        if partners:
            partner = partners.popleft()
            placed[partner] = True
            pairs += [spec, rest[partner]]
        else:
            leftovers.append(spec)
    return pairs + leftovers


def layout_shard(name: str, tensors: list[TensorSpec], align: int = 16, metadata: dict[str, str] | None = None) -> ShardLayout:
    """Header, write order and absolute offsets of one file, from metadata alone."""
    _check_align(align)
    _check_specs(name, tensors)
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WriteError(f"{name}: metadata must map strings to strings")
    meta["format"] = "pt"  # transformers refuses files without it
    order, exact = aligned_order(tensors, align)
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
        best_order=exact,
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


def plan_shards(
    tensors: list[TensorSpec], max_shard_size: int, align: int = 16, metadata: dict[str, str] | None = None
) -> list[ShardLayout]:
    """Split then lay out every shard (each with `metadata` in its header). No tensors -> no shards."""
    _check_align(align)
    groups = split_shards(tensors, max_shard_size)
    return [layout_shard(name, group, align, metadata) for name, group in zip(shard_names(len(groups)), groups)]
