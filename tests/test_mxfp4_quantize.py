"""MXFP4 quantization (moeconv.formats.mxfp4_quantize): the fast kernel against three oracles.

- ml_dtypes' float4_e2m1fn cast (round to nearest, ties to even, saturating, sign kept on zero):
  element rounding, given the block's scale byte;
- plain Python float math (math.frexp on the block maximum): the scale byte of each mode;
- `quantize_reference` (fp64, nearest grid point by distance): everything, byte for byte.

Inputs: every finite bf16 and fp16 value under a spread of block maxima (subnormal maxima, the
scale-byte boundaries at 6 * 2**k and 2**k, the tiny-block path, the largest finite values), fp32
ties +- 1 ulp, fp32 subnormals; NaN/inf; all-zero blocks; round trips through `dequantize`.
No timing here: benchmarks/kernel_quantize.py.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from moeconv.errors import OpError
from moeconv.formats import mxfp4_quantize as mq
from moeconv.formats.mxfp4 import dequantize

ml_dtypes = pytest.importorskip("ml_dtypes")

MODES = ["ceil", "floor"]
INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


# ---- helpers ------------------------------------------------------------------------------------------


def value(dtype: torch.dtype, bits: int) -> float:
    """The value of a 16-bit pattern of dtype."""
    return float(torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype)[0])


def unpack(blocks: torch.Tensor) -> torch.Tensor:
    """U8 [..., G, 16] -> codes [..., G, 32] (int64): element 2j = low nibble of byte j."""
    b = blocks.long()
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


def ml_dtypes_codes(x: torch.Tensor, scales: torch.Tensor, mode: str) -> torch.Tensor:
    """E2M1 codes [..., G, 32] that ml_dtypes gives for x / 2**(byte - 127) (exact in fp64); ceil
    with byte 0 multiplies by 0, as triton (only all-zero blocks and fp32 amax <= 3 * 2**-149)."""
    byte = scales.long()  # [..., G]
    inverse = torch.ldexp(torch.ones(byte.shape, dtype=torch.float64), 127 - byte)
    if mode == "ceil":
        inverse[byte == 0] = 0.0
    q = x.double().reshape(*byte.shape, 32) * inverse[..., None]  # [..., G, 32] exact
    codes = q.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8).astype(np.int64)
    return torch.from_numpy(codes)


def expected_byte(amax: float, mode: str) -> int:
    """The scale byte from the definitions, in Python floats (frexp is exact)."""
    if mode == "ceil":
        d = float(np.float32(amax) / np.float32(6.0))  # triton divides in fp32
        if d == 0:
            return 0
        mantissa, exponent = math.frexp(d)
        e = exponent - 1 if mantissa == 0.5 else exponent  # ceil(log2 d)
        return max(e, -126) + 127
    if amax == 0:
        return 0
    mantissa, exponent = math.frexp(amax)
    return max(exponent - 1 - 2, -127) + 127  # floor(log2 amax) - 2, clamped at 2**-127


def finite_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype (both zeros, subnormals), [<= 65536]."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[torch.isfinite(values)]


def under(values: torch.Tensor, top: float) -> torch.Tensor:
    """[n, 32]: every value with |v| <= |top|, 31 a block, and `top` (alternating sign) at position
    n % 32 of block n, so that each block's amax is |top| (zero-padded)."""
    top = float(torch.tensor([top], dtype=torch.float64).to(values.dtype)[0])  # a value of the dtype
    v = values[values.double().abs() <= abs(top)]
    v = torch.cat([v, v.new_zeros(-len(v) % 31)]).view(-1, 31)  # [n, 31]
    n = v.shape[0]
    tops = torch.full((n, 1), abs(top), dtype=values.dtype)
    tops[1::2] *= -1
    full = torch.cat([v, tops], dim=1)  # [n, 32], the top last
    j, pos = torch.arange(32), (torch.arange(n) % 32)[:, None]
    order = torch.where(j < pos, j, torch.where(j == pos, 31, j - 1))  # the top moved to column pos
    return full.gather(1, order)


