"""FP8 block quantization (DeepSeek-V3/R1/V3.1, Kimi-K2, Qwen3-FP8, MiniMax-M2): the
`dequantize-fp8-block` op and the format's description.

A weight is float8_e4m3fn [.., out, in] with `weight_scale_inv` [.., ceil(out/B0), ceil(in/B1)]
(config.json `weight_block_size: [B0, B1]`); every element is `fp32(weight) * fp32(scale of its
block)`, rounded once to the output dtype. Edge blocks cover only the elements that exist
(DeepSeek-V3's `kv_a_proj_with_mqa` [576, 7168] has a [5, 56] grid). Scales come as float32,
bfloat16 or float16 (widened exactly), or as UE8M0 exponents (U8 or F8_E8M0: 2**(byte - 127)).

Bit-exact with transformers' `Fp8Dequantize` (FineGrainedFP8Config(dequantize=True)): the same fp32
product, the same single rounding. Unlike it, this needs no GPU and takes dims that are not
multiples of the block.

How it is fast (~8x the plain fp32 product on one core): a block has one scale, so its 256
possible bytes have 256 possible outputs. Per row block, one table holds them for every column
block ([in/B1, 256], computed by the reference's own fp32 product and rounding, so every value,
NaN, subnormal and signed zero is the reference's by construction), and one gather writes the
output from `byte + 256 * column_block`. Blocks under 1024 elements (a config may claim [1, 1])
take the formula instead: a byte gathered as fp32, times the block's scale, one cast; the table
would cost more than the elements it serves.
"""

import functools
import math
import re

import torch

from moeconv import arena, dtypes, ops
from moeconv.errors import FormatError, OpError
from moeconv.formats import Format, register_format

E4M3_NAMES = ("e4m3", "float8_e4m3fn")  # DeepSeek, Kimi and Qwen write the first, MiniMax-M2 the second
_SCALE_DTYPES = ("F32", "BF16", "F16", "U8", "F8_E8M0")  # U8 / F8_E8M0: UE8M0 exponents
_OUT_DTYPES = {"BF16": torch.int16, "F16": torch.int16, "F32": torch.int32}  # output dtype -> same-width int for the gather
_TABLE_MIN_BLOCK = 1024  # smaller blocks (elements) take the formula: a table of 256 per block would cost more
_SMALL_BLOCK_ELEMENTS = 1 << 18  # output elements per row block on that path (1 MiB of fp32)


