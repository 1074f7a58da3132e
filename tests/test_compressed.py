"""compressed-tensors: every op against the compressed-tensors package's own compressors and
decompression (the reference), value tables over every code, a whole conversion with the preset
(config.json and the load report), refusals, and row-block streaming.

Checkpoints are made here with the package: its `calculate_qparams` picks scales and zero points,
its `<Compressor>.compress` writes the tensors, `ModelCompressor.update_config` writes config.json.
"""

import json
from pathlib import Path

import pytest
import torch

compressed_tensors = pytest.importorskip("compressed_tensors")
from checkpoints import build_per_expert, read_checkpoint  # noqa: E402
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam  # noqa: E402
from output_lines import error_line  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_cli import run  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3MoeConfig  # noqa: E402

import moeconv  # noqa: E402
from moeconv import ops  # noqa: E402
from moeconv.dtypes import to_safetensors  # noqa: E402
from moeconv.errors import FormatError, MoeconvError, OpError  # noqa: E402
from moeconv.formats import check_source  # noqa: E402
from moeconv.formats.compressed import check_config  # noqa: E402

PRESET = "compressed-tensors-bf16"
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def int_scheme(bits: int, group: int | None, symmetric: bool = True) -> QuantizationScheme:
    strategy = "group" if group else "channel"
    args = QuantizationArgs(num_bits=bits, type="int", strategy=strategy, group_size=group, symmetric=symmetric)
    return QuantizationScheme(targets=["Linear"], weights=args)


SCHEMES = {
    "int4-group": lambda: int_scheme(4, 32),
    "int4-group-asym": lambda: int_scheme(4, 32, symmetric=False),
    "int4-channel": lambda: int_scheme(4, None),
    "int4-channel-asym": lambda: int_scheme(4, None, symmetric=False),
    "int8-channel": lambda: int_scheme(8, None),
    "int8-group-asym": lambda: int_scheme(8, 32, symmetric=False),
    "nvfp4": lambda: preset_name_to_scheme("NVFP4", ["Linear"]),  # with input_global_scale, which the preset drops
    "fp8-channel": lambda: preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]),
    "fp8-tensor": lambda: preset_name_to_scheme("FP8", ["Linear"]),  # with a static input_scale
}
FORMAT_OF = {"nvfp4": "nvfp4-pack-quantized", "fp8-channel": "float-quantized", "fp8-tensor": "float-quantized"}


def compressor(name: str):
    if name.startswith("nvfp4"):
        return NVFP4PackedCompressor
    return FloatQuantizationCompressor if name.startswith("fp8") else PackedQuantizationCompressor


