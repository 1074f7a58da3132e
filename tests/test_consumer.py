"""Never silently wrong: an output whose rows or columns mean something else than transformers'
layout is never reported clean, whatever its shapes, and the files say which layout they are in.

The flagged layouts are checked against the real consumer: transformers loads them without a
missing, unexpected or mismatched key and computes a different function."""

import json
from pathlib import Path

import pytest
import torch
from checkpoints import loading_info, logits
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.plan import build_plan
from moeconv.recipe import load_preset, parse_recipe
from moeconv.source import Checkpoint

REPO = Path(__file__).resolve().parents[1]


def convert(*args):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def dry_run(*args) -> dict:
    result = convert(*args, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def metadata(folder: Path) -> dict:
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize(
    "preset, family, layout",
    [
        ("gpt-oss-deinterleaved", "mlp.experts.gate_up_proj", "gate-up-halves"),
        ("gpt-oss-mxfp4-deinterleaved", "mlp.experts.gate_up_proj_blocks", "gate-up-halves"),
        ("gpt-oss-out-in", "mlp.experts.down_proj", "out-in"),  # H = I here: the shapes match transformers'
    ],
)
def test_a_non_standard_gpt_oss_layout_is_never_clean(gpt_oss_mxfp4_dir, tmp_path, preset, family, layout):
    planned = dry_run(gpt_oss_mxfp4_dir, tmp_path / "out", "-p", preset)
    assert not planned["ok"] and planned["layouts"]
    flagged = {key for key, how in planned["layouts"].items() if how.startswith(layout)}
    assert f"model.layers.0.{family}" in flagged and f"model.layers.1.{family}" in flagged
    tensors = {t["key"]: t for t in planned["tensors"]}
    assert tensors[f"model.layers.0.{family}"]["layout"][0].startswith(layout)
    text = convert(gpt_oss_mxfp4_dir, tmp_path / "out", "-p", preset, "--dry-run")
    assert f"model.layers.{{0...1}}.{family}: {layout}" in text.output and "compute a different function" in text.output
    strict = convert(gpt_oss_mxfp4_dir, tmp_path / "out", "-p", preset, "--strict")
    assert strict.exit_code == 3 and not (tmp_path / "out").exists()


def test_the_flagged_layout_really_computes_another_function_in_transformers(gpt_oss_mxfp4_dir, tmp_path):
    """transformers itself: every key loads, and the logits are not the source's."""
    assert convert(gpt_oss_mxfp4_dir, tmp_path / "std", "-p", "gpt-oss-bf16").exit_code == 0
    assert convert(gpt_oss_mxfp4_dir, tmp_path / "halves", "-p", "gpt-oss-deinterleaved").exit_code == 0
    info = loading_info(tmp_path / "halves")
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not torch.allclose(logits(tmp_path / "halves"), logits(tmp_path / "std"), atol=1e-2)
    config = json.loads((tmp_path / "halves" / "config.json").read_text())
    assert config["moeconv_layouts"] == {
        "model.layers.{0...1}.mlp.experts.gate_up_proj": "gate-up-halves (rule 'gate/up halves')",
        "model.layers.{0...1}.mlp.experts.gate_up_proj_bias": "gate-up-halves (rule 'gate/up bias halves')",
    }
    assert json.loads(metadata(tmp_path / "halves")["moeconv.layouts"]) == config["moeconv_layouts"]
    assert "moeconv_layouts" not in json.loads((tmp_path / "std" / "config.json").read_text())


def test_up_first_fusion_in_a_user_recipe_is_flagged_and_the_standard_one_is_clean(mixtral_dir, tmp_path):
    up_first = dry_run(mixtral_dir, tmp_path / "out", "-r", REPO / "examples" / "recipes" / "fuse-up-first.toml")
    assert not up_first["ok"]
    assert any(k.endswith("mlp.experts.gate_up_proj") and "concat" in how for k, how in up_first["layouts"].items())
    standard = dry_run(mixtral_dir, tmp_path / "out", "-p", "fuse-experts")
    assert standard["ok"] and standard["layouts"] == {}


SQUARE = """
[[rule]]
name = "transpose down_proj"
match = '(?P<m>.+)\\.mlp\\.experts\\.down_proj'
ops = [{ op = "transpose", dim0 = 1, dim1 = 2 }]
target = "{m}.mlp.experts.down_proj"
"""


def test_a_transposed_square_matrix_is_flagged_and_transposing_back_is_clean(gpt_oss_mxfp4_dir):
    planned = build_plan(Checkpoint.open(gpt_oss_mxfp4_dir), [load_preset("gpt-oss-bf16"), parse_recipe(SQUARE, "square.toml")])
    down = planned.tensors["model.layers.0.mlp.experts.down_proj"]
    assert down.shape[1] == down.shape[2] and down.layout and "transpose" in down.layout[0]  # [E, I, H], I = H
    assert not planned.report.ok() and planned.report.layouts
    back = build_plan(
        Checkpoint.open(gpt_oss_mxfp4_dir),
        [load_preset("gpt-oss-bf16"), parse_recipe(SQUARE, "a.toml"), parse_recipe(SQUARE, "b.toml")],
    )
    assert back.tensors["model.layers.0.mlp.experts.down_proj"].layout == () and back.report.ok()


def test_provenance_metadata_is_present_and_byte_reproducible(gpt_oss_mxfp4_dir, tmp_path):
    for name in ("a", "b"):
        assert convert(gpt_oss_mxfp4_dir, tmp_path / name, "-p", "gpt-oss-bf16").exit_code == 0
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    meta = metadata(tmp_path / "a")
    assert meta["format"] == "pt" and meta["moeconv.version"]
    (recipe,) = json.loads(meta["moeconv.recipes"])
    assert recipe["name"] == "preset gpt-oss-bf16" and len(recipe["sha256"]) == 16
    assert "moeconv.layouts" not in meta and "moeconv.source" not in meta  # standard layout, local source


QKV = """
[[rule]]
name = "split fused qkv"
match = '(?P<m>.+)\\.qkv\\.weight'
ops = [{ op = "split", dim = 0, sizes = [8, 4, 4], names = ["q", "k", "v"], as = "part" }]
target = "{m}.{part}.weight"

[[rule]]
name = "rename into the reference implementation's names"
match = 'layers\\.(?P<n>[0-9]+)\\.(?P<proj>gate_up_proj|down_proj)'
maps.mlp = { gate_up_proj = "mlp1_weight", down_proj = "mlp2_weight" }
target = "block.{n}.mlp.{proj|mlp}"
"""

FUSE_QKV = """
[[rule]]
name = "fuse qkv"
inputs = { q = '(?P<m>.+)\\.q\\.weight', k = '(?P<m>.+)\\.k\\.weight', v = '(?P<m>.+)\\.v\\.weight' }
ops = [{ op = "concat", dim = 0 }]
target = "{m}.qkv.weight"
"""


def test_split_with_sizes_round_trips_and_a_map_renames_a_family_in_one_rule(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    qkv = torch.randn(16, 6).to(torch.bfloat16)  # q 8 rows, k 4, v 4
    experts = {f"layers.{n}.{p}": torch.randn(2, 3) for n in range(2) for p in ("gate_up_proj", "down_proj")}
    save_file({"attn.qkv.weight": qkv, **experts}, src / "model.safetensors")
    assert convert(src, tmp_path / "split", "-r", _write(tmp_path / "qkv.toml", QKV)).exit_code == 0
    out = load_file(tmp_path / "split" / "model.safetensors")
    assert [out[f"attn.{p}.weight"].shape[0] for p in "qkv"] == [8, 4, 4]
    assert torch.equal(torch.cat([out["attn.q.weight"], out["attn.k.weight"], out["attn.v.weight"]]), qkv)
    assert {k for k in out if k.startswith("block.")} == {f"block.{n}.mlp.mlp{i}_weight" for n in range(2) for i in (1, 2)}
    assert torch.equal(out["block.1.mlp.mlp2_weight"], experts["layers.1.down_proj"])
    assert convert(tmp_path / "split", tmp_path / "back", "-r", _write(tmp_path / "fuse.toml", FUSE_QKV)).exit_code == 0
    assert torch.equal(load_file(tmp_path / "back" / "model.safetensors")["attn.qkv.weight"], qkv)


def test_a_map_without_the_value_is_a_one_line_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file({"layers.0.gate_up_proj": torch.ones(1), "layers.0.router": torch.ones(1)}, src / "model.safetensors")
    recipe = QKV.split("[[rule]]")[2].replace("gate_up_proj|down_proj", "gate_up_proj|router")
    result = convert(src, tmp_path / "out", "-r", _write(tmp_path / "r.toml", "[[rule]]" + recipe))
    assert result.exit_code == 1 and "maps.mlp has no entry for 'router'" in result.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
