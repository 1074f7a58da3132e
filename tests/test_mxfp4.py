"""MXFP4 dequantization, bit-exact against transformers' `_convert_moe_packed_tensors` (un-transposed).

What the reference does (torch 2.13 / transformers 5.x) and what we do:
- value = FP4[nibble] * 2**(scale - 127) via torch.ldexp in the output dtype: one rounding of the
  exact value (fp16 subnormals round to nearest even), 0 * 2**128 = +-0 (not NaN: ldexp, not x*inf).
- |value| >= 2**128 (scales 253..255 with large codes) is +-inf in bf16 and fp32: we produce the same
  +-inf, bit for bit (no NaN arises anywhere in the reference; none here either).
- fp16: |value| >= 65536 is inf in the reference; we raise OpError instead (never a silent inf).

Throughput: `python tests/test_mxfp4.py` (one thread, [32, 5760, 90, 16] blocks).
"""

import sys
import time

import pytest
import torch
from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

from moeconv import ops
from moeconv.errors import OpError
from moeconv.formats import mxfp4

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def reference(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' dequantizer, with its final transpose(1, 2) undone: [..., G, 16] -> [..., G*32]."""
    return _convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2).contiguous()


def simple(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Plain LUT + ldexp in fp64 (exact), then one rounding: the definition, slow and obvious."""
    lut = torch.tensor(mxfp4.FP4_VALUES, dtype=torch.float64)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]  # [..., G, 16] each
    values = torch.stack([lo, hi], dim=-1).flatten(-2)  # [..., G, 32]: low nibble = even element
    exact = torch.ldexp(values, scales.long()[..., None] - 127)
    return exact.to(torch.float32).to(dtype).flatten(-2)  # fp64 -> fp32 exact (or inf): one rounding


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_OF[t.dtype])


def all_pairs(scales: range = range(256)) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [2, S, 16, 16] holding bytes 0..255 in every row; row r has scale scales[r] on every group."""
    byte = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    scale = torch.tensor(list(scales), dtype=torch.uint8).view(1, -1, 1)
    return byte.expand(2, len(scales), 16, 16).contiguous(), scale.expand(2, len(scales), 16).contiguous()


# ---- the exhaustive table -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_every_byte_and_scale_matches_transformers(dtype):
    blocks, scales = all_pairs()
    ref = reference(blocks, scales, dtype)
    got = mxfp4.dequantize(blocks, scales, dtype=dtype)
    assert torch.equal(bits(got), bits(ref))  # finite values, signed zeros, and the +-inf, bit for bit
    # What the reference does at the corners (and so do we):
    assert not ref.isnan().any()
    row = ref[0, 255].view(256, 2)  # scale 255 = 2**128, element pairs of bytes 0..255
    assert row[0, 0] == 0 and not torch.signbit(row[0, 0])  # +0 * 2**128 = +0
    assert row[0x88, 0] == 0 and torch.signbit(row[0x88, 0])  # -0 * 2**128 = -0
    assert row[0x01, 0] == 2.0**127 and row[0x02, 0] == torch.inf and row[0x0A, 0] == -torch.inf
    assert ref[0, 0].view(256, 2)[0x01, 0] == 2.0**-128  # 0.5 * 2**-127: subnormal, exact
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got)) and (~finite).sum() == 2 * 768