def compress(name: str, weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The package's compressed tensors of one Linear weight [out, in]: scales from its min/max helper."""
    scheme = SCHEMES[name]()
    args = scheme.weights
    rows, cols = weight.shape
    group = args.group_size if args.strategy in ("group", "tensor_group") else (1 if args.strategy == "tensor" else None)
    if group == 1:  # tensor: one scale
        grouped = weight.float().reshape(1, 1, -1)
    else:
        grouped = weight.float().reshape(rows, cols // group if group else 1, -1)  # [out, G, in/G]
    state = {"weight": weight}
    global_scale = None
    if name.startswith("nvfp4"):
        global_scale = generate_gparam(weight.float().amin(), weight.float().amax()).reshape(1)
        state["weight_global_scale"] = global_scale
        state["input_global_scale"] = torch.ones(1)
    if name == "fp8-tensor":
        state["input_scale"] = torch.ones(1, dtype=weight.dtype)
    scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args, global_scale=global_scale)
    state["weight_scale"] = scale.reshape(-1) if group == 1 else scale
    if not name.startswith("nvfp4"):
        state["weight_scale"] = state["weight_scale"].to(scale_dtype or weight.dtype)
    if not args.symmetric:
        state["weight_zero_point"] = zero_point
    return compressor(name).compress(state, scheme)


def reference(name: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The package's own decompression of these tensors."""
    return compressor(name).decompress(dict(state), SCHEMES[name]())["weight"]


def moeconv_op(name: str, state: dict[str, torch.Tensor], dtype: str = "bf16") -> torch.Tensor:
    """moeconv's op on the same tensors, through the op's shape rule as a plan would run it; the
    rule's (dtype, shape) is the output's."""
    params = {"dtype": dtype}
    if name.startswith("nvfp4"):
        op, tensors = (
            "dequantize-nvfp4-pack-quantized",
            [state["weight_packed"], state["weight_scale"], state["weight_global_scale"]],
        )
    elif name.startswith("fp8"):
        op, tensors = "dequantize-float-quantized", [state["weight"], state["weight_scale"]]
    else:
        names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
        op, tensors = "dequantize-pack-quantized", [state[n] for n in names if n in state]
        params["num_bits"] = SCHEMES[name]().weights.num_bits
    (out,) = ops.apply(op, tensors, params)
    specs = [(to_safetensors(t.dtype), tuple(t.shape)) for t in tensors]
    assert ops.infer(op, specs, params) == [(to_safetensors(out.dtype), tuple(out.shape))] and out.is_contiguous()
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.dtype.itemsize]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


# ---- each scheme against the package --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_scheme_is_bit_exact_with_the_package(name, scale_dtype):
    """37 rows (zero points pad their last packed row), 96 columns; every output dtype is the
    package's result cast to it."""
    generator = torch.Generator().manual_seed(len(name))
    weight = (torch.randn(37, 96, generator=generator) * torch.rand(37, 1, generator=generator)).to(torch.bfloat16)
    state = compress(name, weight, scale_dtype)
    want = reference(name, state)
    for dtype, torch_dtype in OUT_DTYPES.items():
        got = moeconv_op(name, state, dtype)
        assert same_bits(got, want.to(torch_dtype)), (name, scale_dtype, dtype)


def test_the_package_writes_the_tensors_the_preset_reads():
    """What each scheme stores (the preset's rules are keyed by these names)."""
    weight = torch.randn(16, 64).to(torch.bfloat16)
    assert set(compress("int4-group", weight)) == {"weight_packed", "weight_scale", "weight_shape"}
    assert set(compress("int4-group-asym", weight)) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    assert set(compress("nvfp4", weight)) == {"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"}
    assert set(compress("fp8-tensor", weight)) == {"weight", "weight_scale", "input_scale"}
    zero_point = compress("int4-channel-asym", torch.randn(37, 64).to(torch.bfloat16))["weight_zero_point"]
    assert zero_point.dtype == torch.int32 and zero_point.shape == (5, 1)  # 37 rows packed 8 per word, along rows


# ---- value tables: every code ---------------------------------------------------------------------

# bf16 scales: ordinary, a power of two, the smallest normal, a subnormal, zero, negative, huge
SCALES = torch.tensor([0.0123, 1.0, 2.0**-126, 2.0**-130, 0.0, -0.75, 3.0e37], dtype=torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_int_code_with_every_zero_point(bits, symmetric):
    """Each row holds every code twice over 2**bits groups of one column block; each group has its
    own zero point (all of them) and the rows run through SCALES in bf16 and fp32."""
    levels = 1 << bits
    codes = torch.arange(levels, dtype=torch.int32) - levels // 2  # every q
    cols = levels * 32  # 2**bits groups of 32
    q = codes.repeat(cols // levels)  # [cols]
    for scale_dtype in (torch.bfloat16, torch.float16, torch.float32):
        rows = 2 * len(SCALES)  # 14: zero points of <= 8 rows in several groups crash the package's INT4 unpack (0.20.1)
        scale = SCALES.repeat(2).to(scale_dtype)[:, None].expand(rows, levels).contiguous()  # [rows, G]
        quantized = q[None, :].expand(rows, cols).to(torch.int8).contiguous()
        state = {
            "weight_packed": _pack(quantized, bits),
            "weight_scale": scale,
            "weight_shape": torch.tensor([rows, cols]),
        }
        scheme = int_scheme(bits, 32, symmetric)
        if not symmetric:
            zero = codes[None, :].expand(rows, levels).to(torch.int8).contiguous()  # zp = every code, one per group
            state["weight_zero_point"] = _pack(zero, bits, packed_dim=0)
        want = PackedQuantizationCompressor.decompress(dict(state), scheme)["weight"]
        names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
        for dtype, torch_dtype in OUT_DTYPES.items():
            inputs, expected = [state[n] for n in names if n in state], want.to(torch_dtype)
            if dtype == "fp16":  # the first 6 rows: 3e37 overflows fp16 (refused, tested below)
                inputs = [
                    inputs[0][:6],
                    inputs[1][:6],
                    *(zp[: -(-6 * bits // 32)] for zp in inputs[2:-1]),
                    torch.tensor([6, cols]),
                ]
                expected = expected[:6]
            got = ops.apply("dequantize-pack-quantized", inputs, {"num_bits": bits, "dtype": dtype})[0]
            assert same_bits(got, expected), (bits, symmetric, scale_dtype, dtype)


def _pack(values: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(values, bits, packed_dim=packed_dim)


def test_every_fp4_code_with_every_e4m3_scale():
    """Every byte (two FP4 codes) under every E4M3 scale byte (zero, subnormals, 448, NaN 0x7F/0xFF)
    and global scales of several sizes."""
    packed = torch.arange(256, dtype=torch.uint8).repeat(256, 1)  # [256 rows, 256 bytes] -> 512 columns
    scale = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)[:, None].expand(256, 32).contiguous()
    scheme = SCHEMES["nvfp4"]()
    for global_scale in (1.0, 448.0 * 6.0 / 3.7, 3.0e-3, 1.0e30, 7.0):
        state = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": torch.tensor([global_scale])}
        want = NVFP4PackedCompressor.decompress(dict(state), scheme)["weight"]
        assert torch.isnan(want).any() and (want == 0).any()
        for dtype in ("bf16", "fp32"):
            got = moeconv_op("nvfp4", state, dtype)
            assert same_bits(got, want.to(OUT_DTYPES[dtype])), (global_scale, dtype)


def test_every_e4m3_byte_with_scales_incl_nan():
    """Every E4M3 byte (0x7F and 0xFF are NaN: NaN out, with the package's bits) per channel and per tensor."""
    weight = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).repeat(len(SCALES), 1)  # [7, 256]
    for scale_dtype in (torch.bfloat16, torch.float16, torch.float32):
        for name, scale in (("fp8-channel", SCALES[:, None]), ("fp8-tensor", SCALES[:1])):
            state = {"weight": weight, "weight_scale": scale.to(scale_dtype)}
            want = reference(name, state)
            assert torch.isnan(want[:, 0x7F]).all() and torch.isnan(want[:, 0xFF]).all()
            for dtype in ("bf16", "fp32"):
                assert same_bits(moeconv_op(name, state, dtype), want.to(OUT_DTYPES[dtype])), (name, scale_dtype, dtype)


# ---- refusals in the ops --------------------------------------------------------------------------


def test_fp16_overflow_is_refused_not_made_inf():
    state = compress("int4-group", torch.ones(4, 64, dtype=torch.bfloat16), torch.float32)
    state["weight_scale"][2] = 1.0e5  # row 2's values exceed 65504
    assert torch.isinf(reference("int4-group", state).to(torch.float16)).any()
    with pytest.raises(
        OpError, match=r"dequantize-pack-quantized: values overflow fp16 \(\|value\| > 65504\); use dtype bf16 or fp32"
    ):
        moeconv_op("int4-group", state, "fp16")
    assert same_bits(moeconv_op("int4-group", state, "fp32"), reference("int4-group", state).to(torch.float32))


def test_a_channel_weight_whose_columns_the_packed_width_does_not_give_is_refused():
    """in = 30 packs into 4 words of 8: the shape rule plans 32 columns, the kernel reads weight_shape."""
    state = compress("int4-channel", torch.randn(8, 30).to(torch.bfloat16))
    assert ops.infer("dequantize-pack-quantized", [("I32", (8, 4)), ("BF16", (8, 1)), ("I64", (2,))], {"num_bits": 4}) == [
        ("BF16", (8, 32))
    ]
    with pytest.raises(OpError, match=r"weight_shape says 30 columns but the packed width holds 32"):
        moeconv_op("int4-channel", state)


@pytest.mark.parametrize(
    ("op", "specs", "params", "message"),
    [
        (
            "dequantize-pack-quantized",
            [("I8", (8, 4)), ("BF16", (8, 1)), ("I64", (2,))],
            {"num_bits": 4},
            "weight_packed must be I32",
        ),
        (
            "dequantize-pack-quantized",
            [("I32", (8, 4)), ("BF16", (8, 3)), ("I64", (2,))],
            {"num_bits": 4},
            "3 groups do not divide the 32",
        ),
        (
            "dequantize-pack-quantized",
            [("I32", (8, 4)), ("BF16", (8, 1)), ("I64", (2,))],
            {"num_bits": 3},
            "num_bits 3 is not supported",
        ),
        (
            "dequantize-pack-quantized",
            [("I32", (9, 4)), ("BF16", (9, 1)), ("I32", (1, 1)), ("I64", (2,))],
            {"num_bits": 4},
            r"weight_zero_point must be I32 \[2, 1\] \(packed along rows\)",
        ),
        (
            "dequantize-pack-quantized",
            [("I32", (8, 4)), ("BF16", (8, 1)), ("I64", (3,))],
            {"num_bits": 4},
            "weight_shape must be I64 \\[2\\]",
        ),
        (
            "dequantize-nvfp4-pack-quantized",
            [("U8", (8, 8)), ("F8_E4M3", (8, 2)), ("F32", (1,))],
            {},
            "weight_scale must be F8_E4M3 \\[8, 1\\]",
        ),
        ("dequantize-nvfp4-pack-quantized", [("U8", (8, 8)), ("F16", (8, 1)), ("F32", (1,))], {}, "weight_scale must be F8_E4M3"),
        (
            "dequantize-nvfp4-pack-quantized",
            [("U8", (8, 8)), ("F8_E4M3", (8, 1)), ("BF16", (1,))],
            {},
            "weight_global_scale must be F32",
        ),
        ("dequantize-nvfp4-pack-quantized", [("U8", (8, 12)), ("F8_E4M3", (8, 1)), ("F32", (1,))], {}, "in a multiple of 16"),
        ("dequantize-float-quantized", [("F8_E5M2", (8, 8)), ("BF16", (8, 1))], {}, "weight must be F8_E4M3"),
        (
            "dequantize-float-quantized",
            [("F8_E4M3", (8, 8)), ("BF16", (1, 8))],
            {},
            r"weight_scale must be .* \[8, 1\] \(channel\) or \[1\]",
        ),
    ],
)
def test_shape_rules_refuse_in_one_line(op, specs, params, message):
    with pytest.raises(OpError, match=message) as refused:
        ops.infer(op, specs, params)
    assert "\n" not in str(refused.value)


# ---- the format's config check --------------------------------------------------------------------


def ct_config(*schemes: QuantizationScheme, fmt: str | None = None, **fields) -> dict:
    """quantization_config as the package writes it into config.json (ModelCompressor.update_config)."""
    groups = {f"group_{i}": scheme for i, scheme in enumerate(schemes)}
    config = QuantizationConfig(config_groups=groups, format=fmt, quantization_status="compressed", **fields)
    return {"quant_method": "compressed-tensors", **config.model_dump(exclude=["quant_method"]), **fields}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_passes_the_config_check(name):
    check_config(ct_config(SCHEMES[name](), fmt=FORMAT_OF.get(name, "pack-quantized")))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            lambda: ct_config(preset_name_to_scheme("W4A16", ["Linear"]), fmt="marlin-24"),
            "compressed-tensors format 'marlin-24' is not supported (moeconv reads pack-quantized, nvfp4-pack-quantized, float-quantized)",
        ),
        (
            lambda: ct_config(int_scheme(2, 32), fmt="pack-quantized"),
            "compressed-tensors pack-quantized weights of type 'int' with num_bits 2 (moeconv reads int 4 and int 8) in config group 'group_0' is not supported",
        ),
        (
            lambda: ct_config(preset_name_to_scheme("FP8_BLOCK", ["Linear"]), fmt="float-quantized"),
            "compressed-tensors float-quantized strategy 'block' (moeconv reads channel, tensor) in config group 'group_0' is not supported",
        ),
        (
            lambda: ct_config(preset_name_to_scheme("MXFP4A16", ["Linear"]), fmt="mxfp4-pack-quantized"),
            "compressed-tensors format 'mxfp4-pack-quantized' is not supported",
        ),
        (
            lambda: ct_config(int_scheme(4, 32), int_scheme(4, 128), fmt="pack-quantized"),
            "compressed-tensors config groups 'group_0' and 'group_1' quantize pack-quantized weights differently; moeconv reads one scheme per format",
        ),
        (
            lambda: {**ct_config(int_scheme(4, 32), fmt="pack-quantized"), "transform_config": {"config_groups": {"u": {}}}},
            "compressed-tensors transform_config is not supported (it changes what the stored weights mean)",
        ),
        (
            lambda: {**ct_config(int_scheme(4, 32), fmt="pack-quantized"), "quantization_status": "frozen"},
            "compressed-tensors quantization_status 'frozen' is not supported",
        ),
    ],
)
def test_unsupported_configs_are_named_in_one_line(config, message):
    with pytest.raises(FormatError) as refused:
        check_config(config())
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_activation_quantization_is_accepted_it_only_steers_the_runtime():
    """W8A8 int (dynamic token activations) on pack-quantized weights, FP8 static input scales,
    NVFP4 input global scales, a kv-cache scheme: none changes what the stored weights mean."""
    check_config(ct_config(preset_name_to_scheme("W4AFP8", ["Linear"]), fmt="pack-quantized"))
    check_config(ct_config(preset_name_to_scheme("NVFP4", ["Linear"]), fmt="nvfp4-pack-quantized"))
    kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor")
    check_config(ct_config(preset_name_to_scheme("FP8", ["Linear"]), fmt="float-quantized", kv_cache_scheme=kv.model_dump()))
    with pytest.raises(FormatError, match="config.json has quant_method 'fp8', not a compressed-tensors checkpoint"):
        check_source("compressed-tensors", {"quantization_config": {"quant_method": "fp8"}})


# ---- whole conversions ----------------------------------------------------------------------------

IGNORE = ["lm_head", "re:.*mlp.gate$"]


def tiny_qwen3_moe(out: Path) -> Path:
    """A random bf16 Qwen3-MoE saved by transformers (per-expert keys); every Linear dim a multiple of 32."""
    config = Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    return out


def compressed_checkpoint(
    out: Path, name: str, *, scheme: QuantizationScheme | None = None, experts_only: bool = False
) -> dict[str, torch.Tensor]:
    """A tiny per-expert Qwen3-MoE (transformers' own save) whose Linear weights except IGNORE are
    replaced by the package's compressed tensors, and config.json written by the package. Returns
    what the package decompresses each compressed Linear weight to (key -> bf16). `experts_only`:
    attention stays bf16 and is listed in `ignore`, as Kimi-K2-Thinking ships."""
    tiny_qwen3_moe(out)
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    decompressed = {}
    for key in sorted(tensors):
        linear = key.endswith("_proj.weight")  # attention q/k/v/o, experts gate/up/down; not the router, lm_head, norms
        if not linear or experts_only and ".experts." not in key:
            continue
        state = compress(name, tensors.pop(key))
        prefix = key.removesuffix(".weight")
        tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in state.items()})
        decompressed[key] = reference(name, state)
    save_file(tensors, shard, metadata={"format": "pt"})
    fmt = FORMAT_OF.get(name, "pack-quantized")
    ignore = IGNORE + (["re:.*self_attn.*"] if experts_only else [])
    config = QuantizationConfig(config_groups={"group_0": scheme or SCHEMES[name]()}, format=fmt, ignore=ignore)
    config.quantization_status = QuantizationStatus.COMPRESSED
    ModelCompressor(quantization_config=config).update_config(str(out))
    return decompressed


