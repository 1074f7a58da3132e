"""gpt-oss MXFP4 presets, checked against transformers' own dequantization and loading."""

import json
import shutil

import pytest
import torch
from checkpoints import dequantized_reference, loading_info, logits, read_checkpoint
from output_lines import error_line
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeconv.cli import app

EXPERTS = "model.layers.{}.mlp.experts.{}"


def convert(*args) -> str:
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def deinterleave(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Interleaved gate/up (even = gate, odd = up) -> halves, gate first."""
    even = x.index_select(dim, torch.arange(0, x.shape[dim], 2))
    odd = x.index_select(dim, torch.arange(1, x.shape[dim], 2))
    return torch.cat([even, odd], dim)


@pytest.fixture(scope="module")
def bf16_out(gpt_oss_mxfp4_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "out"
    convert(gpt_oss_mxfp4_dir, out, "--preset", "gpt-oss-bf16", "--strict")
    return out


def test_bf16_loads_cleanly_with_logits_identical_to_transformers_dequantize(gpt_oss_mxfp4_dir, bf16_out):
    info = loading_info(bf16_out)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    # The source goes through transformers' own Mxfp4Config(dequantize=True) route.
    assert torch.equal(logits(bf16_out), logits(gpt_oss_mxfp4_dir))


def test_bf16_tensors_equal_transformers_dequantizer_and_config_is_rewritten(gpt_oss_mxfp4_dir, bf16_out):
    reference = dequantized_reference(gpt_oss_mxfp4_dir)
    out = read_checkpoint(bf16_out)
    assert set(out) == set(reference)
    for key, tensor in reference.items():
        assert out[key].dtype == tensor.dtype and torch.equal(out[key], tensor), key
    config = json.loads((bf16_out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


def test_strict_writes_the_same_config_as_a_plain_run(tiny_gpt_oss_example_dir, tmp_path):
    """--strict checks the load in this process: transformers must not edit the config it writes
    (it used to add rope_theta inside rope_scaling)."""
    convert(tiny_gpt_oss_example_dir, tmp_path / "plain", "--preset", "gpt-oss-bf16")
    convert(tiny_gpt_oss_example_dir, tmp_path / "strict", "--preset", "gpt-oss-bf16", "--strict")
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "rope_theta" not in plain["rope_scaling"]  # the example has the hub's yarn rope_scaling
    assert (tmp_path / "strict" / "config.json").read_bytes() == (tmp_path / "plain" / "config.json").read_bytes()


def test_fp32_dtype_is_exact_and_fp16_refuses_nothing_finite(gpt_oss_mxfp4_dir, tmp_path):
    convert(gpt_oss_mxfp4_dir, tmp_path / "fp32", "--preset", "gpt-oss-bf16", "--dtype", "fp32")
    reference = dequantized_reference(gpt_oss_mxfp4_dir, dtype=torch.float32)
    out = read_checkpoint(tmp_path / "fp32")
    for key, tensor in reference.items():
        assert out[key].dtype == torch.float32 and torch.equal(out[key], tensor.float()), key
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("preset", ["gpt-oss-deinterleaved", "gpt-oss-out-in"])
def test_layout_presets_equal_the_reference_reordered_or_transposed(gpt_oss_mxfp4_dir, tmp_path, preset):
    convert(gpt_oss_mxfp4_dir, tmp_path / "out", "--preset", preset)
    reference = dequantized_reference(gpt_oss_mxfp4_dir)  # transformers layout [E, H, 2I] / [E, I, H]
    out = read_checkpoint(tmp_path / "out")
    assert set(out) == set(reference)
    for layer in range(2):
        gate_up, down = EXPERTS.format(layer, "gate_up_proj"), EXPERTS.format(layer, "down_proj")
        bias = gate_up + "_bias"
        if preset == "gpt-oss-deinterleaved":
            assert torch.equal(out[gate_up], deinterleave(reference[gate_up], 2))
            assert torch.equal(out[bias], deinterleave(reference[bias], 1))
            assert torch.equal(out[down], reference[down])
        else:
            assert torch.equal(out[gate_up], reference[gate_up].transpose(1, 2))  # [E, 2I, H]
            assert torch.equal(out[down], reference[down].transpose(1, 2))  # [E, H, I]
            assert torch.equal(out[bias], reference[bias])


def test_mxfp4_deinterleave_then_dequantize_equals_dequantize_then_deinterleave(gpt_oss_mxfp4_dir, tmp_path):
    convert(gpt_oss_mxfp4_dir, tmp_path / "mx", "--preset", "gpt-oss-mxfp4-deinterleaved")
    source, mx = read_checkpoint(gpt_oss_mxfp4_dir), read_checkpoint(tmp_path / "mx")
    assert set(mx) == set(source)
    assert torch.equal(mx[EXPERTS.format(0, "down_proj_blocks")], source[EXPERTS.format(0, "down_proj_blocks")])
    config = json.loads((tmp_path / "mx" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"  # still MXFP4

    convert(tmp_path / "mx", tmp_path / "mx-then-bf16", "--preset", "gpt-oss-bf16")
    convert(gpt_oss_mxfp4_dir, tmp_path / "bf16-then", "--preset", "gpt-oss-deinterleaved")
    first, second = read_checkpoint(tmp_path / "mx-then-bf16"), read_checkpoint(tmp_path / "bf16-then")
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_preset_composes_with_a_user_recipe_on_its_output(gpt_oss_mxfp4_dir, tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text(
        """
[[rule]]
name = "out-in gate_up"
match = '(?P<experts>.+\\.mlp\\.experts)\\.gate_up_proj'
ops = [{ op = "transpose", dim0 = 1, dim1 = 2 }]  # [E, H, 2I] -> [E, 2I, H]
target = "{experts}.gate_up_proj"
"""
    )
    convert(gpt_oss_mxfp4_dir, tmp_path / "out", "--preset", "gpt-oss-bf16", "--recipe", mine)
    reference = dequantized_reference(gpt_oss_mxfp4_dir)
    out = read_checkpoint(tmp_path / "out")
    key = EXPERTS.format(1, "gate_up_proj")
    assert torch.equal(out[key], reference[key].transpose(1, 2))
    report = json.loads((tmp_path / "out" / "moeconv-report.json").read_text())
    planned = {t["key"]: t for t in report["tensors"]}
    assert planned[key]["rules"] == ["dequantize experts", "out-in gate_up"]
    assert report["mismatched"] and all(m["key"].endswith("gate_up_proj") for m in report["mismatched"])


@pytest.mark.parametrize("fixture", ["gpt_oss_mxfp4_dir", "tiny_gpt_oss_example_dir"])
def test_dry_run_reports_nothing_missing_or_unexpected(fixture, request, tmp_path):
    source = request.getfixturevalue(fixture)
    report = json.loads(convert(source, tmp_path / "out", "--preset", "gpt-oss-bf16", "--dry-run", "--json"))
    assert report["checked"] is True
    assert (report["missing"], report["unexpected"], report["mismatched"]) == ([], [], [])
    assert not (tmp_path / "out").exists()
    # The source itself, judged as MXFP4 by its quantization_config, is clean too.
    untouched = tmp_path / "noop.toml"
    untouched.write_text("[[rule]]\nmatch = 'nothing'\ntarget = 'x'\n")
    report = json.loads(convert(source, tmp_path / "out", "--recipe", untouched, "--dry-run", "--json"))
    assert (report["missing"], report["unexpected"], report["mismatched"]) == ([], [], [])


def test_fp16_overflow_names_the_tensor_and_leaves_nothing_complete(gpt_oss_mxfp4_dir, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(gpt_oss_mxfp4_dir, source)
    key = EXPERTS.format(1, "down_proj_scales")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shard = source / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key][0, 0, 0] = 127 + 20  # 2^20: every non-zero value of that block overflows fp16
    save_file(tensors, str(shard), metadata={"format": "pt"})

    result = CliRunner().invoke(
        app, ["convert", str(source), str(tmp_path / "out"), "--preset", "gpt-oss-bf16", "--dtype", "fp16"]
    )
    assert result.exit_code == 1
    line = error_line(result.stderr)
    assert f"'{EXPERTS.format(1, 'down_proj')}'" in line and "overflow" in line and "fp16" in line
    assert not (tmp_path / "out" / "moeconv-report.json").exists()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    # bf16 holds those values: the same source converts.
    convert(source, tmp_path / "bf16", "--preset", "gpt-oss-bf16")