def test_every_byte_and_scale_matches_transformers_fp16():
    blocks, scales = all_pairs()
    ref = reference(blocks, scales, torch.float16)  # [2, 256, 512]
    row_finite = torch.isfinite(ref[0]).all(dim=1)  # per scale
    assert row_finite[:141].all() and not row_finite[141:].any()  # 4 * 2**14 = 65536 overflows
    ok = torch.arange(141)
    got = mxfp4.dequantize(blocks[:, ok], scales[:, ok], dtype=torch.float16)
    assert torch.equal(bits(got), bits(ref[:, ok]))  # including subnormal rounding at small scales
    # Scales >= 141: bytes whose pair is finite match; a byte with an overflowing value raises (the
    # smallest and largest such byte of every scale are tried alone, and all of them together).
    byte = torch.arange(256, dtype=torch.uint8)
    for s in range(141, 256):
        pairs = ref[0, s].view(256, 2)
        fine = torch.isfinite(pairs).all(dim=1)
        blk = byte[fine].view(1, -1, 1).expand(-1, -1, 16).contiguous()  # [1, n, 16]: one byte per group
        sc = torch.full((1, int(fine.sum())), s, dtype=torch.uint8)
        out = mxfp4.dequantize(blk, sc, dtype=torch.float16).view(-1, 16, 2)[:, 0]
        assert torch.equal(bits(out), bits(pairs[fine]))
        bad = byte[~fine]
        for b in {int(bad.min()), int(bad.max())}:
            with pytest.raises(OpError, match=f"overflow fp16.*scale byte {s} = 2\\^{s - 127}"):
                mxfp4.dequantize(torch.full((1, 1, 16), b, dtype=torch.uint8), sc[:, :1], dtype=torch.float16)
        with pytest.raises(OpError, match="overflow fp16"):
            mxfp4.dequantize(
                bad.view(1, -1, 1).expand(-1, -1, 16).contiguous(),
                torch.full((1, bad.numel()), s, dtype=torch.uint8),
                dtype=torch.float16,
            )


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_simple_and_table_references_agree_with_transformers(dtype):
    blocks, scales = all_pairs()
    ref = bits(reference(blocks, scales, dtype))
    assert torch.equal(bits(simple(blocks, scales, dtype)), ref)
    assert torch.equal(bits(mxfp4.dequantize_reference(blocks, scales, dtype)), ref)


# ---- realistic shapes ---------------------------------------------------------------------------


def random_case(shape, lo=0, hi=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(lo, hi, shape, dtype=torch.uint8, generator=g)
    return blocks, scales


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(3, 10, 7), (2, 300, 30), (1, 1, 1)], ids=["small", "multi-chunk", "one-group"])
def test_random_inputs_match_transformers(dtype, shape, monkeypatch):
    monkeypatch.setattr(mxfp4, "_CHUNK_GROUPS", 4096)  # several chunks and a short tail for "multi-chunk"
    lo, hi = (100, 141) if dtype == torch.float16 else (0, 256)  # fp16: scales that cannot overflow
    blocks, scales = random_case(shape, lo, hi)
    got = mxfp4.dequantize(blocks, scales, dtype=dtype)
    assert got.shape == (*shape[:-1], shape[-1] * 32) and got.dtype == dtype
    assert torch.equal(bits(got), bits(reference(blocks, scales, dtype)))


