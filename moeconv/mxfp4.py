"""MXFP4 (gpt-oss) dequantization: U8 blocks [..., G, 16] + U8 scales [..., G] -> [..., G*32].

Bit-exact with transformers' `_convert_moe_packed_tensors` (before its final transpose): element
2j of a 16-byte block is FP4 code `byte_j & 0xF`, element 2j+1 is `byte_j >> 4`, and every value is
`FP4[code] * 2**(scale - 127)` rounded once to the output dtype (`torch.ldexp`, which keeps
0 * 2**128 = +-0 and gives +-inf for |value| >= 2**128; see DESIGN.md). The output stays in the
source row orientation ([E, 2I, H/32, 16] -> [E, 2I, H]); the planner chains `transpose`.

How it is fast (~30x transformers on one core; figure and command in tests/test_mxfp4.py):
- One gather per *two bytes*: the blocks are read as uint16 and looked up in a 65536-entry int64
  table holding four bf16 (or fp16) bit patterns, i.e. four output elements, per entry.
- The scale is one in-place multiply by 2**(scale-127) broadcast over the group's 32 values. Both
  factors are exact, the fp32 product is exact, so its one rounding to the output dtype is the
  reference's rounding (subnormals included), and zeros stay +-0.
- Groups whose power of two the output dtype cannot hold (bf16: scale 255 = 2**128; fp16: outside
  2**-24 .. 2**15) are recomputed through an exact (scale, byte) -> two values table built from
  exact fp64 math, so every corner case is exact too. Real checkpoints have none of them.
- Work proceeds in cache-sized chunks of groups, writing straight into the output tensor.
- fp32 outputs are the bf16 result widened, which is exact: every MXFP4 value has at most two
  significant bits and fits bf16's range unless it is >= 2**128 (inf in both).
- fp16 values that overflow (|value| >= 65536) raise OpError instead of becoming inf.
"""

import torch

from moeconv import buffers
from moeconv.errors import OpError

# E2M1 code -> value (index = 4-bit code; bit 3 is the sign).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Scale bytes whose power of two 2**(s-127) the working dtype holds exactly (others: exact path).
_SCALE_WINDOW = {torch.bfloat16: (0, 254), torch.float16: (127 - 24, 127 + 15)}
_FP16_OVERFLOW_SCALE = 127 + 14  # 4 * 2**14 = 65536 is the first magnitude fp16 cannot hold
_CHUNK_GROUPS = 65536  # groups per chunk: 1 MiB of blocks -> 4 MiB of bf16 (measured best: per-op overhead vs cache)

_tables: dict[tuple, torch.Tensor] = {}


def _exact_values(dtype: torch.dtype) -> torch.Tensor:
    """[256 scales, 16 codes] in `dtype`: FP4[code] * 2**(scale-127), rounded once (exact math in fp64)."""
    codes = torch.tensor(FP4_VALUES, dtype=torch.float64)  # [16]
    powers = torch.ldexp(torch.ones(256, dtype=torch.float64), torch.arange(256) - 127)  # [256]
    exact = powers[:, None] * codes[None, :]  # [256, 16], exact in fp64 (signs of zeros kept)
    # fp64 -> fp32 is exact here except >= 2**128 -> inf, so the step to a narrower type rounds once.
    return exact.to(torch.float32).to(dtype)


def _pair_table(dtype: torch.dtype) -> torch.Tensor:
    """Exact table: index (scale << 8) | byte -> the two output elements of that byte, as one integer."""
    key = ("pair", dtype)
    if key not in _tables:
        values = _exact_values(dtype)  # [256, 16]
        byte = torch.arange(256)
        pairs = torch.stack([values[:, byte & 0xF], values[:, byte >> 4]], dim=-1)  # [256 s, 256 b, 2]
        wide = torch.int32 if dtype.itemsize == 2 else torch.int64
        _tables[key] = pairs.contiguous().view(wide).reshape(65536)  # [s*256 + b]
    return _tables[key]


def _quad_table(dtype: torch.dtype) -> torch.Tensor:
    """uint16 of two block bytes -> the four unscaled FP4 values (2-byte dtype) packed in one int64."""
    key = ("quad", dtype)
    if key not in _tables:
        lanes = torch.tensor(FP4_VALUES, dtype=dtype).view(torch.int16)  # [16] bit patterns
        word = torch.arange(65536)
        b0, b1 = word & 0xFF, word >> 8  # little-endian: the even byte is the low half
        quad = torch.stack([lanes[b0 & 0xF], lanes[b0 >> 4], lanes[b1 & 0xF], lanes[b1 >> 4]], dim=-1)
        _tables[key] = quad.contiguous().view(torch.int64).reshape(65536)  # [65536]
    return _tables[key]


def _scale_table(dtype: torch.dtype) -> torch.Tensor:
    """scale byte -> 2**(s-127) in dtype (1 outside the window: those groups are redone exactly)."""
    key = ("scale", dtype)
    if key not in _tables:
        lo, hi = _SCALE_WINDOW[dtype]
        s = torch.arange(256)
        k = torch.where((s >= lo) & (s <= hi), s - 127, 0)
        _tables[key] = torch.ldexp(torch.ones(256, dtype=torch.float64), k).to(dtype)
    return _tables[key]


