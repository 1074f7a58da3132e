"""compressed-tensors (llm-compressor, vLLM): ops that dequantize its weight formats, and the format.

Three ops, one per compressed-tensors weight format, each bit-exact with the `compressed-tensors`
package's own decompression (`<Compressor>.decompress`, which the tests call) and then cast to the
output dtype (`--dtype`):

- `dequantize-pack-quantized`: INT4/INT8 packed into I32 words [out, ceil(in*bits/32)] (element i of a
  row at bits i*bits.. of the row's word stream, stored as q + 2**(bits-1)), a scale [out, in/group]
  (group) or [out, 1] (channel) and, when asymmetric, a zero point packed the same way but along
  rows ([ceil(out*bits/32), groups], I32). The package computes `(q - zp) * scale` in the scale's
  dtype: q - zp is a small integer, so the product is exact in fp32 and rounding it once to the
  scale's dtype is that multiplication. The output's column count is the packed width times the
  values per word (in_features is data, in `weight_shape`): the kernel checks `weight_shape` and
  raises OpError on a mismatch (a channel-quantized weight whose in_features is not a multiple of
  32/bits is refused there, naming the numbers).
- `dequantize-nvfp4-pack-quantized`: FP4 E2M1 in U8 [out, in/2] (element 2j is `byte_j & 0xF`,
  2j+1 is `byte_j >> 4`), an F8_E4M3 scale per 16 elements and an F32 global scale [1] that is a
  divisor. The package rounds `scale / global_scale` to fp32, multiplies the fp4 value by it in fp32
  and rounds that to bf16; other output dtypes are that bf16 value cast.
- `dequantize-float-quantized`: F8_E4M3 weights times a per-channel [out, 1] or per-tensor [1] scale,
  in the scale's dtype (`weight.to(scale.dtype) * scale`; exact in fp32 before that one rounding).

How they are fast: no per-element bit twiddling or float decoding. An INT4 or FP4 byte indexes a
256-entry table of its two decoded values (one int64 = two fp32) and one `index_select` writes them
into a cache-sized fp32 block (an E4M3 byte indexes a table of one fp32; an INT8 byte converts
directly); one broadcast subtraction (zero points) and one broadcast multiply apply the group's
scale, and one cast writes the output. On one core: ~1.6e9 elements/s for INT4 (1.2x the package,
whose INT4 path splits bytes too), ~1.1e9 for NVFP4 (~20x), ~2.3e9 for INT8 (~20x), ~1.1e9 for FP8
(~4x), measured by benchmarks/kernel_compressed.py. Rounding happens in
exactly the places the package rounds, so there is no second path for corners: subnormals, signed
zeros, inf and NaN come out of the same fp32 arithmetic and casts.

fp16 output: a value that overflows fp16 raises OpError instead of becoming inf.
"""

import re
import sys

import torch

from moeconv import arena, dtypes, ops
from moeconv.errors import FormatError, OpError
from moeconv.formats import Format, register_format
from moeconv.formats.fp8 import e4m3_values
from moeconv.formats.mxfp4 import FP4_VALUES  # E2M1 code -> value, as compressed-tensors' kE2M1ToFloat

FORMATS = ("pack-quantized", "nvfp4-pack-quantized", "float-quantized")
_BLOCK_ELEMENTS = 1 << 18  # output elements per inner block: 1 MiB of fp32 scratch stays in L2
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP16_MAX = 65504.0

_tables: dict[str, torch.Tensor] = {}


def _pair_table(name: str) -> torch.Tensor:
    """[256] int64: byte -> its two decoded values (low nibble first) as two fp32, exact."""
    if name not in _tables:
        byte = torch.arange(256)
        if name == "int4":
            low, high = (byte & 0xF) - 8, (byte >> 4) - 8  # stored as q + 8
            values = torch.stack([low, high], dim=-1).to(torch.float32)  # [256, 2]
        else:  # "fp4"
            codes = torch.tensor(FP4_VALUES, dtype=torch.float32)
            values = torch.stack([codes[byte & 0xF], codes[byte >> 4]], dim=-1)  # [256, 2]
        _tables[name] = values.contiguous().view(torch.int64).view(256)
    return _tables[name]


def _out_dtype(op: str, dtype: torch.dtype) -> None:
    if dtype not in _OUT_DTYPES:
        raise OpError(f"{op}: output dtype must be bf16, fp16 or fp32, not {dtype}")


def _little_endian(op: str) -> None:
    if sys.byteorder != "little":
        raise OpError(f"{op}: packed words are read as little-endian bytes; this host is big-endian")