@pytest.mark.parametrize("name", ["int4-group-asym", "int8-channel", "nvfp4", "fp8-tensor"])
def test_a_compressed_qwen3_moe_converts_bit_exact_with_a_clean_load_report(tmp_path, name):
    src = tmp_path / "src"
    want = compressed_checkpoint(src, name)
    source = read_checkpoint(src)
    assert json.loads((src / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"

    plan = moeconv.plan_for(src, presets=[PRESET])
    assert plan.report.checked and plan.report.ok(), plan.report.to_json()
    assert not plan.report.missing and not plan.report.unexpected
    moeconv.convert(plan, tmp_path / "out")

    written = read_checkpoint(tmp_path / "out")
    for key, value in want.items():
        assert same_bits(written[key], value), key
    kept = {k for k in source if not any(k.startswith(q.removesuffix("weight")) for q in want)}
    assert kept and all(same_bits(written[k], source[k]) for k in kept)  # ignored router/lm_head, norms, embeddings
    assert set(written) == set(want) | kept
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


def test_chained_with_fuse_experts_the_experts_load_fused(tmp_path):
    """`--preset compressed-tensors-bf16 --preset fuse-experts`: transformers v5's fused expert layout."""
    src = tmp_path / "src"
    want = compressed_checkpoint(src, "int4-group")
    plan = moeconv.plan_for(src, presets=[PRESET, "fuse-experts"])
    assert plan.report.ok(), plan.report.to_json()
    moeconv.convert(plan, tmp_path / "out")
    written = read_checkpoint(tmp_path / "out")
    expert = "model.layers.1.mlp.experts.{}.{}_proj.weight"
    gate_up = torch.stack([torch.cat([want[expert.format(e, "gate")], want[expert.format(e, "up")]]) for e in range(4)])
    assert same_bits(written["model.layers.1.mlp.experts.gate_up_proj"], gate_up)  # [E, 2I, H]


def test_the_dry_run_json_report_has_nothing_missing_or_unexpected(tmp_path):
    src = tmp_path / "src"
    compressed_checkpoint(src, "int4-group")
    result = run("convert", src, tmp_path / "out", "--preset", PRESET, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checked"] and report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        (int_scheme(2, 32), "num_bits 2 (moeconv reads int 4 and int 8) in config group 'group_0' is not supported"),
        (
            QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", strategy="tensor")),
            "pack-quantized strategy 'tensor' (moeconv reads group, channel) in config group 'group_0' is not supported",
        ),
    ],
)
def test_an_unsupported_scheme_exits_1_in_one_line_and_writes_nothing(tmp_path, scheme, message):
    src = tmp_path / "src"
    compressed_checkpoint(src, "int4-group", scheme=scheme)  # the config says what the tensors are not: refused first
    result = run("convert", src, tmp_path / "out", "--preset", PRESET)
    assert result.exit_code == 1
    line = error_line(result.stderr)
    assert "compressed-tensors-bf16" in line and message in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_checkpoint_without_the_format_is_refused(tmp_path):
    src = build_per_expert("qwen3_moe", tmp_path / "src")
    with pytest.raises(MoeconvError, match="config.json has no quantization_config, not a compressed-tensors checkpoint"):
        moeconv.plan_for(src, presets=[PRESET])


# ---- streaming --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int4-group-asym", "int8-group-asym", "nvfp4", "fp8-channel", "fp8-tensor"])
def test_row_blocks_give_the_bytes_of_the_whole(tmp_path, monkeypatch, name):
    """One large weight (zero points pad their last word) written in 512-byte chunks and in one
    chunk: the same bytes, and the plan streams it (no op computes it whole)."""
    generator = torch.Generator().manual_seed(1)
    state = compress(name, (torch.randn(203, 128, generator=generator) * 0.1).to(torch.bfloat16))
    src = tmp_path / "src"
    src.mkdir()
    save_file({f"layer.{k}": v.contiguous() for k, v in state.items()}, src / "model.safetensors")
    config = QuantizationConfig(config_groups={"group_0": SCHEMES[name]()}, format=FORMAT_OF.get(name, "pack-quantized"))
    config.quantization_status = QuantizationStatus.COMPRESSED
    ModelCompressor(quantization_config=config).update_config(str(src))

    plan = moeconv.plan_for(src, presets=[PRESET])
    node = plan.tensors["layer.weight"].node
    assert not node.materializes and node.row_multiple == {"int4": 8, "int8": 4}.get(name[:4], 1)  # zero points' rows per word
    outputs = {}
    for chunk in ("512", str(1 << 24)):
        monkeypatch.setenv("MOECONV_CHUNK_BYTES", chunk)
        moeconv.convert(moeconv.plan_for(src, presets=[PRESET]), tmp_path / chunk)
        outputs[chunk] = load_file(tmp_path / chunk / "model.safetensors")
    assert set(outputs["512"]) == {"layer.weight"}
    assert same_bits(outputs["512"]["layer.weight"], outputs[str(1 << 24)]["layer.weight"])
    assert same_bits(outputs["512"]["layer.weight"], reference(name, state))


@pytest.mark.parametrize("symmetric", [True, False])
def test_an_odd_group_size_is_read_exactly(symmetric):
    """Groups of 5 columns: a packed byte's two values may belong to two groups."""
    scheme = int_scheme(4, 5, symmetric)
    weight = torch.randn(16, 40, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    grouped = weight.float().reshape(16, 8, 5)
    scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme.weights)
    state = {"weight": weight, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero_point}
    state = PackedQuantizationCompressor.compress(state, scheme)
    want = PackedQuantizationCompressor.decompress(dict(state), scheme)["weight"]
    names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
    (got,) = ops.apply("dequantize-pack-quantized", [state[n] for n in names if n in state], {"num_bits": 4})
    assert same_bits(got, want)


def test_the_example_recipe_dequantizes_int4_experts_and_fuse_experts_follows(tmp_path):
    """examples/recipes/int4-experts-fused.toml, then preset fuse-experts, on an experts-only INT4 checkpoint."""
    src = tmp_path / "src"
    want = compressed_checkpoint(src, "int4-group", experts_only=True)
    source = read_checkpoint(src)
    recipe = Path(__file__).parent.parent / "examples" / "recipes" / "int4-experts-fused.toml"
    result = run("convert", src, tmp_path / "out", "--recipe", recipe, "--recipe", "preset:fuse-experts", "--strict")
    assert result.exit_code == 0, result.output
    assert "load report: clean" in result.output
    written = read_checkpoint(tmp_path / "out")
    expert = "model.layers.{}.mlp.experts.{}.{}_proj.weight"
    for layer in range(2):
        gate_up = torch.stack(
            [torch.cat([want[expert.format(layer, e, "gate")], want[expert.format(layer, e, "up")]]) for e in range(4)]
        )
        assert same_bits(written[f"model.layers.{layer}.mlp.experts.gate_up_proj"], gate_up)  # [E, 2I, H]
        down = torch.stack([want[expert.format(layer, e, "down")] for e in range(4)])
        assert same_bits(written[f"model.layers.{layer}.mlp.experts.down_proj"], down)  # [E, H, I]
        q_proj = f"model.layers.{layer}.self_attn.q_proj.weight"
        assert same_bits(written[q_proj], source[q_proj])  # ignored: bf16 as it was
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
