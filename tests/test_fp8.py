"""FP8 block checkpoints -> bf16/fp16/fp32 (`dequantize-fp8-block`, preset fp8-bf16), checked
against transformers' own FP8 dequantization (FineGrainedFP8Config(dequantize=True)) where it
applies, and against the format's formula on edge blocks, which transformers refuses."""

import json
import math
from pathlib import Path

import pytest
import torch
from checkpoints import loading_info, logits
from fp8_checkpoints import (
    SCALE_FORMATS,
    build_deepseek_v3_fp8,
    build_qwen3_moe_fp8,
    dequantize_formula,
    quantize_fp8_block,
    quantizes,
)
from output_lines import error_line
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.errors import OpError
from moeconv.formats import fp8

ALL_BYTES = torch.arange(256, dtype=torch.uint8)


def convert(*args):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def fp8_reference():
    """transformers' FP8 dequantizer, the one FineGrainedFP8Config(dequantize=True) runs."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---- the kernel -------------------------------------------------------------------------------------


SCALE_SETS = {
    # zero, the smallest subnormal, tiny, ordinary, large, and values that do not round trip through bf16
    torch.float32: torch.tensor([0.0, 2.0**-149, 2.0**-127, 1.17e-5, 1 / 448, 0.3, 1.0, 3.0e3, 2.0**100, -0.75]),
    torch.bfloat16: torch.tensor([0.0, 2.0**-133, 1e-3, 0.3, 1.0, 448.0, -2.5]).to(torch.bfloat16),
    torch.float16: torch.tensor([0.0, 2.0**-24, 6e-5, 0.3, 1.0, 65504.0, -2.5]).to(torch.float16),
    torch.uint8: ALL_BYTES.clone(),  # every UE8M0 exponent, 255 included
}


@pytest.fixture(params=["table", "formula"])
def kernel_path(request, monkeypatch):
    """Both ways the kernel computes: a 256-entry table per block, or the formula (small blocks)."""
    monkeypatch.setattr(fp8, "_TABLE_MIN_BLOCK", 0 if request.param == "table" else 1 << 62)
    return request.param


@pytest.mark.parametrize("scale_dtype", list(SCALE_SETS), ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_every_byte_under_every_scale_is_transformers_value(scale_dtype, dtype, kernel_path):
    """Exhaustive over the 256 E4M3 bytes (NaN 0x7F/0xFF, subnormals, -0) x a table of scales: one
    scale per row, blocks [1, 256], the shape transformers' dequantizer accepts."""
    scales = SCALE_SETS[scale_dtype]
    if dtype == torch.float16:  # fp16 overflow is refused (tested below); keep to scales that fit
        fits = scales.float().abs() * 448 <= 65504 if scale_dtype != torch.uint8 else scales <= 127 + 7
        scales = scales[fits]
    weight = ALL_BYTES.repeat(len(scales), 1).view(torch.float8_e4m3fn)  # [S, 256]
    grid = scales[:, None]  # [S, 1]
    ours = fp8.dequantize(weight, grid, (1, 256), dtype)
    assert same_bits(ours, fp8_reference()(weight, grid, output_dtype=dtype))


