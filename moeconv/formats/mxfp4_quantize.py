"""MXFP4 quantization (the inverse of `mxfp4.dequantize`): [..., K] bf16/fp16/fp32 -> U8 blocks
[..., K/32, 16] + U8 E8M0 scales [..., K/32], along the last axis, bit-exact, on a CPU.

Layout (gpt-oss hub): a block is 32 consecutive elements of the last axis; byte j of its 16 holds
element 2j in the low nibble and element 2j+1 in the high nibble, each an FP4 E2M1 code (bit 3 the
sign, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6); the block's scale byte s stands for 2**(s - 127).
Rows are independent, so any row block of a tensor quantizes to the matching rows of the result
(streaming).

Scale choice, two modes:
- "ceil" (default): triton_kernels' DequantScaleRoundingMode.ROUND_UP, what transformers'
  `integrations.mxfp4.quantize_to_mxfp4` runs (it calls triton_kernels' `downcast_to_mxfp_torch`,
  numerics_details/mxfp.py; the GPU kernel `_compute_quant_and_scale` in
  mxfp_details/_downcast_to_mxfp.py computes the same scale). Verified there:
  amax = max |x| over the block, in fp32 (the input is cast to fp32 first: exact for bf16/fp16);
  d = amax / 6.0 ROUNDED TO FP32; the scale is 2**ceil(log2 d) taken on d's bits
  ((bits + 0x7FFFFF) & 0x7F800000), its byte is that exponent field. Consequences:
  * the smallest power of two with amax / scale <= 6 (never clips), EXCEPT that a subnormal d
    (amax < 6 * 2**-126) gets 2**-126 (byte 1), never 2**-127 (byte 0);
  * amax = 0, and fp32 amax <= 3 * 2**-149 whose d rounds to 0, give byte 0 and multiplier 0:
    every element becomes a signed zero (code 0, or 8 for a negative input);
  * finite inputs never give more than byte 253 (fp32 max / 6 < 2**126): no clamp is needed.
  Elements: q = x * (1 / scale) in fp32 (exact: powers of two), then round to nearest, TIES TO
  EVEN, onto E2M1, saturating at 6; the sign bit is kept even when the magnitude rounds to 0
  (-0.0 and tiny negatives give code 8). Checked bit for bit against a local, uncommitted
  transcription of the current `downcast_to_mxfp_torch` on this module's test inputs (every finite
  bf16/fp16 value under many block maxima, random fp32 at every scale, fp32 ties +- 1 ulp, tiny
  fp32 blocks, zeros): identical blocks and scales. Upstream history: ties-to-even arrived with
  triton PR #8110 ("round-to-nearest-to-even mxfp4 quant to be consistent with mxfp8"); before it
  the torch reference added 1 at the guard bit (ties away from zero), and a later fix added the
  bits dropped by its subnormal shift to the sticky bit (only fp32 inputs have such bits).
  transformers takes triton_kernels from the hub (kernels-community/triton_kernels), whose pinned
  revision could not be checked offline; this module follows the current upstream reference.
  transformers casts the weight to bf16 before quantizing (`w.to(torch.bfloat16)`): for fp32 input
  that is a second rounding. Here fp32 is quantized from its own value (one rounding); cast to bf16
  first to reproduce transformers on fp32 weights.
- "floor": OCP Microscaling Formats v1.0, as microsoft/microxcaling's `_quantize_mx` computes it
  (read in copies of mx_ops.py; the spec PDF was not reachable here): shared_exp =
  floor(log2 amax) - 2 (2 = emax of E2M1), clamped below at -127 (amax = 0 -> byte 0); elements
  above 6 after scaling saturate to +-6 (below 8 can occur). Same element rounding as "ceil"
  (ties to even; microxcaling's round="nearest" is floor(|x| + 0.5), ties away, with a separate
  "even" option). triton's ROUND_DOWN (amax / 4, exponent bits kept) equals this except for
  amax < 2**-124 (checked as above): its quotient is subnormal, truncates to 0, and the whole
  block becomes zeros with byte 0.

Other quantizers, NOT followed: ModelOpt's `MXFP4QTensor.quantize` counts `|x| - bound > 0` over the
midpoints 0.25 .. 5 (every tie rounds DOWN, e.g. 0.75 -> 0.5, 1.75 -> 1.5; its ceil scale allows
byte 0; `torch.sign(0) = 0` gives +0.0 code 8). Its NVFP4 `_cast_fp4` and compressed-tensors'
`cast_to_fp4` (after a cast to bf16) do round ties to even (checked in NVIDIA/Model-Optimizer and
vllm-project/compressed-tensors sources), so "ties down" is ModelOpt's MXFP4 path specifically.

Round trips (tests/test_mxfp4_quantize.py): for x already on the MXFP4 grid (a dequantized
checkpoint; bf16/fp32 at any scale byte 0..252, fp16 where it holds the values),
dequantize(quantize(x)) == x bit for bit, signed zeros too, in both modes, with one exception in
"ceil": a block whose original byte is 0 and which holds a code of magnitude 0.5 or 1.5 (ceil picks
byte 1, where those become ties 0.25 -> 0 and 0.75 -> 1.0). Blocks and scales come back
byte-identical exactly where the original byte is the mode's own choice. ceil: byte >= 1 with max
code 4 or 6; byte 1 with any non-zero block (ceil's lowest byte for those); an all-zero block at
byte 0. floor: max code 4 or 6; byte 0. Elsewhere, for a max magnitude M <= 3, the byte moves down
by ceil(log2(M / 6)) (floor: floor(log2 M) - 2) and the codes are the same values rescaled; an
all-zero block gets byte 0. A block ceil-quantized from real weights has M = 3 when its
amax / scale fell in (3, 3.5): requantized, it comes back one byte lower.

NaN and +-inf have no MXFP4 encoding: refused with OpError naming the element (index in the given
tensor, flat row, block of 32 in the row and flat block number); the caller adds the key.

How it is fast (one thread; benchmarks/kernel_quantize.py), in 16-bit integers, by chunks of 16K blocks:
- Each element becomes a 16-bit bf16 pattern: bf16 as is; fp16 via fp32 (exact); fp32 ROUNDED TO
  ODD to bf16 (truncate, OR the sticky bit into the last place). Round-to-odd at 8 significant bits
  keeps enough to round once more, correctly, to E2M1's 2 bits (8 >= 2 + 2), and it never changes
  the exponent, so block maxima give the same scales as exact fp32 maxima.
- amax = max of (bits & 0x7FFF) per block (integer order is magnitude order; >= 0x7F80 is NaN or
  inf), reduced in int32 (torch reduces rows of 32 int16 several times slower).
- The block's scale byte and shift come from two 32K-entry tables indexed by those amax bits (per
  block torch ops cost more than the gather); the shift table also flags NaN/inf and tiny blocks.
- Dividing by 2**k is subtracting k << 7 from the bits: exact while the element is a normal bf16
  and the result stays normal; anything that falls below is < 2**-126, rounds to 0, and is clamped
  there (the sign bit is kept apart). It is wrong only for bf16 subnormal inputs in blocks whose
  scale byte is <= 2 (2**-125): those blocks (amax < 2**-122, rare) take a float path that
  multiplies in fp32 (exact there) and takes the scale from the exact fp32 amax.
- The clamped magnitude (0.25 .. 6, as bits - bits(0.25): 0 .. 576) plus the sign is an index into
  a 1154-entry code table; two neighbours' indices read as one int32 make an index into a 1.3 MB
  table of packed bytes: one gather writes the output bytes.
"""