def bf16_step(v: float, steps: int) -> float:
    """The bf16 value `steps` patterns from the (bf16) value v: +1 the next above, -1 below (v > 0)."""
    return value(torch.bfloat16, int(torch.tensor([v]).bfloat16().view(torch.int16)) + steps)


def bf16_maxima() -> list[float]:
    """Block maxima covering every regime of the scale choice (bf16)."""

    def b(bits: int) -> float:
        return value(torch.bfloat16, bits)

    def up(v: float) -> float:
        return bf16_step(v, 1)

    def down(v: float) -> float:
        return bf16_step(v, -1)

    maxima = [b(0x0001), b(0x0050), b(0x007F), b(0x0080)]  # subnormals, the smallest normal
    for k in (-128, -127, -126, -125, -124, 0, 10, 125):  # ceil: byte boundaries at 6 * 2**k
        maxima += [6 * 2.0**k, up(6 * 2.0**k), down(6 * 2.0**k)]
    for k in (-123, -122, 0, 2):  # floor: byte boundaries at 2**k (and the tiny-block path below 2**-122)
        maxima += [2.0**k, down(2.0**k)]
    maxima += [1.0, 3.0, 0.0123, 7.96875, b(0x7F7F)]  # 7.96875: the largest floor quotient, < 8
    generator = torch.Generator().manual_seed(7)
    maxima += [b(int(v)) for v in torch.randint(0x0100, 0x7F00, (6,), generator=generator)]
    return maxima


def fp16_maxima() -> list[float]:
    def h(bits: int) -> float:
        return value(torch.float16, bits)

    maxima = [h(0x0001), h(0x0155), h(0x03FF), h(0x0400), 1.0, 6.0, h(0x4601), h(0x45FF), 4.0, h(0x43FF)]
    maxima += [6 * 2.0**-20, 2.0**-14, h(0x7BFF), 0.000123, 1234.5]
    generator = torch.Generator().manual_seed(8)
    maxima += [h(int(v)) for v in torch.randint(0x0400, 0x7BFF, (5,), generator=generator)]
    return maxima