def test_realistic_scales_through_the_op_and_transpose_match_transformers():
    """The gpt-oss-bf16 preset chain: dequantize-mxfp4 then transpose(1, 2) = transformers' output."""
    blocks, scales = random_case((4, 12, 5), 110, 135, seed=3)  # [E, 2I, H/32, 16]
    (deq,) = ops.apply("dequantize-mxfp4", [blocks, scales], {"dtype": "bf16"})
    (out,) = ops.apply("transpose", [deq], {"dim0": 1, "dim1": 2})  # [E, H, 2I]
    assert torch.equal(bits(out), bits(_convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_slicing_the_leading_axis_commutes(dtype):
    blocks, scales = random_case((6, 20, 9), 100, 141, seed=1)
    whole = mxfp4.dequantize(blocks, scales, dtype=dtype)
    for a, b in [(0, 1), (2, 5), (5, 6)]:
        assert torch.equal(bits(mxfp4.dequantize(blocks[a:b], scales[a:b], dtype=dtype)), bits(whole[a:b]))


def test_non_contiguous_inputs_and_out_buffer():
    blocks, scales = random_case((3, 8, 4), seed=2)
    want = simple(blocks[:, ::2], scales[:, ::2], torch.bfloat16)
    assert torch.equal(bits(mxfp4.dequantize(blocks[:, ::2], scales[:, ::2])), bits(want))
    buffer = torch.empty(3, 4, 128, dtype=torch.bfloat16)
    assert mxfp4.dequantize(blocks[:, ::2], scales[:, ::2], out=buffer).data_ptr() == buffer.data_ptr()
    assert torch.equal(bits(buffer), bits(want))
    with pytest.raises(OpError, match="out must be"):
        mxfp4.dequantize(blocks, scales, out=buffer)


def test_empty_input():
    out = mxfp4.dequantize(torch.zeros(0, 5, 3, 16, dtype=torch.uint8), torch.zeros(0, 5, 3, dtype=torch.uint8))
    assert out.shape == (0, 5, 96) and out.dtype == torch.bfloat16


def test_fp16_overflow_raises_and_names_the_problem():
    blocks, scales = random_case((2, 4, 3), 110, 130)
    scales[1, 2, 1] = 127 + 15  # 2**15: any code >= 2 overflows
    blocks[1, 2, 1] = 0x77  # 6, 6
    with pytest.raises(OpError, match=r"overflow fp16 .*scale group 19: scale byte 142 = 2\^15.*bf16 or fp32"):
        mxfp4.dequantize(blocks, scales, dtype=torch.float16)
    assert mxfp4.dequantize(blocks, scales, dtype=torch.bfloat16)[1, 2, 32:64].eq(6 * 2.0**15).all()


def test_meta_device_shape_inference():
    blocks = torch.empty(32, 5760, 90, 16, dtype=torch.uint8, device="meta")
    scales = torch.empty(32, 5760, 90, dtype=torch.uint8, device="meta")
    for name, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("float32", torch.float32)]:
        (out,) = ops.apply("dequantize-mxfp4", [blocks, scales], {"dtype": name})
        assert out.is_meta and out.shape == (32, 5760, 2880) and out.dtype == dtype
    assert ops.infer("dequantize-mxfp4", [("U8", (128, 2880, 90, 16)), ("U8", (128, 2880, 90))], {}) == [
        ("BF16", (128, 2880, 2880))
    ]


def test_input_errors():
    with pytest.raises(OpError, match="must be U8"):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(OpError, match="must equal blocks' shape"):
        mxfp4.dequantize(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(OpError, match="output dtype"):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), dtype=torch.int8)


# ---- throughput (not a test: `python tests/test_mxfp4.py`) --------------------------------------


def bench() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (32, 5760, 90, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 135, (32, 5760, 90), dtype=torch.uint8, generator=g)
    n = blocks.numel() * 2
    print(f"blocks {list(blocks.shape)} -> {n:.3e} output elements, 1 thread")
    for dtype in DTYPES:
        buffer = torch.ones(32, 5760, 2880, dtype=dtype)  # pre-touched: no first-touch page faults
        for _ in range(2):
            t = time.perf_counter()
            del_me = mxfp4.dequantize(blocks, scales, dtype=dtype)
            fresh = time.perf_counter() - t
            del del_me
            t = time.perf_counter()
            mxfp4.dequantize(blocks, scales, dtype=dtype, out=buffer)
            warm = time.perf_counter() - t
            print(
                f"{str(dtype):15s} new output {n / fresh:.2e} elem/s ({fresh:.2f} s)   into a reused buffer {n / warm:.2e} elem/s ({warm:.2f} s)"
            )
        del buffer
    small = (blocks[:2], scales[:2])
    t = time.perf_counter()
    _convert_moe_packed_tensors(*small, dtype=torch.bfloat16)
    ref = time.perf_counter() - t
    print(f"transformers _convert_moe_packed_tensors on 2 experts: {small[0].numel() * 2 / ref:.2e} elem/s")


if __name__ == "__main__":
    sys.exit(bench())