@pytest.mark.parametrize(
    "shape, block",
    [
        ((576, 448), (128, 128)),
        ((5, 7), (128, 128)),
        ((40, 33), (16, 8)),
        ((3, 40, 33), (16, 8)),
        ((130, 1), (128, 128)),
        ((0, 16), (8, 8)),
        ((70, 300), (2**40, 2**33)),  # blocks past int32 (a config may claim them): one grid cell
    ],
)
@pytest.mark.parametrize(
    "scale_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.float8_e8m0fnu], ids=str
)
def test_edge_blocks_cover_only_the_elements_that_exist(shape, block, scale_dtype, kernel_path):
    """Dims that blocks do not divide (DeepSeek-V3's kv_a_proj_with_mqa is [576, 7168] in a [5, 56]
    grid), one smaller than a block, 3-D stacks, no rows: the formula, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    if scale_dtype in (torch.uint8, torch.float8_e8m0fnu):
        scales = torch.randint(110, 135, grid, dtype=torch.uint8, generator=gen).view(scale_dtype)
        stored = scales.view(torch.uint8)
    else:
        scales = (torch.rand(grid, generator=gen) * 1e-2).to(scale_dtype)
        stored = scales
    for dtype in (torch.bfloat16, torch.float32):
        lead = math.prod(shape[:-2])
        pairs = zip(weight.view(lead, *shape[-2:]), stored.view(lead, *grid[-2:]))
        expected = torch.stack([dequantize_formula(w, s, block, dtype) for w, s in pairs])
        assert same_bits(fp8.dequantize(weight, scales, block, dtype), expected.view(shape))


def test_values_past_fp16_are_refused_not_made_inf(kernel_path):
    weight = torch.tensor([[0x7E, 0x01]], dtype=torch.uint8).view(torch.float8_e4m3fn)  # 448 and the smallest subnormal
    assert torch.isfinite(fp8.dequantize(weight, torch.tensor([[146.0]]), (1, 2), torch.float16)).all()  # 65408
    with pytest.raises(OpError, match=r"a value overflows fp16 \(\|value\| > 65504"):
        fp8.dequantize(weight, torch.tensor([[147.0]]), (1, 2), torch.float16)


def test_one_scale_per_element_takes_the_formula_path_with_the_same_values():
    """A [1, 1] block (as a hostile config may claim) is below the size where a 256-entry table per
    block pays: the formula path serves it, value for value."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randint(0, 126, (256, 512), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    scales = torch.rand(256, 512, generator=gen)
    assert fp8._TABLE_MIN_BLOCK > 1
    assert same_bits(
        fp8.dequantize(weight, scales, (1, 1), torch.bfloat16), dequantize_formula(weight, scales, (1, 1), torch.bfloat16)
    )


def test_the_row_map_reads_whole_scale_rows():
    """Rows a:b of the output need scale rows a//B0 .. ceil(b/B0): a row block streams alone."""
    rows = fp8._rows({"block": [128, 128]}, [("F8_E4M3", (576, 7168)), ("F32", (5, 56))], 0)
    assert rows.multiple == 128 and rows.inputs(256, 576) == [(256, 576), (2, 5)]
    assert fp8._rows({"block": [128, 128]}, [("F8_E4M3", (4, 576, 7168)), ("F32", (4, 5, 56))], 0).inputs is None


# ---- whole conversions ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepseek_aligned(tmp_path_factory):
    """Every dim a multiple of the [8, 8] block: transformers can load the FP8 source itself."""
    return build_deepseek_v3_fp8(tmp_path_factory.mktemp("ds") / "fp8", block=(8, 8), aligned=True)


def fp8_source_logits(src, dtype):
    from transformers import FineGrainedFP8Config

    return logits(src, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=dtype)


@pytest.mark.parametrize("out_dtype, torch_dtype", [(None, torch.bfloat16), ("fp32", torch.float32)])
def test_deepseek_v3_output_gives_transformers_fp8_logits_bit_for_bit(deepseek_aligned, tmp_path, out_dtype, torch_dtype):
    """bf16 by default (what the releases were trained in), fp32 with --dtype fp32."""
    dtype_option = ["--dtype", out_dtype] if out_dtype else []
    result = convert(deepseek_aligned, tmp_path / "out", "--preset", "fp8-bf16", *dtype_option, "--strict")
    assert result.exit_code == 0, result.output
    assert "load report: clean" in result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == {None: "bfloat16", "fp32": "float32"}[out_dtype]
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(key.endswith("_scale_inv") for key in written)
    router = load_file(deepseek_aligned / "model.safetensors")["model.layers.1.mlp.gate.weight"]
    assert same_bits(written["model.layers.1.mlp.gate.weight"], router.to(torch_dtype))  # unquantized: only --dtype touches it
    assert not any(info for info in loading_info(tmp_path / "out", dtype=torch_dtype).values())
    assert torch.equal(logits(tmp_path / "out", dtype=torch_dtype), fp8_source_logits(deepseek_aligned, torch_dtype))


