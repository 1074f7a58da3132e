"""Adding a quantization format touches only its own module and a recipe: tests/toy_format.py
registers an op and a format, and a conversion dequantizes with it, streaming rows, with
config.json's quantization_config dropped as for a built-in format."""

import json

import pytest
import torch
import toy_format  # noqa: F401  (registers the op and the format)
from safetensors.torch import load_file, save_file

from moeconv.errors import MoeconvError
from moeconv.execute import execute
from moeconv.plan import build_plan
from moeconv.recipe import parse_recipe
from moeconv.source import Checkpoint

RECIPE = """
description = "toy int8 rows -> bf16"

[[rule]]
name = "dequantize"
inputs = { w = '(?P<m>.+)\\.weight', s = '(?P<m>.+)\\.weight_scale' }
ops = [{ op = "dequantize-int8-rows", dtype = "$dtype" }]
target = "{m}.weight"
"""


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_a_format_added_in_one_module_converts_streaming(tmp_path, chunk_bytes):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-128, 128, (37, 24), dtype=torch.int8, generator=generator)
    scale = torch.rand(37, generator=generator) / 64
    src = tmp_path / "src"
    src.mkdir()
    save_file({"layer.weight": weight, "layer.weight_scale": scale, "norm": torch.ones(24)}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "toy-int8"}, "dtype": "bfloat16"}))

    plan = build_plan(Checkpoint.open(src), [parse_recipe(RECIPE, "toy.toml")])
    assert plan.tensors["layer.weight"].node.row_multiple == 1 and not plan.tensors["layer.weight"].node.materializes
    execute(plan, tmp_path / "out", chunk_bytes=chunk_bytes)

    written = load_file(tmp_path / "out" / "model.safetensors")
    expected = (weight.to(torch.float32) * scale[:, None]).to(torch.bfloat16)  # [37, 24]
    assert written.keys() == {"layer.weight", "norm"}
    assert written["layer.weight"].dtype == torch.bfloat16 and torch.equal(written["layer.weight"], expected)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


def _source(tmp_path, config: dict):
    src = tmp_path / "src"
    src.mkdir()
    tensors = {
        "layer.weight": torch.ones(4, 3, dtype=torch.int8),
        "layer.weight_scale": torch.ones(4),
        "head.weight": torch.ones(2, 3),
    }
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_unpaired_keys_are_kept_when_the_rule_says_so(tmp_path):
    """A format's weights without a scale partner are not quantized: `unpaired = "keep"` leaves them."""
    src = _source(tmp_path, {"quantization_config": {"quant_method": "toy-int8"}})
    with pytest.raises(MoeconvError, match=r"'head.weight' has no partner for input 's'"):
        build_plan(Checkpoint.open(src), [parse_recipe(RECIPE, "toy.toml")])
    kept = RECIPE.replace('target = "{m}.weight"', 'target = "{m}.weight"\nunpaired = "keep"')
    plan = build_plan(Checkpoint.open(src), [parse_recipe(kept, "toy.toml")])
    assert plan.tensors["head.weight"].ops == () and plan.tensors["layer.weight"].dtype == "BF16"


def test_an_op_parameter_can_come_from_config_json(tmp_path):
    recipe = RECIPE.replace('dtype = "$dtype"', 'dtype = "$config.toy.dtype"').replace(
        'target = "{m}.weight"', 'target = "{m}.weight"\nunpaired = "keep"'
    )
    src = _source(tmp_path, {"toy": {"dtype": "fp16"}})
    plan = build_plan(Checkpoint.open(src), [parse_recipe(recipe, "toy.toml")])
    assert plan.tensors["layer.weight"].dtype == "F16"
    (src / "config.json").write_text(json.dumps({"toy": {}}))
    with pytest.raises(
        MoeconvError, match=r"rule 'dequantize'.*parameter 'dtype' = \$config.toy.dtype: config.json has no such value"
    ):
        build_plan(Checkpoint.open(src), [parse_recipe(recipe, "toy.toml")])
    (src / "config.json").write_text(json.dumps({"toy": {"dtype": "int3"}}))
    with pytest.raises(MoeconvError, match=r"rule 'dequantize'.*parameter 'dtype' must be one of bf16"):
        build_plan(Checkpoint.open(src), [parse_recipe(recipe, "toy.toml")])