def check_all(x: torch.Tensor, mode: str, tops: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel against the reference (every byte) and ml_dtypes (every element); with `tops`
    (each block's amax), the scale bytes against plain float math. Returns the kernel's output."""
    blocks, scales = mq.quantize(x, scale=mode)
    ref_blocks, ref_scales = mq.quantize_reference(x, scale=mode)
    assert torch.equal(scales, ref_scales), f"scales differ in {int((scales != ref_scales).sum())} blocks"
    assert torch.equal(blocks, ref_blocks), f"blocks differ in {int((blocks != ref_blocks).any(-1).sum())} blocks"
    assert torch.equal(unpack(blocks), ml_dtypes_codes(x, scales, mode))
    if tops is not None:
        want = torch.tensor([expected_byte(float(t), mode) for t in tops], dtype=torch.uint8)
        assert torch.equal(scales.view(-1), want)
    return blocks, scales


# ---- exhaustive: every bf16 / fp16 value under a spread of block maxima --------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_bf16_value_under_many_block_maxima(mode):
    values = finite_values(torch.bfloat16)
    assert len(values) == 65536 - 256
    parts, tops = [], []
    for top in bf16_maxima():
        rows = under(values, top)
        parts.append(rows)
        tops += [float(rows[0].abs().max())] * rows.shape[0]
    x = torch.cat(parts)  # [B, 32]
    assert torch.equal(x.abs().amax(1).double(), torch.tensor(tops, dtype=torch.float64))
    assert x.shape[0] > 30_000  # ~1M elements: every finite value under many maxima
    _, scales = check_all(x, mode, torch.tensor(tops, dtype=torch.float64))
    seen = set(scales.view(-1).tolist())
    assert {0, 1, 2, 3}.issubset(seen) if mode == "floor" else {1, 2, 3, 4}.issubset(seen)  # tiny-block path used
    if mode == "ceil":  # the smallest power of two with amax / scale <= 6, except byte >= 1
        scale = torch.ldexp(torch.ones(len(tops), dtype=torch.float64), scales.view(-1).long() - 127)
        amax = torch.tensor(tops, dtype=torch.float64)
        assert (amax <= 6 * scale).all()
        assert ((amax > 3 * scale) | (scales.view(-1) == 1)).all()


@pytest.mark.parametrize("mode", MODES)
def test_every_fp16_value_under_many_block_maxima(mode):
    values = finite_values(torch.float16)
    assert len(values) == 65536 - 2048
    parts, tops = [], []
    for top in fp16_maxima():
        rows = under(values, top)
        parts.append(rows)
        tops += [float(rows[0].abs().max())] * rows.shape[0]
    x = torch.cat(parts)  # [B, 32]
    assert torch.equal(x.abs().amax(1).double(), torch.tensor(tops, dtype=torch.float64))
    check_all(x, mode, torch.tensor(tops, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
def test_chunk_boundaries_and_tiny_blocks_in_later_chunks(mode, monkeypatch):
    """Chunks of 7 blocks: tiny-block (float path) and zero blocks land in every chunk position."""
    monkeypatch.setattr(mq, "_CHUNK_BLOCKS", 7)
    values = finite_values(torch.bfloat16)
    x = torch.cat([under(values, top)[:40] for top in (1.0, value(torch.bfloat16, 0x0050), 6 * 2.0**-125, 2.0**-123, 3.0)])
    x[13] = 0.0
    x[21] = -0.0
    check_all(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))], mode)


def test_code_table_is_ml_dtypes_rounding():
    """The kernel's table: every bf16 magnitude from 0.25 to 6 (and the sign) -> ml_dtypes' code."""
    bits = torch.arange(mq._LOW, mq._TOP + 1, dtype=torch.int16)
    for sign, offset in ((1.0, 0), (-1.0, mq._SIGN_OFFSET)):
        q = sign * bits.view(torch.bfloat16).double().numpy()
        want = q.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
        assert np.array_equal(mq._code_table()[offset : offset + len(bits)].numpy(), want)


@pytest.mark.parametrize("mode", MODES)
def test_ties_go_to_the_even_code(mode):
    """Midpoints times the scale: to the even code (ModelOpt's MXFP4 path would round every one down)."""
    midpoints = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    even = [0, 2, 2, 4, 4, 6, 6]  # codes of 0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0
    for k in (-100, 0, 7):
        row = torch.zeros(32, dtype=torch.float64)
        row[0] = 6.0  # amax 6 * 2**k: scale 2**k in both modes
        row[1:8] = torch.tensor(midpoints)
        row[8:15] = -torch.tensor(midpoints)
        x = torch.ldexp(row, torch.tensor(k)).to(torch.bfloat16)[None]
        blocks, scales = mq.quantize(x, scale=mode)
        assert int(scales[0, 0]) == 127 + k
        codes = unpack(blocks)[0, 0]
        assert codes[1:8].tolist() == even and codes[8:15].tolist() == [c | 8 for c in even]


# ---- fp32 ---------------------------------------------------------------------------------------------


def nextafter(x: torch.Tensor, direction: float) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, direction))


@pytest.mark.parametrize("mode", MODES)
def test_fp32_ties_and_their_neighbours(mode):
    """fp32 one ulp either side of every midpoint and grid point (where rounding to odd has to
    keep what a cast to bf16 would lose), at several scales."""
    points = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    around = torch.stack([nextafter(points, 0.0), points, nextafter(points, 10.0)], 1).flatten()  # [42]
    around = around[around <= 6.0]
    rows = []
    for k in (-120, -20, 0, 20, 120):
        for sign in (1.0, -1.0):
            v = sign * around * 2.0**k
            for start in range(0, len(v), 31):
                part = v[start : start + 31]
                rows.append(torch.cat([torch.tensor([6.0 * 2.0**k]), part, torch.zeros(31 - len(part))]))
    x = torch.stack(rows)  # [R, 32]
    blocks, _ = check_all(x, mode)
    assert not torch.equal(blocks, mq.quantize(x.to(torch.bfloat16), scale=mode)[0])  # the bf16 cast would differ


@pytest.mark.parametrize("mode", MODES)
def test_fp32_random_blocks_at_every_scale(mode):
    generator = torch.Generator().manual_seed(11)
    n = 4096
    exponents = torch.randint(-150, 124, (n, 1), generator=generator)
    x = torch.ldexp(torch.randn(n, 32, generator=generator, dtype=torch.float64), exponents).float()
    x[::17, 5] = 0.0
    x[::13] *= torch.rand(32, generator=generator) < 0.5  # some exact zeros inside blocks
    check_all(x, mode, x.abs().amax(1))


@pytest.mark.parametrize("mode", MODES)
def test_fp32_tiny_and_huge_blocks(mode):
    tiny = 2.0**-149  # the smallest fp32 subnormal
    cases = [
        tiny,
        2 * tiny,
        3 * tiny,
        4 * tiny,
        5 * tiny,
        2.0**-130,
        6 * 2.0**-127,
        2.0**-124,
        float(torch.finfo(torch.float32).max),
    ]
    rows = []
    for top in cases:
        row = torch.linspace(-top, top, 32, dtype=torch.float64).float()
        row[7] = top
        rows.append(row)
    x = torch.stack(rows)
    _, scales = check_all(x, mode, x.abs().amax(1))
    if mode == "ceil":  # triton: amax / 6 rounds to 0 in fp32 for amax <= 3 * 2**-149 -> byte 0; else >= 1
        assert scales[:5, 0].tolist() == [0, 0, 0, 1, 1]
        assert int(scales[-1, 0]) == 253  # fp32 max / 6 -> 2**126: the largest byte a finite input gets


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_wider_inputs_holding_bf16_values_quantize_as_bf16(mode, dtype):
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 256, generator=generator) * 0.02).to(torch.bfloat16)
    if dtype == torch.float16:
        x = x.to(torch.float16).to(torch.bfloat16)  # values both types hold
    want = mq.quantize(x, scale=mode)
    got = mq.quantize(x.to(dtype), scale=mode)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- NaN, inf, zeros ------------------------------------------------------------------------------------