@functools.cache
def e4m3_values() -> torch.Tensor:
    """[256] fp32: every float8_e4m3fn byte's value (torch's conversion: exact, NaN for 0x7F and 0xFF)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def scales_fp32(scales: torch.Tensor) -> torch.Tensor:
    """The scale of every block as fp32, as transformers widens it (UE8M0 bytes: 2**(byte - 127))."""
    if scales.dtype == torch.uint8:
        return (scales.to(torch.float32) - 127.0).exp2()
    return scales.to(torch.float32)


def _grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def dequantize(
    weight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """FP8 E4M3 [.., out, in] + block scales [.., ceil(out/B0), ceil(in/B1)] -> [.., out, in] in dtype.

    `weight` may be float8_e4m3fn or its bytes as uint8. Raises OpError when a value overflows fp16.
    """
    _shape(
        [(dtypes.to_safetensors(weight.dtype), tuple(weight.shape)), (dtypes.to_safetensors(scales.dtype), tuple(scales.shape))],
        block=list(block),
        dtype=dtypes.to_safetensors(dtype),
    )
    if weight.is_meta or scales.is_meta:
        return torch.empty(weight.shape, dtype=dtype, device="meta")
    out = arena.empty(tuple(weight.shape), dtype)
    if out.numel() == 0:
        return out
    rows, cols = weight.shape[-2:]
    lead = math.prod(weight.shape[:-2])
    codes = weight.contiguous().view(torch.uint8).view(lead, rows, cols)  # [M, out, in]
    scale = scales_fp32(scales.contiguous()).view(lead, *scales.shape[-2:])  # [M, out/B0, in/B1]
    flat = out.view(_OUT_DTYPES[dtypes.to_safetensors(dtype)]).view(codes.shape)  # [M, out, in]
    b0, b1 = min(block[0], rows), min(block[1], cols)  # a block past the matrix is one grid cell (and fits int32)
    if b0 * b1 < _TABLE_MIN_BLOCK:
        _dequantize_small_blocks(codes, scale, (b0, b1), out.view(codes.shape))
        return out
    column_base = (torch.arange(cols, dtype=torch.int32) // b1) * 256  # [in]: where each column's block table starts
    index = arena.empty((min(b0, rows), cols), torch.int32)  # [B0, in]
    values = e4m3_values()  # [256]
    for m in range(codes.shape[0]):
        for block_row, r0 in enumerate(range(0, rows, b0)):
            r1 = min(r0 + b0, rows)
            # [in/B1, 256]: every byte's value in every column block of these rows, the reference's product rounded once
            table = (values[None, :] * scale[m, block_row, :, None]).to(dtype)
            if dtype == torch.float16 and torch.isinf(table).any():
                _check_fp16(codes[m, r0:r1], table, column_base, scale[m, block_row])
            rows_index = index[: r1 - r0]
            torch.add(codes[m, r0:r1], column_base, out=rows_index)  # [rows, in] = byte + 256 * column block
            torch.index_select(table.view(flat.dtype).view(-1), 0, rows_index.view(-1), out=flat[m, r0:r1].reshape(-1))
    return out


def _dequantize_small_blocks(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], out: torch.Tensor) -> None:
    """The formula itself, for blocks too small to pay for a 256-entry table each (a [1, 1] grid
    would cost 256 table entries an element): codes [M, out, in] U8, scale [M, G0, G1] fp32 ->
    out [M, out, in], in cache-sized row blocks."""
    rows, cols = codes.shape[-2:]
    b0, b1 = block
    step = max(b0, _SMALL_BLOCK_ELEMENTS // max(cols, 1) // b0 * b0)
    values = e4m3_values()  # [256]
    for m in range(codes.shape[0]):
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            grid = scale[m, r0 // b0 : -(-r1 // b0)]  # [rows/B0, in/B1]
            full = grid.repeat_interleave(b0, 0)[: r1 - r0].repeat_interleave(b1, 1)[:, :cols]  # [rows, in]
            exact = torch.index_select(values, 0, codes[m, r0:r1].reshape(-1).to(torch.int32)).view(r1 - r0, cols)  # fp32
            out[m, r0:r1].copy_(exact.mul_(full))  # the fp32 product, rounded once to the output dtype
            if out.dtype == torch.float16 and torch.isinf(out[m, r0:r1]).any():
                raise OpError("dequantize-fp8-block: a value overflows fp16 (|value| > 65504); use dtype bf16 or fp32")


def _check_fp16(codes: torch.Tensor, table: torch.Tensor, column_base: torch.Tensor, scales: torch.Tensor) -> None:
    """Raise OpError if a byte actually present maps to a table entry that overflowed fp16
    (positions are not named: the op sees a block of rows, the message gets the key from the plan)."""
    hits = torch.isinf(table.view(-1))[(codes.to(torch.int32) + column_base).view(-1)]
    if hits.any():
        column = int(hits.nonzero()[0, 0]) % codes.shape[-1]
        scale = float(scales[int(column_base[column]) // 256])
        raise OpError(
            f"dequantize-fp8-block: a value overflows fp16 (|value| > 65504, in a block of scale {scale:g}); use dtype bf16 or fp32"
        )


# ---- the op ---------------------------------------------------------------------------------------


def _block(block: list[int]) -> tuple[int, int]:
    if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block):
        raise OpError(f"dequantize-fp8-block: block must be two positive integers [B0, B1], got {block}")
    return block[0], block[1]


def _shape(specs: list[ops.Spec], *, block: list[int], dtype: str) -> list[ops.Spec]:
    (weight_dtype, weight), (scale_dtype, scale) = specs
    b = _block(block)
    if weight_dtype not in ("F8_E4M3", "U8"):
        raise OpError(f"dequantize-fp8-block: weight must be F8_E4M3, got {weight_dtype}")
    if scale_dtype not in _SCALE_DTYPES:
        raise OpError(f"dequantize-fp8-block: scales must be one of {', '.join(_SCALE_DTYPES)}, got {scale_dtype}")
    if dtype not in _OUT_DTYPES:
        raise OpError(
            f"dequantize-fp8-block: output dtype must be bf16, fp16 or fp32, not {dtypes.SHORT_NAMES.get(dtype, dtype)}"
        )
    if len(weight) < 2:
        raise OpError(f"dequantize-fp8-block: weight must be [.., out, in], got {list(weight)}")
    if scale != _grid(weight, b):
        raise OpError(
            f"dequantize-fp8-block: scales {list(scale)} do not match weight {list(weight)} in blocks of {list(b)} "
            f"(expected {list(_grid(weight, b))})"
        )
    return [(dtype, weight)]


def _rows(params: dict, specs: list[ops.Spec], index: int) -> ops.RowMap:
    weight = specs[0][1]
    if len(weight) > 2:
        return ops.SAME_ROWS  # [E, out, in]: experts are independent
    b0 = params["block"][0]
    # rows start:stop (whole blocks of B0 rows, the last one short) read scale rows start/B0 : ceil(stop/B0)
    return ops.SameRows(multiple=b0, inputs=lambda start, stop: [(start, stop), (start // b0, math.ceil(stop / b0))])


@ops.register("dequantize-fp8-block", shape=_shape, rows=_rows, n_inputs=2)
def dequantize_op(weight: torch.Tensor, scales: torch.Tensor, *, block: list[int], dtype: ops.Dtype = "bf16") -> torch.Tensor:
    """FP8 E4M3 [.., out, in] + scales [.., ceil(out/B0), ceil(in/B1)] (F32/BF16/F16/UE8M0) -> [.., out, in], bit-exact."""
    return dequantize(weight, scales, _block(block), dtypes.to_torch(dtype))


# ---- the format -------------------------------------------------------------------------------------


def check_config(quantization: dict) -> None:
    """What this module reads: E4M3 weights in 2-D blocks. Activation settings (`activation_scheme`,
    `scale_fmt`) concern the runtime's activations, not the stored weights, and are accepted."""
    fmt = quantization.get("fmt", "e4m3")
    if fmt not in E4M3_NAMES:
        raise FormatError(f"fp8 quantization_config fmt {fmt!r} is not supported (moeconv reads e4m3)")
    block = quantization.get("weight_block_size")
    if block is None:
        raise FormatError(
            "fp8 quantization_config has no weight_block_size: per-tensor FP8 is not supported (moeconv reads block scales)"
        )
    if not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)
    ):
        raise FormatError(f"fp8 quantization_config weight_block_size {block!r} is not two positive integers")


def consumer_layout(model, quantization_config: dict):
    """transformers' FineGrainedFP8 modules (FP8Linear, FP8Experts: weight + weight_scale_inv) on the
    meta model, as from_pretrained puts them for a checkpoint kept in FP8; returns the quantizer,
    whose weight conversions fuse per-expert scales as the weights are fused."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    from transformers.utils.quantization_config import FineGrainedFP8Config

    quantizer = FineGrainedFP8HfQuantizer(FineGrainedFP8Config.from_dict(dict(quantization_config)), pre_quantized=True)
    quantizer._process_model_before_weight_loading(model)  # no kernel is loaded: modules on meta only
    return quantizer


FORMAT = register_format(
    Format(
        quant_method="fp8",
        keys=re.compile(r".+"),  # any F8_E4M3 tensor left still needs its scale
        dtypes=frozenset({"F8_E4M3"}),
        consumer_layout=consumer_layout,
        check_config=check_config,
    )
)