def _block_rows(cols: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(cols, 1))


def _store(op: str, values: torch.Tensor, out: torch.Tensor, via: torch.dtype | None) -> None:
    """fp32 values -> out, rounded first to `via` (the dtype the package computes in) when it is
    neither fp32 nor out's dtype; fp16 overflow raises OpError (no row named: the op may see a block
    of a tensor's rows, and the plan adds the key)."""
    if via is not None and via not in (torch.float32, out.dtype):
        values = values.to(via)
    out.copy_(values)
    if out.dtype == torch.float16 and torch.isinf(out).any():
        raise OpError(f"{op}: values overflow fp16 (|value| > {_FP16_MAX:g}); use dtype bf16 or fp32")


# ---- pack-quantized -------------------------------------------------------------------------------


def _unpack_rows(zero_point: torch.Tensor, num_bits: int, rows: int) -> torch.Tensor:
    """Zero points packed along rows: I32 [ceil(rows*bits/32), G] -> fp32 [rows, G] (signed q units)."""
    mask = (1 << num_bits) - 1
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int32)  # [per]
    codes = (zero_point[:, None, :] >> shifts[None, :, None]) & mask  # [Rz, per, G]
    codes = codes.reshape(-1, zero_point.shape[-1])[:rows]  # [rows, G]
    return (codes - (1 << (num_bits - 1))).to(torch.float32)


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    weight_shape: torch.Tensor,
    *,
    num_bits: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """pack-quantized INT4/INT8 -> [out, in] in dtype: `(q - zp) * scale` in the scale's dtype, as
    compressed-tensors' PackedQuantizationCompressor.decompress, then cast to dtype.

    packed I32 [out, P]; scale [out, G] (G = 1: channel); zero_point I32 [ceil(out*bits/32), G] or
    None (symmetric); weight_shape the stored [out, in] (rows may be a block of a larger weight:
    only `in` is checked, against P * 32 / bits).
    """
    op = "dequantize-pack-quantized"
    specs = [(dtypes.to_safetensors(t.dtype), tuple(t.shape)) for t in (packed, scale, zero_point, weight_shape) if t is not None]
    _pack_shape(specs, num_bits=num_bits, dtype="BF16")
    _out_dtype(op, dtype)
    _little_endian(op)
    rows, words = packed.shape
    cols = words * 32 // num_bits
    stored = [int(v) for v in weight_shape.reshape(-1).tolist()]
    if stored[-1] != cols:
        raise OpError(
            f"{op}: weight_shape says {stored[-1]} columns but the packed width holds {cols} "
            f"(in_features must be a multiple of {32 // num_bits} to be read without padding)"
        )
    out = arena.empty((rows, cols), dtype)  # [out, in]
    if rows == 0:
        return out
    groups = scale.shape[1]
    group = cols // groups
    scale32 = scale.to(torch.float32)  # [out, G], exact
    zero = _unpack_rows(zero_point, num_bits, rows) if zero_point is not None else None  # [out, G]
    data = packed.contiguous().view(torch.uint8)  # [out, 4P]: the words' bytes, element order
    step = _block_rows(cols)
    values = torch.empty(min(step, rows) * cols, dtype=torch.float32)
    index = torch.empty(min(step, rows) * (cols // 2), dtype=torch.int32) if num_bits == 4 else None
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        n = r1 - r0
        flat = values[: n * cols]
        block = flat.view(n, groups, group)  # [n, G, in/G]
        if num_bits == 4:
            idx = index[: n * cols // 2]
            idx.view(n, -1).copy_(data[r0:r1])
            # q, pairwise in column order (a byte's two values may belong to two groups)
            torch.index_select(_pair_table("int4"), 0, idx, out=flat.view(torch.int64))
            if zero is not None:
                block.sub_(zero[r0:r1, :, None])
        else:
            block.view(n, cols).copy_(data[r0:r1])  # q + 128
            block.sub_((zero[r0:r1] + 128)[:, :, None] if zero is not None else 128)
        block.mul_(scale32[r0:r1, :, None])  # exact: a small integer times a bf16/fp16 scale (fp32: rounds once, as the package)
        _store(op, block.view(n, cols), out[r0:r1], scale.dtype)
    return out


def _pack_shape(specs: list[ops.Spec], *, num_bits: int, dtype: str) -> list[ops.Spec]:
    op = "dequantize-pack-quantized"
    if len(specs) not in (3, 4):
        raise OpError(f"{op}: takes weight_packed, weight_scale, [weight_zero_point,] weight_shape; got {len(specs)} inputs")
    (packed_dtype, packed), (scale_dtype, scale), *zp, (shape_dtype, shape) = specs
    if num_bits not in (4, 8):
        raise OpError(f"{op}: num_bits {num_bits} is not supported (4 or 8)")
    if packed_dtype != "I32" or len(packed) != 2:
        raise OpError(f"{op}: weight_packed must be I32 [out, in*{num_bits}/32], got {packed_dtype} {list(packed)}")
    if scale_dtype not in ("BF16", "F16", "F32") or len(scale) != 2 or scale[0] != packed[0]:
        raise OpError(f"{op}: weight_scale must be BF16/F16/F32 [{packed[0]}, groups], got {scale_dtype} {list(scale)}")
    cols = packed[1] * 32 // num_bits
    if scale[1] < 1 or cols % scale[1]:
        raise OpError(f"{op}: weight_scale's {scale[1]} groups do not divide the {cols} packed columns")
    if zp:
        ((zp_dtype, zero),) = zp
        zp_rows = -(-packed[0] * num_bits // 32)
        if zp_dtype != "I32" or zero != (zp_rows, scale[1]):
            raise OpError(
                f"{op}: weight_zero_point must be I32 [{zp_rows}, {scale[1]}] (packed along rows), got {zp_dtype} {list(zero)}"
            )
    if shape_dtype not in ("I64", "I32") or shape != (2,):
        raise OpError(f"{op}: weight_shape must be I64 [2] (a 2-D weight), got {shape_dtype} {list(shape)}")
    return [(dtype, (packed[0], cols))]


def _pack_rows(params: dict, specs: list[ops.Spec], index: int) -> ops.RowMap:
    if len(specs) == 3:
        return ops.SameRows(inputs=lambda start, stop: [(start, stop), (start, stop), (0, 2)])
    per = 32 // params["num_bits"]  # zero points of `per` rows share a word

    def inputs(start: int, stop: int) -> list[tuple[int, int]]:
        return [(start, stop), (start, stop), (start // per, -(-stop // per)), (0, 2)]

    return ops.SameRows(multiple=per, inputs=inputs)


@ops.register("dequantize-pack-quantized", shape=_pack_shape, rows=_pack_rows, n_inputs=None)
def dequantize_packed_op(*tensors: torch.Tensor, num_bits: int, dtype: ops.Dtype = "bf16") -> torch.Tensor:
    """compressed-tensors pack-quantized INT4/INT8 (weight_packed, weight_scale, [weight_zero_point,] weight_shape) -> [out, in], bit-exact."""
    packed, scale, *zero_point, weight_shape = tensors
    return dequantize_packed(
        packed, scale, zero_point[0] if zero_point else None, weight_shape, num_bits=num_bits, dtype=dtypes.to_torch(dtype)
    )


# ---- nvfp4-pack-quantized -------------------------------------------------------------------------


def dequantize_nvfp4(
    packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """nvfp4-pack-quantized -> [out, in] in dtype: bf16(fp4 * fp32(scale / global_scale)) as
    compressed-tensors' NVFP4PackedCompressor.decompress, then cast to dtype.

    packed U8 [out, in/2]; scale F8_E4M3 [out, in/16]; global_scale F32 [1] (a divisor).
    """
    op = "dequantize-nvfp4-pack-quantized"
    _nvfp4_shape([(dtypes.to_safetensors(t.dtype), tuple(t.shape)) for t in (packed, scale, global_scale)], dtype="BF16")
    _out_dtype(op, dtype)
    rows, half = packed.shape
    cols = half * 2
    out = arena.empty((rows, cols), dtype)  # [out, in]
    if rows == 0:
        return out
    groups = cols // 16
    # as the package: the e4m3 scale as bf16 (exact), divided by the fp32 global scale in fp32
    effective = torch.div(scale.to(torch.bfloat16), global_scale)  # [out, in/16] fp32
    data = packed.contiguous()
    step = _block_rows(cols)
    values = torch.empty(min(step, rows) * cols, dtype=torch.float32)
    index = torch.empty(min(step, rows) * half, dtype=torch.int32)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        n = r1 - r0
        flat = values[: n * cols]
        block = flat.view(n, groups, 16)  # [n, in/16, 16]
        idx = index[: n * half]
        idx.view(n, half).copy_(data[r0:r1])
        torch.index_select(_pair_table("fp4"), 0, idx, out=flat.view(torch.int64))  # fp4 values, pairwise
        block.mul_(effective[r0:r1, :, None])  # rounds once in fp32, as the package
        _store(op, block.view(n, cols), out[r0:r1], torch.bfloat16)
    return out


def _nvfp4_shape(specs: list[ops.Spec], *, dtype: str) -> list[ops.Spec]:
    op = "dequantize-nvfp4-pack-quantized"
    (packed_dtype, packed), (scale_dtype, scale), (global_dtype, global_scale) = specs
    if packed_dtype != "U8" or len(packed) != 2 or (packed[1] * 2) % 16:
        raise OpError(f"{op}: weight_packed must be U8 [out, in/2] with in a multiple of 16, got {packed_dtype} {list(packed)}")
    if scale_dtype != "F8_E4M3" or scale != (packed[0], packed[1] * 2 // 16):
        raise OpError(f"{op}: weight_scale must be F8_E4M3 [{packed[0]}, {packed[1] * 2 // 16}], got {scale_dtype} {list(scale)}")
    if global_dtype != "F32" or global_scale != (1,):
        raise OpError(f"{op}: weight_global_scale must be F32 [1], got {global_dtype} {list(global_scale)}")
    return [(dtype, (packed[0], packed[1] * 2))]


def _nvfp4_rows(params: dict, specs: list[ops.Spec], index: int) -> ops.RowMap:
    return ops.SameRows(inputs=lambda start, stop: [(start, stop), (start, stop), (0, 1)])


@ops.register("dequantize-nvfp4-pack-quantized", shape=_nvfp4_shape, rows=_nvfp4_rows, n_inputs=3)
def dequantize_nvfp4_op(
    packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, *, dtype: ops.Dtype = "bf16"
) -> torch.Tensor:
    """compressed-tensors nvfp4-pack-quantized (weight_packed, weight_scale, weight_global_scale) -> [out, in], bit-exact."""
    return dequantize_nvfp4(packed, scale, global_scale, dtype=dtypes.to_torch(dtype))


# ---- float-quantized ------------------------------------------------------------------------------


def dequantize_float(weight: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float-quantized FP8 E4M3 [out, in] * scale [out, 1] (channel) or [1] (tensor) -> [out, in] in
    dtype: `weight.to(scale.dtype) * scale` as compressed-tensors' FloatQuantizationCompressor, then cast."""
    op = "dequantize-float-quantized"
    _float_shape([(dtypes.to_safetensors(t.dtype), tuple(t.shape)) for t in (weight, scale)], dtype="BF16")
    _out_dtype(op, dtype)
    rows, cols = weight.shape
    out = arena.empty((rows, cols), dtype)  # [out, in]
    if rows == 0:
        return out
    scale32 = scale.to(torch.float32).reshape(-1, 1)  # [out or 1, 1]
    per_row = scale.dim() == 2
    step = _block_rows(cols)
    values = torch.empty(min(step, rows) * cols, dtype=torch.float32)
    index = torch.empty(min(step, rows) * cols, dtype=torch.int32)
    data = weight.contiguous().view(torch.uint8)  # [out, in] e4m3 bytes
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        block = values[: (r1 - r0) * cols].view(r1 - r0, cols)
        idx = index[: (r1 - r0) * cols]
        idx.view(r1 - r0, cols).copy_(data[r0:r1])
        torch.index_select(e4m3_values().view(torch.int32), 0, idx, out=block.view(torch.int32).view(-1))  # e4m3 -> fp32, exact
        block.mul_(scale32[r0:r1] if per_row else scale32)  # exact for bf16/fp16 scales; fp32 rounds once, as the package
        _store(op, block, out[r0:r1], scale.dtype)
    return out


def _float_shape(specs: list[ops.Spec], *, dtype: str) -> list[ops.Spec]:
    op = "dequantize-float-quantized"
    (weight_dtype, weight), (scale_dtype, scale) = specs
    if weight_dtype != "F8_E4M3" or len(weight) != 2:
        raise OpError(f"{op}: weight must be F8_E4M3 [out, in], got {weight_dtype} {list(weight)}")
    if scale_dtype not in ("BF16", "F16", "F32") or scale not in ((weight[0], 1), (1,)):
        raise OpError(
            f"{op}: weight_scale must be BF16/F16/F32 [{weight[0]}, 1] (channel) or [1] (tensor), got {scale_dtype} {list(scale)}"
        )
    return [(dtype, weight)]


def _float_rows(params: dict, specs: list[ops.Spec], index: int) -> ops.RowMap:
    if specs[1][1] == (specs[0][1][0], 1):
        return ops.SAME_ROWS
    return ops.SameRows(inputs=lambda start, stop: [(start, stop), (0, 1)])  # one scale for the tensor


@ops.register("dequantize-float-quantized", shape=_float_shape, rows=_float_rows, n_inputs=2)
def dequantize_float_op(weight: torch.Tensor, scale: torch.Tensor, *, dtype: ops.Dtype = "bf16") -> torch.Tensor:
    """compressed-tensors float-quantized FP8 E4M3 weight * per-channel or per-tensor weight_scale -> [out, in], bit-exact."""
    return dequantize_float(weight, scale, dtype=dtypes.to_torch(dtype))


# ---- the format -----------------------------------------------------------------------------------


def _weights_fault(fmt: str, weights: dict) -> str | None:
    """What in a config group's `weights` this module cannot read, or None."""
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    if weights.get("dynamic") not in (False, None):
        return f"dynamic weight quantization (dynamic = {weights.get('dynamic')!r})"
    if weights.get("actorder") not in (None, False, "weight", "static"):
        return f"actorder {weights.get('actorder')!r} (weights stored in activation order)"
    if fmt == "pack-quantized":
        if kind != "int" or bits not in (4, 8):
            return f"{fmt} weights of type {kind!r} with num_bits {bits!r} (moeconv reads int 4 and int 8)"
        if strategy not in ("group", "channel"):
            return f"{fmt} strategy {strategy!r} (moeconv reads group, channel)"
    elif fmt == "nvfp4-pack-quantized":
        if kind != "float" or bits != 4 or strategy != "tensor_group" or weights.get("group_size") != 16:
            return f"{fmt} weights {kind!r} num_bits {bits!r} strategy {strategy!r} group_size {weights.get('group_size')!r} (moeconv reads float 4-bit tensor_group 16)"
        if weights.get("symmetric") is False:
            return f"asymmetric {fmt} weights"
    else:  # float-quantized
        if kind != "float" or bits != 8:
            return f"{fmt} weights of type {kind!r} with num_bits {bits!r} (moeconv reads float 8, E4M3)"
        if strategy not in ("channel", "tensor"):
            return f"{fmt} strategy {strategy!r} (moeconv reads channel, tensor)"
        if weights.get("symmetric") is False:
            return f"asymmetric {fmt} weights"
    return None


def check_config(quantization: dict) -> None:
    """Raise FormatError (one line) unless every config group's weights are a scheme the ops above
    read. Activation quantization (input/output activations, kv_cache_scheme) is runtime-only: it
    does not change what the stored weights mean, so it is accepted (the preset drops its scales).
    Refused: transforms and sparsity (they change the weights' meaning), uncompressed status, and
    pack-quantized groups whose num_bits the preset cannot read from config_groups.group_0."""
    prefix = "compressed-tensors"
    status = quantization.get("quantization_status", "compressed")
    if status != "compressed":
        raise FormatError(f"{prefix} quantization_status {status!r} is not supported (moeconv reads compressed checkpoints)")
    for field in ("transform_config", "sparsity_config"):
        if quantization.get(field):
            raise FormatError(f"{prefix} {field} is not supported (it changes what the stored weights mean)")
    groups = quantization.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise FormatError(f"{prefix} quantization_config without config_groups is not supported")
    top = quantization.get("format")
    schemes: dict[str, tuple[str, dict]] = {}  # format -> (first group, weights)
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not weights:
            continue  # activations only: nothing stored changes
        fmt = group.get("format") or top
        if fmt not in FORMATS:
            raise FormatError(f"{prefix} format {fmt!r} is not supported (moeconv reads {', '.join(FORMATS)})")
        fault = _weights_fault(fmt, weights)
        if fault:
            raise FormatError(f"{prefix} {fault} in config group {name!r} is not supported")
        if fmt in schemes and schemes[fmt][1] != weights:
            raise FormatError(
                f"{prefix} config groups {schemes[fmt][0]!r} and {name!r} quantize {fmt} weights differently; moeconv reads one scheme per format"
            )
        schemes.setdefault(fmt, (name, weights))
    if "pack-quantized" in schemes and schemes["pack-quantized"][1] != (groups.get("group_0") or {}).get("weights"):
        raise FormatError(
            f"{prefix} pack-quantized weights outside config group 'group_0' are not supported (the preset reads num_bits from config_groups.group_0)"
        )


FORMAT = register_format(
    Format(
        quant_method="compressed-tensors",
        # what stays compressed: packed data, scales, zero points, shapes; an F8 `.weight` always has its weight_scale
        keys=re.compile(r".+\.(weight_packed|weight_scale|weight_zero_point|weight_shape|weight_global_scale)"),
        dtypes=frozenset({"I32", "I64", "U8", "F8_E4M3", "BF16", "F16", "F32"}),
        check_config=check_config,
    )
)