CASES = [(d, bad) for d in ("bf16", "fp16", "fp32") for bad in ("nan", "+inf", "-inf")] + [("fp32", "nan-low-payload")]


@pytest.mark.parametrize(("dtype", "bad"), CASES, ids=[f"{d}-{bad}" for d, bad in CASES])
@pytest.mark.parametrize("fn", [mq.quantize, mq.quantize_reference], ids=["kernel", "reference"])
def test_nan_and_inf_are_refused_naming_the_position(dtype, bad, fn):
    """nan-low-payload: fp32 0x7F800001, a NaN whose payload sits in the bits rounding to bf16 drops."""
    x = torch.randn(3, 4, 64).to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    special = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
    if bad == "nan-low-payload":
        x.view(torch.int32)[2, 1, 37] = 0x7F800001
    else:
        x[2, 1, 37] = special[bad]
    x[2, 3, 0] = float("nan")  # a later one: the first is named
    kind = "NaN" if bad.startswith("nan") else bad
    message = (
        f"quantize-mxfp4: {kind} at index [2, 1, 37] of shape [3, 4, 64] (row 9, column 37, block 1 of the row, flat block 19)"
    )
    with pytest.raises(OpError, match="^" + re.escape(message)):
        fn(x)


def test_nan_in_a_later_chunk_is_named_by_its_own_position(monkeypatch):
    monkeypatch.setattr(mq, "_CHUNK_BLOCKS", 5)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    x[33, 40] = float("-inf")
    with pytest.raises(
        OpError, match=r"-inf at index \[33, 40\] of shape \[40, 64\] \(row 33, column 40, block 1 of the row, flat block 67\)"
    ):
        mq.quantize(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_all_zero_blocks(mode, dtype):
    """Scale byte 0 (triton: amax / 6 = 0 -> exponent field 0; OCP: clamped at 2**-127), codes 0 for
    +0.0 and 8 for -0.0 (triton keeps the sign bit of x * 0)."""
    x = torch.zeros(3, 96, dtype=dtype)
    x[1, 32:64] = -0.0
    x[2, 0::2] = -0.0
    x[2, 70] = 1.5  # one block that is not zero
    blocks, scales = check_all(x, mode)
    assert scales[:, :2].tolist() == [[0, 0], [0, 0], [0, 0]] and scales[0, 2] == 0
    codes = unpack(blocks)
    assert (codes[0] == 0).all() and (codes[1, 1] == 8).all() and (codes[1, 0] == 0).all()
    assert codes[2, 0].tolist() == [8, 0] * 16


# ---- round trips: a dequantized MXFP4 checkpoint ------------------------------------------------------


def random_mxfp4(n: int, scale_range: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U8 blocks [n, 16] (every max code magnitude well represented) + scales [n]."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, 16), dtype=torch.uint8, generator=generator)
    limit = torch.randint(0, 8, (n, 1), generator=generator).to(torch.uint8)  # cap on the magnitude code
    low, high = blocks & 0xF, blocks >> 4
    low = (low & 8) | torch.minimum(low & 7, limit)
    high = (high & 8) | torch.minimum(high & 7, limit)
    blocks = low | (high << 4)
    blocks[:64] &= 0x88  # all-zero blocks (+-0.0)
    scales = torch.randint(scale_range[0], scale_range[1] + 1, (n,), dtype=torch.uint8, generator=generator)
    scales[:8] = scale_range[0]  # zero blocks at the lowest byte
    scales[64:128] = scale_range[0]  # and non-zero ones
    scales[128:192] = scale_range[0] + 1
    return blocks, scales


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
def test_round_trip_of_a_dequantized_checkpoint(mode, dtype):
    """dequantize(quantize(x)) == x for x on the MXFP4 grid, bit for bit (signed zeros too), except,
    with ceil, blocks whose original scale byte is 0 holding a code of magnitude 0.5 or 1.5: triton's
    ceil never picks byte 0 for a non-zero block, and at 2**-126 those elements are ties to 0.25 or
    0.75. Where the original scale byte is the mode's own choice, blocks and scales come back
    byte-identical; elsewhere the scale moves and the codes are rescaled (same values)."""
    scale_range = (104, 140) if dtype == torch.float16 else (0, 252)  # fp16: values it holds exactly
    blocks, scales = random_mxfp4(20_000, scale_range, seed=1)
    x = dequantize(blocks.view(-1, 1, 16), scales.view(-1, 1), dtype=dtype).view(-1, 32)
    assert torch.isfinite(x).all()
    got_blocks, got_scales = check_all(x, mode)
    back = dequantize(got_blocks, got_scales, dtype=dtype)

    codes = unpack(blocks)  # [n, 32]
    top = (codes & 7).amax(1)  # [n] the largest magnitude code
    s = scales.long()
    # the new scale: max magnitude M (code 6 or 7: M = 4 or 6) keeps s; M <= 3 moves it down by
    # ceil(log2(M / 6)) (floor: floor(log2 M) - 2) steps, to at least 1 (ceil) or 0 (floor);
    # all-zero blocks get byte 0
    magnitude = torch.tensor(mq.FP4_VALUES, dtype=torch.float64)[top]
    nonzero = top > 0
    step = torch.zeros_like(s)
    if mode == "ceil":
        step[nonzero] = torch.ceil(torch.log2(magnitude[nonzero] / 6)).long()
        want = torch.where(nonzero, (s + step).clamp(min=1), 0)
        lossy = (s == 0) & (((codes & 7) == 1) | ((codes & 7) == 3)).any(1)
        own_choice = ((top >= 6) & (s >= 1)) | (nonzero & (s == 1)) | (~nonzero & (s == 0))
    else:
        step[nonzero] = torch.floor(torch.log2(magnitude[nonzero])).long() - 2
        want = torch.where(nonzero, (s + step).clamp(min=0), 0)
        lossy = torch.zeros_like(s, dtype=torch.bool)
        own_choice = (top >= 6) | (s == 0)
    assert torch.equal(got_scales.view(-1).long(), want)
    assert torch.equal(want == s, own_choice)
    same = (back.view(INT_OF[dtype]) == x.view(INT_OF[dtype])).all(1)
    assert torch.equal(same, ~lossy)
    assert lossy.any() == (mode == "ceil" and dtype != torch.float16)
    identical = (got_blocks.view(-1, 16) == blocks).all(1) & (got_scales.view(-1) == scales)
    assert torch.equal(identical, own_choice)


@pytest.mark.parametrize("mode", MODES)
def test_requantizing_a_ceil_quantized_tensor_is_byte_identical_where_its_max_code_is_4_or_6(mode):
    """Quantize trained-looking weights, dequantize, quantize again: the second pass returns the
    first's bytes wherever the first block's max code is 4 or 6; blocks whose max rounded to 3 (the
    first amax / scale in (3, 3.5]) come back one scale byte lower (codes doubled, values equal)."""
    generator = torch.Generator().manual_seed(2)
    w = (torch.randn(64, 2880, generator=generator) * torch.rand(64, 1, generator=generator) * 0.04).to(torch.bfloat16)
    blocks, scales = mq.quantize(w, scale="ceil")
    x = dequantize(blocks, scales)
    again_blocks, again_scales = mq.quantize(x, scale=mode)
    top = (unpack(blocks) & 7).amax(-1)  # [64, 90]
    identical = (again_blocks == blocks).all(-1) & (again_scales == scales)
    assert torch.equal(identical, top >= 6)
    assert (top == 5).any() and torch.equal(again_scales[top == 5], scales[top == 5] - 1)
    assert torch.equal(dequantize(again_blocks, again_scales), x)


# ---- shapes, streaming, errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_row_blocks_quantize_independently(mode):
    """Streaming: any split of the leading rows gives the matching rows of the whole result."""
    x = (torch.randn(3, 50, 320) * 0.01).to(torch.bfloat16)
    whole = mq.quantize(x, scale=mode)
    for dim, cuts in ((0, [1, 2]), (1, [7, 20, 33])):
        parts = [mq.quantize(p, scale=mode) for p in torch.tensor_split(x, cuts, dim=dim)]
        assert torch.equal(torch.cat([p[0] for p in parts], dim=dim), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts], dim=dim), whole[1])
    assert whole[0].shape == (3, 50, 10, 16) and whole[1].shape == (3, 50, 10)