def _check_inputs(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise OpError(f"dequantize-mxfp4: blocks and scales must be U8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != 16:
        raise OpError(f"dequantize-mxfp4: blocks must be [..., G, 16], got {list(blocks.shape)}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise OpError(
            f"dequantize-mxfp4: scales {list(scales.shape)} must equal blocks' shape without the last dim "
            f"{list(blocks.shape[:-1])}"
        )


def _chunk(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, odd: bool) -> None:
    """blocks [n, 16] U8, scales [n] U8 -> out [n, 32] bf16/fp16 (contiguous); idx: int32 scratch [>= n, 8]."""
    n, dtype = blocks.shape[0], out.dtype
    index = idx[:n]  # [n, 8]
    index.copy_(blocks.view(torch.uint16))  # two bytes -> one table index
    torch.index_select(_quad_table(dtype), 0, index.view(-1), out=out.view(torch.int64).view(-1))  # [n*8] x 4 values
    scale_index = idx.view(-1)[:n]
    scale_index.copy_(scales)
    out.mul_(torch.index_select(_scale_table(dtype), 0, scale_index)[:, None])  # [n, 32] *= 2**(s-127), exact
    if odd:  # some groups' power of two is outside what dtype holds: redo those exactly
        lo, hi = _SCALE_WINDOW[dtype]
        rows = ((scales < lo) | (scales > hi)).nonzero().view(-1)
        if rows.numel():
            out[rows] = _exact_rows(blocks[rows], scales[rows], dtype)


def _exact_rows(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact (scale, byte) table path: blocks [n, 16], scales [n] -> [n, 32] in dtype."""
    table = _pair_table(dtype)
    index = blocks.to(torch.int32) + (scales.to(torch.int32) << 8)[:, None]  # [n, 16]
    return torch.index_select(table, 0, index.view(-1)).view(dtype).view(-1, 32)


def dequantize_reference(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The simple exact path for the whole tensor (tests compare the fast kernel against it)."""
    _check_inputs(blocks, scales)
    *lead, groups, _ = blocks.shape
    out = _exact_rows(blocks.reshape(-1, 16), scales.reshape(-1), dtype)
    return out.view(*lead, groups * 32)


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """MXFP4 blocks [..., G, 16] + scales [..., G] -> [..., G*32] in dtype (bf16, fp16 or fp32).

    `out`: optional contiguous tensor of that shape and dtype to write into (e.g. a reused buffer:
    first-touch page faults of a fresh 1 GB output cost about as much as the kernel itself).
    """
    _check_inputs(blocks, scales)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise OpError(f"dequantize-mxfp4: output dtype must be bf16, fp16 or fp32, not {dtype}")
    *lead, groups, _ = blocks.shape
    if blocks.is_meta or scales.is_meta:
        return torch.empty(*lead, groups * 32, dtype=dtype, device="meta")
    flat_blocks = blocks.contiguous().view(-1, 16)  # [N, 16]
    flat_scales = scales.contiguous().view(-1)  # [N]
    total = flat_blocks.shape[0]
    shape = (*lead, groups * 32)
    if out is None:
        out = buffers.empty((total, 32), dtype)  # [N, 32]
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise OpError(f"dequantize-mxfp4: out must be a contiguous {dtype} tensor of shape {list(shape)}")
    out = out.view(total, 32)
    if total == 0:
        return out.view(*lead, groups * 32)
    work = torch.bfloat16 if dtype == torch.float32 else dtype  # fp32 = exact widening of bf16
    lo, hi = _SCALE_WINDOW[work]
    smin, smax = (int(v) for v in torch.aminmax(flat_scales))
    odd = smin < lo or smax > hi
    check_overflow = dtype == torch.float16 and smax >= _FP16_OVERFLOW_SCALE
    chunk = min(_CHUNK_GROUPS, total)
    idx = buffers.empty((chunk, 8), torch.int32)
    staging = buffers.empty((chunk, 32), work) if work != dtype else None
    for g0 in range(0, total, chunk):
        g1 = min(g0 + chunk, total)
        target = out[g0:g1] if staging is None else staging[: g1 - g0]
        _chunk(flat_blocks[g0:g1], flat_scales[g0:g1], target, idx, odd)
        if staging is not None:
            out[g0:g1].copy_(target)
        if check_overflow and torch.isinf(out[g0:g1]).any():
            _raise_overflow(flat_scales, out, g0, g1)
    return out.view(*lead, groups * 32)


def _raise_overflow(scales: torch.Tensor, out: torch.Tensor, g0: int, g1: int) -> None:
    group = g0 + int(torch.isinf(out[g0:g1]).any(dim=1).nonzero()[0, 0])
    scale = int(scales[group])
    raise OpError(
        f"dequantize-mxfp4: values overflow fp16 (|value| >= 65536, first in scale group {group}: "
        f"scale byte {scale} = 2^{scale - 127}); use dtype bf16 or fp32"
    )
