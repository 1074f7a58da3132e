"""MXFP4 (gpt-oss): the `dequantize-mxfp4` op and the format's description.

Dequantization: U8 blocks [..., G, 16] + U8 scales [..., G] -> [..., G*32].

Bit-exact with transformers' `_convert_moe_packed_tensors` (before its final transpose): element
2j of a 16-byte block is FP4 code `byte_j & 0xF`, element 2j+1 is `byte_j >> 4`, and every value is
`FP4[code] * 2**(scale - 127)` rounded once to the output dtype (`torch.ldexp`, which keeps
0 * 2**128 = +-0 and gives +-inf for |value| >= 2**128: scale byte 255 is not NaN there). The output stays in the
source row orientation ([E, 2I, H/32, 16] -> [E, 2I, H]); the planner chains `transpose`.

How it is fast and exact (~30x transformers on one core):
- One table holds, for every (scale, byte) pair, the byte's two output elements already scaled
  and rounded, computed once in fp64 (exact) and rounded once to the output dtype: 65536 entries
  of two bf16/fp16 (256 KiB, fits L2) or two fp32. Subnormals, signed zeros and +-inf come out of
  the exact math, so every corner is exact by construction and there is no second path.
- Per group: the index is `byte | scale << 8` (an int32 copy and a broadcast add over 16 bytes),
  then one gather writes the 32 elements straight into the output. An earlier design gathered 4
  unscaled values per two bytes and multiplied by 2**(s-127): the bf16 multiply alone cost more
  than this whole kernel.
- Work proceeds in cache-sized chunks of groups with reused index buffers.
- fp16 values that overflow (|value| >= 65536) raise OpError instead of becoming inf.
"""

import re
from typing import Literal

import torch

from moeconv import arena, dtypes, ops
from moeconv.errors import OpError
from moeconv.formats import Format, register_format

# E2M1 code -> value (index = 4-bit code; bit 3 is the sign).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

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