def test_shapes_views_and_empty():
    x = torch.randn(64, 96).to(torch.bfloat16)
    t = x.t()  # non-contiguous [96, 64]
    assert all(torch.equal(a, b) for a, b in zip(mq.quantize(t), mq.quantize(t.contiguous())))
    one = mq.quantize(torch.ones(32))
    assert one[0].shape == (1, 16) and one[1].tolist() == [125]  # 1 / 2**-2 = 4 -> code 6
    assert (one[0] == 0x66).all()
    empty = mq.quantize(torch.empty(0, 64, dtype=torch.bfloat16))
    assert empty[0].shape == (0, 2, 16) and empty[1].shape == (0, 2)
    meta = mq.quantize(torch.empty(5, 64, dtype=torch.bfloat16, device="meta"))
    assert meta[0].shape == (5, 2, 16) and meta[0].dtype == torch.uint8


@pytest.mark.parametrize(
    ("x", "scale", "message"),
    [
        (torch.zeros(4, 48, dtype=torch.bfloat16), "ceil", "the last dim must be a multiple of 32"),
        (torch.zeros(4, 64, dtype=torch.int32), "ceil", "input must be bf16, fp16 or fp32"),
        (torch.zeros(4, 64, dtype=torch.float64), "ceil", "input must be bf16, fp16 or fp32"),
        (torch.zeros(4, 64, dtype=torch.bfloat16), "nearest", "scale must be one of ceil, floor"),
        (torch.tensor(1.0), "ceil", "the last dim must be a multiple of 32"),
    ],
)
def test_bad_inputs_raise_op_error(x, scale, message):
    for fn in (mq.quantize, mq.quantize_reference):
        with pytest.raises(OpError, match=message):
            fn(x, scale=scale)