import torch

from moeconv.errors import OpError

SCALE_MODES = ("ceil", "floor")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code & 7 -> magnitude

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOW = 0x3E80  # bf16 bits of 0.25: every smaller magnitude rounds to 0, as 0.25 itself (a tie, to even)
_TOP = 0x40C0  # bf16 bits of 6.0: every larger magnitude (only in "floor") saturates to code 7
_SPAN = _TOP - _LOW  # table index of a magnitude: its bits - _LOW, clamped to [0, _SPAN]
_SIGN_OFFSET = _SPAN + 1  # + this for a negative element
_ZERO_SHIFT = 0x7F80  # the shift of an all-zero block (byte 0): sends every finite magnitude to index <= 0
_SMALL_SCALE = 2  # blocks with scale byte <= this (and amax > 0) take the float path
_FLAG_SMALL = 0x7FFE  # shift-table marks, larger than every real shift (<= (126 << 7) + _LOW)
_FLAG_NON_FINITE = 0x7FFF
_CHUNK_BLOCKS = 16384  # blocks of 32 per chunk: 512K elements, ~5 MiB of scratch (measured best of 2K..32K)

_table: torch.Tensor | None = None
_pairs: torch.Tensor | None = None
_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _code_table() -> torch.Tensor:
    """U8 [2 * (_SPAN + 1)]: index = bf16 magnitude bits - bits(0.25) (0 .. bits(6.0) - bits(0.25)),
    + _SIGN_OFFSET if negative -> E2M1 code. Round to nearest, ties to even, by the 7 midpoints."""
    global _table
    if _table is None:
        magnitude = torch.arange(_LOW, _TOP + 1, dtype=torch.int16).view(torch.bfloat16).double()  # [_SPAN + 1]
        code = torch.zeros(_SPAN + 1, dtype=torch.uint8)
        # ties: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5 -> 4.0 (even codes)
        for bound, tie_up in ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)):
            code += (magnitude >= bound) if tie_up else (magnitude > bound)
        _table = torch.cat([code, code | 8])  # [2 * (_SPAN + 1)]
    return _table