def _check_inputs(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """The op's own shape rule checks dtypes and shapes."""
    _shape([(dtypes.to_safetensors(t.dtype), tuple(t.shape)) for t in (blocks, scales)], dtype="BF16")


def _chunk(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, index: torch.Tensor, shifted: torch.Tensor) -> None:
    """blocks [n, 16] U8, scales [n] U8 -> out [n, 32] (contiguous); index [>= n, 16] and shifted
    [>= n, 1] are int32 scratch."""
    n = blocks.shape[0]
    table = _pair_table(out.dtype)  # [65536] of two output elements each
    shift = shifted[:n]
    shift.copy_(scales[:, None]).bitwise_left_shift_(8)  # [n, 1] scale << 8
    pairs = index[:n]
    pairs.copy_(blocks).add_(shift)  # [n, 16] = byte | scale << 8
    torch.index_select(table, 0, pairs.view(-1), out=out.view(table.dtype).view(-1))  # [n * 16] pairs


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

    `out`: optional contiguous tensor of that shape and dtype to write into.
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
        out = arena.empty((total, 32), dtype)  # [N, 32]
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise OpError(f"dequantize-mxfp4: out must be a contiguous {dtype} tensor of shape {list(shape)}")
    out = out.view(total, 32)
    if total == 0:
        return out.view(*lead, groups * 32)
    check_overflow = dtype == torch.float16 and int(flat_scales.max()) >= _FP16_OVERFLOW_SCALE
    chunk = min(_CHUNK_GROUPS, total)
    index = arena.empty((chunk, 16), torch.int32)
    shifted = arena.empty((chunk, 1), torch.int32)
    for g0 in range(0, total, chunk):
        g1 = min(g0 + chunk, total)
        _chunk(flat_blocks[g0:g1], flat_scales[g0:g1], out[g0:g1], index, shifted)
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


# ---- the op ---------------------------------------------------------------------------------------


def _shape(specs: list[ops.Spec], *, dtype: str) -> list[ops.Spec]:
    (blocks_dtype, blocks), (scales_dtype, scales) = specs
    if blocks_dtype != "U8" or scales_dtype != "U8":
        raise OpError(f"dequantize-mxfp4: blocks and scales must be U8, got {blocks_dtype} and {scales_dtype}")
    if len(blocks) < 2 or blocks[-1] != 16:
        raise OpError(f"dequantize-mxfp4: blocks must be [..., G, 16], got {list(blocks)}")
    if blocks[:-1] != scales:
        raise OpError(
            f"dequantize-mxfp4: scales {list(scales)} must equal blocks' shape without the last dim {list(blocks[:-1])}"
        )
    return [(dtype, blocks[:-2] + (blocks[-2] * 32,))]


def _rows(params: dict, specs: list[ops.Spec], index: int) -> ops.RowMap:
    # blocks [G, 16]: axis 0 is the group axis, and the output's axis 0 is 32x longer: computed whole
    return ops.SAME_ROWS if len(specs[0][1]) > 2 else None


@ops.register("dequantize-mxfp4", shape=_shape, rows=_rows, n_inputs=2, inverse="quantize-mxfp4")
def dequantize_op(blocks: torch.Tensor, scales: torch.Tensor, *, dtype: ops.Dtype = "bf16") -> torch.Tensor:
    """MXFP4 U8 blocks [.., G, 16] + U8 scales [.., G] -> [.., G*32] (source row orientation), bit-exact."""
    return dequantize(blocks, scales, dtype=dtypes.to_torch(dtype))


# ---- the format: transformers' quantized gpt-oss experts, for the load report --------------------

# transformers holds the packed bytes as one U8 param [..., K/2] and serializes it under the names in
# `Mxfp4HfQuantizer.serialized_names`; how [..., K/2] splits into those is this table (suffix -> shape).
_SERIALIZED_SHAPES = {
    "_blocks": lambda packed: (*packed[:-1], packed[-1] // 16, 16),  # [E, R, K/32, 16]
    "_scales": lambda packed: (*packed[:-1], packed[-1] // 16),  # [E, R, K/32]
}


def consumer_layout(model, quantization_config: dict) -> None:
    """transformers' `replace_with_mxfp4_linear` without its kernel download, then the packed params
    renamed and reshaped to the serialized tensors (blocks + scales)."""
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts, Mxfp4GptOssMLP
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.quantizers.quantizer_mxfp4 import Mxfp4HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module
    from transformers.utils.quantization_config import Mxfp4Config

    quantizer = Mxfp4HfQuantizer(Mxfp4Config.from_dict(dict(quantization_config)), pre_quantized=True)
    skip = quantizer.get_modules_to_not_convert(
        model, quantizer.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules
    )
    for name, module in list(model.named_modules()):
        if not (isinstance(module, GptOssMLP) and should_convert_module(f"{name}.experts", skip)):
            continue
        with torch.device("meta"):
            experts = Mxfp4GptOssExperts(model.config)
            for param, serialized in Mxfp4HfQuantizer.serialized_names.items():
                packed = tuple(experts._parameters.pop(param).shape)  # [E, 2I, H/2] or [E, H, I/2], U8
                for key in serialized:
                    shape = _SERIALIZED_SHAPES[key.removeprefix(param)](packed)
                    experts.register_parameter(
                        key, torch.nn.Parameter(torch.empty(shape, dtype=torch.uint8), requires_grad=False)
                    )
            model.set_submodule(name, Mxfp4GptOssMLP(module.router, experts))


# ---- quantization: the inverse op (kernel in mxfp4_quantize.py) --------------------------------------


def _quantize_shape(specs: list[ops.Spec], *, scale: str) -> list[ops.Spec]:
    ((dtype, shape),) = specs
    if dtype not in ("BF16", "F16", "F32"):
        raise OpError(f"quantize-mxfp4: input must be bf16, fp16 or fp32, got {dtype}")
    if not shape or shape[-1] % 32:
        raise OpError(f"quantize-mxfp4: the last axis of {list(shape)} must be a multiple of 32 (the blocks run along it)")
    groups = shape[-1] // 32
    return [("U8", (*shape[:-1], groups, 16)), ("U8", (*shape[:-1], groups))]


def _quantize_rows(params: dict, specs: list[ops.Spec], index: int) -> ops.RowMap:
    return ops.SAME_ROWS if len(specs[0][1]) > 1 else None  # rows are independent


@ops.register("quantize-mxfp4", shape=_quantize_shape, rows=_quantize_rows, inverse="dequantize-mxfp4", fanout="part")
def quantize_op(x: torch.Tensor, *, scale: Literal["ceil", "floor"] = "ceil") -> tuple[torch.Tensor, torch.Tensor]:
    """[.., K] bf16/fp16/fp32 -> MXFP4 U8 blocks [.., K/32, 16] + U8 scales [.., K/32] along the last axis (outputs 'blocks', 'scales')."""
    from moeconv.formats.mxfp4_quantize import quantize

    return quantize(x, scale=scale)


FORMAT = register_format(
    Format(
        quant_method="mxfp4",
        keys=re.compile(r".+_(blocks|scales)"),
        dtypes=frozenset({"U8"}),
        consumer_layout=consumer_layout,
        # what the gpt-oss hub checkpoints carry
        quantization_config={
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
        },
    )
)
