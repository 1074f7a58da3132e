"""gpt-oss-mxfp4: transformers' bf16 gpt-oss back to the hub's MXFP4, checked against transformers
loading the result with its own MXFP4 dequantization."""

import json

import pytest
import torch
from checkpoints import loading_info, logits
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.formats.mxfp4 import dequantize


def convert(*args):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


@pytest.fixture(scope="module")
def round_trip(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    assert convert(gpt_oss_mxfp4_dir, root / "bf16", "-p", "gpt-oss-bf16").exit_code == 0
    result = convert(root / "bf16", root / "mxfp4", "-p", "gpt-oss-mxfp4", "--strict")
    assert result.exit_code == 0, result.output
    return root


def tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_requantized_checkpoint_loads_in_transformers_with_the_bf16_logits(round_trip):
    info = loading_info(round_trip / "mxfp4")
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(logits(round_trip / "mxfp4"), logits(round_trip / "bf16"))  # bit for bit
    config = json.loads((round_trip / "mxfp4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert "model.layers.*.mlp.router" in config["quantization_config"]["modules_to_not_convert"]


def test_values_on_the_grid_come_back_exactly_and_scales_match_where_ceil_chose_them(round_trip, gpt_oss_mxfp4_dir):
    """dequantize(quantize(x)) == x for the dequantized checkpoint; a block's bytes differ from the
    hub's only where the hub's scale was larger than the ceil choice for the values it kept (its
    own amax, before rounding, was larger)."""
    original, again, bf16 = tensors(gpt_oss_mxfp4_dir), tensors(round_trip / "mxfp4"), tensors(round_trip / "bf16")
    for key in (k for k in original if k.endswith("_blocks")):
        scales = key.replace("_blocks", "_scales")
        values = dequantize(again[key], again[scales], dtype=torch.bfloat16)  # [E, rows, K]
        name = key.removesuffix("_blocks")
        assert torch.equal(values, bf16[name].transpose(1, 2)), key
        same = (again[key] == original[key]).all(-1) & (again[scales] == original[scales])
        assert same.float().mean() > 0.5 and bool((original[scales][~same] > again[scales][~same]).all()), key


def test_a_dry_run_against_transformers_mxfp4_model_is_clean(round_trip):
    result = convert(round_trip / "bf16", round_trip / "dry", "-p", "gpt-oss-mxfp4", "--dry-run", "--json")
    planned = json.loads(result.stdout)
    assert planned["ok"] and planned["checked"] and not planned["missing"] and not planned["unexpected"]
    assert "(mxfp4)" in planned["consumer"]


def test_a_nan_weight_is_refused_naming_the_key(round_trip, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json",):
        (src / name).write_bytes((round_trip / "bf16" / name).read_bytes())
    weights = tensors(round_trip / "bf16")
    weights["model.layers.1.mlp.experts.down_proj"][2, 5, 7] = float("nan")
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    result = convert(src, tmp_path / "out", "-p", "gpt-oss-mxfp4")
    assert result.exit_code == 1 and "Traceback" not in result.output
    error = result.stderr.strip().splitlines()[-1]
    assert "model.layers.1.mlp.experts.down_proj" in error and "NaN" in error, error
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_a_perturbed_fine_tune_quantizes_as_the_reference_within_the_mxfp4_bound(round_trip, tmp_path):
    """Weights off the grid (a fine-tune): the blocks and scales are the reference quantizer's, byte
    for byte, and every value is within half a step of the FP4 grid at its block's scale."""
    from moeconv.formats.mxfp4_quantize import quantize_reference

    src = tmp_path / "tuned"
    src.mkdir()
    (src / "config.json").write_bytes((round_trip / "bf16" / "config.json").read_bytes())
    weights = tensors(round_trip / "bf16")
    generator = torch.Generator().manual_seed(3)
    for key in [k for k in weights if k.endswith(("gate_up_proj", "down_proj"))]:
        noise = torch.randn(weights[key].shape, generator=generator) * 0.01
        weights[key] = (weights[key].float() + noise).to(torch.bfloat16)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    assert convert(src, tmp_path / "out", "-p", "gpt-oss-mxfp4").exit_code == 0
    out = tensors(tmp_path / "out")
    for name in [k for k in weights if k.endswith(("gate_up_proj", "down_proj"))]:
        rows = weights[name].transpose(1, 2).contiguous()  # [E, out, in]: the blocks run along `in`
        blocks, scales = quantize_reference(rows, scale="ceil")
        assert torch.equal(out[f"{name}_blocks"], blocks) and torch.equal(out[f"{name}_scales"], scales), name
        step = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127)  # [E, out, in/32]: 2**(s-127)
        error = (dequantize(blocks, scales, dtype=torch.float32) - rows.float()).abs().view(*scales.shape, 32)
        assert bool((error <= step[..., None]).all()), name  # the widest FP4 gap (4 -> 6) is 2 steps