def _block_tables(scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, from the bits of its amax (a bf16 magnitude pattern, 0 .. 0x7FFF): (scale byte U8
    [32768], shift int16 [32768]) where shift = ((byte - 127) << 7) + bits(0.25) for `_encode`,
    _ZERO_SHIFT for an all-zero block, _FLAG_SMALL where the block needs the float path (amax > 0,
    byte <= 2) and _FLAG_NON_FINITE for NaN/inf (>= 0x7F80). Both flags exceed every real shift."""
    if scale not in _tables:
        amax = torch.arange(0x8000, dtype=torch.int32)  # [32768] every magnitude pattern
        value = amax.to(torch.int16).view(torch.bfloat16).float()  # exact
        byte = _ceil_bytes(value) if scale == "ceil" else _floor_bytes(value)  # [32768] int32
        shift = ((byte - 127) << 7) + _LOW
        shift[amax == 0] = _ZERO_SHIFT
        shift[(amax > 0) & (byte <= _SMALL_SCALE)] = _FLAG_SMALL
        shift[amax >= 0x7F80] = _FLAG_NON_FINITE
        byte[amax >= 0x7F80] = 0
        _tables[scale] = (byte.to(torch.uint8), shift.to(torch.int16))
    return _tables[scale]


def _check(x: torch.Tensor, scale: str) -> None:
    if scale not in SCALE_MODES:
        raise OpError(f"quantize-mxfp4: scale must be one of {', '.join(SCALE_MODES)}, not {scale!r}")
    if x.dtype not in _DTYPES:
        raise OpError(f"quantize-mxfp4: input must be bf16, fp16 or fp32, not {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 32:
        raise OpError(f"quantize-mxfp4: the last dim must be a multiple of 32 (blocks of 32), got shape {list(x.shape)}")


def _outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    *lead, k = x.shape
    blocks = torch.empty(*lead, k // 32, 16, dtype=torch.uint8, device=x.device)  # [..., K/32, 16]
    scales = torch.empty(*lead, k // 32, dtype=torch.uint8, device=x.device)  # [..., K/32]
    return blocks, scales


def _raise_non_finite(x: torch.Tensor, flat: int) -> None:
    """OpError naming element `flat` (row-major over x) of x, which is NaN or +-inf."""
    k = x.shape[-1]
    index, rest = [], flat
    for size in reversed(x.shape):
        index.append(rest % size)
        rest //= size
    index.reverse()
    value = float(x.reshape(-1)[flat])
    kind = "NaN" if value != value else ("+inf" if value > 0 else "-inf")
    row, column = divmod(flat, k)
    raise OpError(
        f"quantize-mxfp4: {kind} at index {index} of shape {list(x.shape)} (row {row}, column {column}, "
        f"block {column // 32} of the row, flat block {flat // 32}): MXFP4 has no NaN or inf"
    )


# ---- the fast kernel -------------------------------------------------------------------------------


def _to_bits16(chunk: torch.Tensor, bits: torch.Tensor, wide: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """chunk [c, 32] (bf16/fp16/fp32) -> int16 bf16 patterns [c, 32]: bf16 viewed, others rounded to odd.
    bits [>= c*32] int16 output; wide [>= c*32] int32 and scratch [>= c*32] fp32 are scratch."""
    if chunk.dtype == torch.bfloat16:
        return chunk.view(torch.int16)  # [c, 32]
    n = chunk.numel()
    if chunk.dtype == torch.float16:
        source = scratch[:n].view(chunk.shape)  # [c, 32]
        source.copy_(chunk)  # exact
        source = source.view(torch.int32)
    else:
        source = chunk.view(torch.int32)  # [c, 32]
    low = wide[:n].view(chunk.shape)  # [c, 32]
    torch.bitwise_and(source, 0xFFFF, out=low)
    low.add_(0xFFFF)  # bit 16 set iff the 16 dropped bits were not all 0 (the sticky bit)
    low.bitwise_or_(source).bitwise_right_shift_(16)  # truncated to bf16, last bit ORed with sticky
    out = bits[:n].view(chunk.shape)  # [c, 32]
    out.copy_(low)  # int32 -> int16 keeps the low 16 bits (the sign comes along)
    return out


def _ceil_bytes(amax: torch.Tensor) -> torch.Tensor:
    """fp32 amax [c] -> int32 scale bytes [c], triton's ROUND_UP on fp32 amax / 6."""
    d = (amax / 6.0).view(torch.int32)  # [c] fp32 quotient, rounded as triton does
    return ((d + 0x7FFFFF) & 0x7F800000) >> 23  # [c]


def _floor_bytes(amax: torch.Tensor) -> torch.Tensor:
    """fp32 amax [c] -> int32 scale bytes [c]: biased floor(log2 amax) - 2, at least 0."""
    return ((amax.view(torch.int32) >> 23) - 2).clamp_(min=0)  # [c]; a subnormal amax has field 0


def _pair_table() -> torch.Tensor:
    """U8 [S * S], S = 2 * (_SPAN + 1): index odd * S + even (two indices of `_code_table`) -> the
    packed byte, even element's code in the low nibble (1.3 MB, built once)."""
    global _pairs
    if _pairs is None:
        if torch.tensor([1], dtype=torch.int16).view(torch.uint8)[0] != 1:
            raise OpError("quantize-mxfp4: the kernel reads int16 pairs as int32 and needs a little-endian CPU")
        code = _code_table()  # [S]
        _pairs = (code[None, :] | (code[:, None] << 4)).reshape(-1).contiguous()  # [odd, even] -> byte
    return _pairs


def _encode(
    bits: torch.Tensor, mag: torch.Tensor, shift: torch.Tensor, sign: torch.Tensor, pair: torch.Tensor, out: torch.Tensor
) -> None:
    """bits [c, 32] int16 bf16 patterns, mag [c, 32] int16 = bits & 0x7FFF (overwritten), shift [c, 1]
    int16 = (k << 7) + bits(0.25) for the scale 2**k -> out [c*16] U8 packed codes.
    sign [c, 32] int16 and pair [c*16] int32 are scratch."""
    mag.sub_(shift).clamp_(0, _SPAN)  # [c, 32] bits of |x| / 2**k - bits(0.25) (exact while it matters)
    torch.bitwise_right_shift(bits, 15, out=sign)  # [c, 32] -1 for a negative element, else 0
    mag.add_(sign, alpha=-_SIGN_OFFSET)  # [c, 32] index into _code_table
    both = mag.view(torch.int32).view(-1)  # [c*16] odd << 16 | even (little-endian), both < 2**15
    torch.bitwise_right_shift(both, 16, out=pair)  # [c*16] odd
    torch.add(both, pair, alpha=len(_code_table()) - 65536, out=pair)  # [c*16] odd * S + even
    torch.index_select(_pair_table(), 0, pair, out=out)  # [c*16] bytes


def _small_blocks(rows: torch.Tensor, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The float path for blocks whose scale byte is <= 2: rows [m, 32] (input dtype) -> (bytes
    [m, 16] U8, scales [m] int32), the scale taken from the exact fp32 amax."""
    exact = rows.float()  # [m, 32]
    amax = exact.abs().amax(1)  # [m]
    byte = _ceil_bytes(amax) if scale == "ceil" else _floor_bytes(amax)  # [m]
    # 1 / 2**(byte - 127), a power of two <= 2**127. Where ceil's quotient amax / 6 rounded to 0
    # (byte 0), triton multiplies by 0: 2**127 gives the same codes (|x| <= 3 * 2**-149, signs kept).
    inverse = ((254 - byte) << 23).view(torch.float32)  # [m]
    q = exact * inverse[:, None]  # [m, 32], exact: x is tiny (no overflow) and is scaled up
    m = rows.shape[0]
    q_bits = _to_bits16(q, torch.empty(m * 32, dtype=torch.int16), torch.empty(m * 32, dtype=torch.int32), q)
    out = torch.empty(m * 16, dtype=torch.uint8)
    shift = torch.full((m, 1), _LOW, dtype=torch.int16)  # q is already scaled: k = 0
    _encode(q_bits, q_bits & 0x7FFF, shift, torch.empty_like(q_bits), torch.empty(m * 16, dtype=torch.int32), out)
    return out.view(m, 16), byte


def quantize(x: torch.Tensor, *, scale: str = "ceil") -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] bf16/fp16/fp32 (K a multiple of 32) -> (blocks U8 [..., K/32, 16], scales U8 [..., K/32]).

    `scale`: "ceil" (triton_kernels ROUND_UP, as transformers quantizes; the default) or "floor"
    (OCP MX v1.0). Bit-exact with `quantize_reference`; NaN/inf raise OpError.
    """
    _check(x, scale)
    blocks, scales = _outputs(x)
    if x.is_meta or x.numel() == 0:
        return blocks, scales
    if x.device.type != "cpu":
        raise OpError(f"quantize-mxfp4: runs on the CPU; got a tensor on {x.device}")
    x = x.contiguous()
    source = x.view(-1, 32)  # [N, 32]
    total = source.shape[0]
    out_blocks = blocks.view(-1, 16)  # [N, 16]
    out_scales = scales.view(-1)  # [N]
    chunk = min(_CHUNK_BLOCKS, total)
    bits = torch.empty(chunk * 32, dtype=torch.int16)  # fp16/fp32: the rounded-to-odd patterns
    wide = torch.empty(chunk * 32 if x.dtype != torch.bfloat16 else 0, dtype=torch.int32)
    widef = torch.empty(chunk * 32 if x.dtype == torch.float16 else 0, dtype=torch.float32)
    mag = torch.empty(chunk, 32, dtype=torch.int16)
    sign = torch.empty(chunk, 32, dtype=torch.int16)
    mag32 = torch.empty(chunk, 32, dtype=torch.int32)
    pair = torch.empty(chunk * 16, dtype=torch.int32)
    byte_of, shift_of = _block_tables(scale)
    for g0 in range(0, total, chunk):
        g1 = min(g0 + chunk, total)
        c = g1 - g0
        rows = source[g0:g1]  # [c, 32]
        b16 = _to_bits16(rows, bits, wide, widef)  # [c, 32]
        m = mag[:c]
        torch.bitwise_and(b16, 0x7FFF, out=m)  # [c, 32] magnitude bits: integer order = magnitude order
        m32 = mag32[:c]
        m32.copy_(m)  # torch reduces int32 rows several times faster than int16 rows
        amax = m32.amax(1)  # [c] bits of each block's largest magnitude; >= 0x7F80: NaN or inf
        shift = torch.index_select(shift_of, 0, amax)  # [c] int16, or a flag (see _block_tables)
        top = int(shift.max())
        if top == _FLAG_NON_FINITE:
            bad = int((m.view(-1) >= 0x7F80).nonzero()[0, 0])
            _raise_non_finite(x, g0 * 32 + bad)
        torch.index_select(byte_of, 0, amax, out=out_scales[g0:g1])
        _encode(b16, m, shift[:, None], sign[:c], pair[: c * 16], out_blocks[g0:g1].view(-1))
        if top == _FLAG_SMALL:  # blocks of tiny values (scale byte <= 2): the float path
            which = (shift == _FLAG_SMALL).nonzero()[:, 0]  # [s]
            fixed, fixed_scales = _small_blocks(rows[which], scale)
            out_blocks[g0 + which] = fixed
            out_scales[g0 + which] = fixed_scales.to(torch.uint8)
    return blocks, scales


# ---- the reference -----------------------------------------------------------------------------------


def _reference_rows(rows: torch.Tensor, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [n, 32] -> (codes [n, 32] int64, scale bytes [n] int64), in fp64 from the definitions."""
    exact = rows.double()  # [n, 32], exact
    amax = exact.abs().amax(1)  # [n]
    if scale == "ceil":
        d = (amax.float() / 6.0).double()  # [n] the fp32 quotient (triton divides in fp32)
        mantissa, exponent = torch.frexp(d)  # d = mantissa * 2**exponent, mantissa in [0.5, 1)
        e = torch.where(mantissa == 0.5, exponent - 1, exponent)  # ceil(log2 d)
        e = e.clamp(min=-126)  # a subnormal fp32 quotient rounds up to 2**-126
        zero = d == 0  # byte 0, multiplier 0
        e = torch.where(zero, -127, e)
    else:
        mantissa, exponent = torch.frexp(amax)  # floor(log2 amax) = exponent - 1
        e = torch.where(amax == 0, -127, (exponent - 1 - 2).clamp(min=-127))
        zero = torch.zeros_like(amax, dtype=torch.bool)
    q = torch.where(zero[:, None], 0.0, torch.ldexp(exact, -e[:, None]))  # [n, 32] x / 2**e, exact in fp64
    grid = torch.tensor(FP4_VALUES, dtype=torch.float64)  # [8]
    distance = (q.abs()[..., None] - grid).abs()  # [n, 32, 8] exact
    nearest = distance == distance.amin(-1, keepdim=True)  # [n, 32, 8] one or two (a tie) codes
    even = nearest & (torch.arange(8) % 2 == 0)
    pick = torch.where(even.any(-1), even.int().argmax(-1), nearest.int().argmax(-1))  # [n, 32] ties to the even code
    codes = pick | (torch.signbit(exact).long() << 3)  # the sign bit of x, also for -0.0 and values rounding to 0
    return codes, (e + 127).long()


def quantize_reference(x: torch.Tensor, *, scale: str = "ceil") -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `quantize`, from the definitions, slowly: exact fp64 values, the scale from
    frexp of amax (ceil: of the fp32 quotient amax / 6, as triton), every element to the nearest of
    the 8 magnitudes by distance, a tie to the even code."""
    _check(x, scale)
    blocks, scales = _outputs(x)
    if x.numel() == 0:
        return blocks, scales
    rows = x.contiguous().view(-1, 32)  # [N, 32]
    bad = ~torch.isfinite(rows.reshape(-1))
    if bool(bad.any()):
        _raise_non_finite(x, int(bad.nonzero()[0, 0]))
    out_blocks, out_scales = blocks.view(-1, 16), scales.view(-1)  # [N, 16], [N]
    for g0 in range(0, rows.shape[0], 4096):
        codes, byte = _reference_rows(rows[g0 : g0 + 4096], scale)  # [n, 32], [n]
        out_blocks[g0 : g0 + 4096] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
        out_scales[g0 : g0 + 4096] = byte.to(torch.uint8)
    return blocks, scales