def test_fp8_then_fuse_experts_in_one_pass_gives_transformers_fp8_logits(deepseek_aligned, tmp_path):
    """Per-expert FP8 DeepSeek-V3 -> transformers-v5 fused bf16 experts, two presets chained."""
    result = convert(deepseek_aligned, tmp_path / "out", "--preset", "fp8-bf16", "--preset", "fuse-experts", "--strict")
    assert result.exit_code == 0, result.output
    assert "load report: clean" in result.output
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert written["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 48, 48)  # [E, 2I, H]
    assert written["model.layers.1.mlp.experts.down_proj"].dtype == torch.bfloat16
    assert not any(".experts.0." in key for key in written)
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in written  # not an expert of the stack
    assert torch.equal(logits(tmp_path / "out", dtype=torch.bfloat16), fp8_source_logits(deepseek_aligned, torch.bfloat16))


def test_a_dry_run_reports_nothing_missing_or_unexpected(deepseek_aligned, tmp_path):
    result = convert(deepseek_aligned, tmp_path / "out", "--preset", "fp8-bf16", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == []
    assert report["ok"] and not report["conversion_errors"] and report["layouts"] == {}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.parametrize("model", ["deepseek_v3", "qwen3_moe"])
def test_edge_blocks_in_whole_checkpoints_convert_to_the_formula(tmp_path, model, scale_format):
    """Blocks that divide no dim of the model (and exceed some): every weight equals the formula
    written out in the test, and transformers loads the output with an empty loading report."""
    block = (32, 32) if model == "deepseek_v3" else (12, 20)
    if model == "deepseek_v3":
        src = build_deepseek_v3_fp8(tmp_path / "src", block=block, aligned=False, scale_format=scale_format)
    else:
        src = build_qwen3_moe_fp8(tmp_path / "src", block=block, scale_format=scale_format)
    result = convert(src, tmp_path / "out", "--preset", "fp8-bf16", "--strict")
    assert result.exit_code == 0, result.output
    source, written = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(written) == {k for k in source if not k.endswith("_scale_inv")}
    checked = 0
    for key, tensor in source.items():
        if tensor.dtype == torch.float8_e4m3fn:
            scale = source[key.removesuffix("weight") + "weight_scale_inv"]
            assert same_bits(written[key], dequantize_formula(tensor, scale, block, torch.bfloat16)), key
            checked += 1
        elif not key.endswith("_scale_inv"):
            assert same_bits(written[key], tensor), key
    assert checked >= 12
    assert not any(info for info in loading_info(tmp_path / "out", dtype=torch.bfloat16).values())


def test_streaming_in_tiny_chunks_writes_the_same_bytes(tmp_path, monkeypatch):
    src = build_qwen3_moe_fp8(tmp_path / "src", block=(12, 20))
    assert convert(src, tmp_path / "whole", "--preset", "fp8-bf16").exit_code == 0
    monkeypatch.setenv("MOECONV_CHUNK_BYTES", "256")  # a few rows per chunk: row blocks of 12 with their scale rows
    assert convert(src, tmp_path / "chunks", "--preset", "fp8-bf16").exit_code == 0
    assert (tmp_path / "chunks" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


# ---- refusals ---------------------------------------------------------------------------------------------


def small_fp8(tmp_path, quantization: dict, *, scale: float = 0.01, scale_shape=(1, 1)) -> object:
    src = tmp_path / "src"
    src.mkdir()
    weight, _ = quantize_fp8_block(torch.ones(4, 6), (128, 128), "F32")
    tensors = {"layer.weight": weight, "layer.weight_scale_inv": torch.full(scale_shape, scale), "norm.weight": torch.ones(6)}
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"quantization_config": quantization}))
    return src


FP8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


@pytest.mark.parametrize(
    "quantization, message",
    [
        ({**FP8, "fmt": "e5m2"}, "fp8 quantization_config fmt 'e5m2' is not supported (moeconv reads e4m3)"),
        ({"quant_method": "fp8", "fmt": "e4m3"}, "has no weight_block_size: per-tensor FP8 is not supported"),
        ({**FP8, "weight_block_size": [128, 0]}, "weight_block_size [128, 0] is not two positive integers"),
        ({"quant_method": "mxfp4"}, "config.json has quant_method 'mxfp4', not a fp8 checkpoint"),
    ],
)
def test_unsupported_schemes_fail_in_one_line_before_any_data_moves(tmp_path, quantization, message):
    src = small_fp8(tmp_path, quantization)
    result = convert(src, tmp_path / "out", "--preset", "fp8-bf16")
    assert result.exit_code == 1
    line = error_line(result.stderr)
    assert line.startswith("error: preset fp8-bf16: ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_minimax_m2s_spelling_of_e4m3_is_read(tmp_path):
    """MiniMax-M2's config.json says fmt "float8_e4m3fn" (DeepSeek's "e4m3"), with modules_to_not_convert."""
    src = small_fp8(tmp_path, {**FP8, "fmt": "float8_e4m3fn", "modules_to_not_convert": ["gate", "lm_head"]}, scale=0.5)
    result = convert(src, tmp_path / "out", "--preset", "fp8-bf16")
    assert result.exit_code == 0, result.output
    written = load_file(tmp_path / "out" / "model.safetensors")
    source = load_file(src / "model.safetensors")
    assert same_bits(written["layer.weight"], (source["layer.weight"].float() * 0.5).bfloat16())


def test_a_scale_grid_that_does_not_fit_the_weight_names_rule_and_key(tmp_path):
    src = small_fp8(tmp_path, FP8, scale_shape=(2, 1))
    result = convert(src, tmp_path / "out", "--preset", "fp8-bf16")
    line = error_line(result.stderr)
    assert result.exit_code == 1
    assert (
        "rule 'dequantize fp8 blocks'" in line and "layer.weight" in line and "scales [2, 1] do not match weight [4, 6]" in line
    ), line


def test_fp16_overflow_is_refused_naming_the_key_and_leaves_nothing_loadable(tmp_path):
    src = small_fp8(tmp_path, FP8, scale=1000.0)  # 448 * 1000 > 65504
    result = convert(src, tmp_path / "out", "--preset", "fp8-bf16", "--dtype", "fp16")
    assert result.exit_code == 1
    line = error_line(result.stderr)
    assert "layer.weight" in line and "overflows fp16" in line, line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.safetensors"))
    assert convert(src, tmp_path / "bf16", "--preset", "fp8-bf16").exit_code == 0


def test_the_fixture_quantizes_what_the_releases_quantize(deepseek_aligned):
    source = load_file(deepseek_aligned / "model.safetensors")
    fp8_keys = {k for k, t in source.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8_keys == {k for k, t in source.items() if quantizes(k, t)}
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8_keys and "model.layers.0.mlp.gate_proj.weight" in fp8_keys
    assert "lm_head.weight" not in fp8_keys and "model.layers.1.mlp.gate.weight" not in fp8_keys


def test_the_example_recipe_drops_the_mtp_layer_and_dequantizes_the_rest(tmp_path):
    """examples/recipes/deepseek-v3-bf16-without-mtp.toml on a DeepSeek-V3 with an MTP layer 61."""
    from fp8_checkpoints import make_deepseek_v3_model, write_fp8

    mtp, scale = quantize_fp8_block(torch.randn(40, 80), (32, 32), "F32")
    extra = {
        "model.layers.61.eh_proj.weight": mtp,
        "model.layers.61.eh_proj.weight_scale_inv": scale,
        "model.layers.61.enorm.weight": torch.ones(40),
    }
    src = write_fp8(make_deepseek_v3_model(aligned=False), tmp_path / "src", block=(32, 32), shard=extra)
    recipe = Path(__file__).parent.parent / "examples" / "recipes" / "deepseek-v3-bf16-without-mtp.toml"
    result = convert(src, tmp_path / "out", "--recipe", recipe, "--strict")
    assert result.exit_code == 0, result.output
    assert convert(src, tmp_path / "preset", "--preset", "fp8-bf16").exit_code == 0
    ours, preset = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "preset" / "model.safetensors")
    assert set(ours) == {k for k in preset if not k.startswith("model.layers.61.")} and len(ours) < len(preset)
    assert all(same_bits(ours[k], preset[k]) for k in ours)


def test_compressed_tensors_fp8_block_dequantizer_writes_the_same_bytes(tmp_path):
    """The closest offline peer, compressed-tensors' convert_checkpoint + FP8BlockDequantizer (it pads
    edge blocks): the same bytes, edge rows included (24-row experts in 16-row blocks). Its columns
    must divide by the block: 0.20.1 fails to save a weight cut back to fewer columns (non-contiguous)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    src = build_deepseek_v3_fp8(tmp_path / "src", block=(16, 8), aligned=True)
    converter = FP8BlockDequantizer.from_pretrained(str(src), weight_block_size=(16, 8), dtype=torch.bfloat16)
    convert_checkpoint(str(src), str(tmp_path / "peer"), converter, device="cpu")
    assert convert(src, tmp_path / "out", "--preset", "fp8-bf16").exit_code == 0
    peer, ours = load_file(tmp_path / "peer" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(peer) == set(ours)
    assert all(same_bits(ours[key], peer[key]) for key in peer)
    assert any(t.shape[0] % 16 for k, t in ours.items() if k.endswith("proj.weight"))  # edge row blocks were exercised


def test_an_fp8_weight_without_its_scale_is_named_and_never_widened_by_dtype(tmp_path):
    """Its bytes mean nothing without a scale: --dtype leaves it F8 (config.json keeps
    quantization_config), the plan names it, and --strict refuses."""
    src = small_fp8(tmp_path, FP8)
    tensors = load_file(src / "model.safetensors")
    tensors["orphan.weight"] = tensors["layer.weight"].clone()
    save_file(tensors, src / "model.safetensors")
    result = convert(src, tmp_path / "out", "--preset", "fp8-bf16", "--dtype", "bf16")
    assert result.exit_code == 0 and "'orphan.weight' (F8_E4M3) still in fp8: no rule converted it" in result.output
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert written["orphan.weight"].dtype == torch.float8_e4m3fn and written["layer.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == FP8
    strict = convert(src, tmp_path / "strict", "--preset", "fp8-bf16", "--strict")
    assert strict.exit_code == 1 and "still in fp8" in error_line(strict.stderr) and not (tmp_path / "strict").exists()


# ---- checkpoints that stay FP8: the load report builds transformers' FP8 modules -------------------------


def dry_run_json(*args) -> dict:
    result = convert(*args, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_an_fp8_checkpoint_kept_fp8_is_checked_against_transformers_fp8_modules(deepseek_aligned, tmp_path):
    """fuse-experts alone stacks the FP8 weights and leaves their scales per expert: transformers'
    FP8 loader fuses those itself, so with whole blocks the report is clean, against FP8Experts."""
    report = dry_run_json(deepseek_aligned, tmp_path / "out", "--preset", "fuse-experts")
    assert report["checked"] and report["consumer"].endswith("DeepseekV3ForCausalLM (fp8)")
    assert report["ok"] and not report["missing"] and not report["unexpected"] and not report["mismatched"]


def test_per_expert_scales_that_do_not_fuse_into_the_fused_grid_are_mismatched(tmp_path):
    """24-row experts in 16-row blocks: gate and up scales stacked give 4 block rows, the fused
    48-row gate_up_proj has 3: transformers would load them with the wrong meaning."""
    src = build_deepseek_v3_fp8(tmp_path / "src", block=(16, 8), aligned=True)
    report = dry_run_json(src, tmp_path / "out", "--preset", "fuse-experts")
    assert not report["ok"]
    (mismatch,) = report["mismatched"]
    assert mismatch["key"] == "model.layers.1.mlp.experts.gate_up_proj_scale_inv"
    assert mismatch["expected"]["shape"] == [4, 3, 6] and mismatch["actual"]["shape"] == [4, 4, 6]
    assert convert(src, tmp_path / "strict", "--preset", "fuse-experts", "--strict").exit_code == 3


def test_a_dequantized_weight_under_a_kept_fp8_config_is_a_mismatch(deepseek_aligned, tmp_path):
    """One weight dequantized while the rest stay FP8 (so quantization_config stays): transformers
    would cast the bf16 values into its FP8 parameter. Floats of different widths are not one kind here."""
    recipe = tmp_path / "one.toml"
    recipe.write_text(
        "[[rule]]\n"
        "inputs.w = '(?P<m>model\\.layers\\.0\\.self_attn\\.o_proj)\\.weight'\n"
        "inputs.s = '(?P<m>model\\.layers\\.0\\.self_attn\\.o_proj)\\.weight_scale_inv'\n"
        'ops = [{ op = "dequantize-fp8-block", block = [8, 8] }]\n'
        'target = "{m}.weight"\n'
    )
    report = dry_run_json(deepseek_aligned, tmp_path / "out", "--recipe", recipe)
    assert not report["ok"]
    keys = {m["key"]: m for m in report["mismatched"]}
    assert keys["model.layers.0.self_attn.o_proj.weight"]["expected"]["dtype"] == "F8_E4M3"
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" in report["missing"]
