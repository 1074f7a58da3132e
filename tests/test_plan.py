"""Planner and executor on small synthetic per-expert checkpoints (no transformers needed)."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeconv import graph
from moeconv.cli import app
from moeconv.errors import InternalError, MoeconvError, PlanError, WriteError
from moeconv.execute import execute
from moeconv.plan import build_plan
from moeconv.recipe import load_preset, parse_recipe
from moeconv.source import Checkpoint

E, I, H = 4, 6, 8  # noqa: E741  (the papers' names: experts, intermediate, hidden)


def make_mixtral_like(folder, *, experts=E, layers=2, config=None, skip=()):
    """Per-expert Mixtral keys in bf16 with distinct random values; returns the tensors written."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(16, H, generator=generator).bfloat16()}
    for layer in range(layers):
        base = f"model.layers.{layer}.block_sparse_moe"
        tensors[f"{base}.gate.weight"] = torch.randn(experts, H, generator=generator).bfloat16()
        for e in range(experts):
            tensors[f"{base}.experts.{e}.w1.weight"] = torch.randn(I, H, generator=generator).bfloat16()
            tensors[f"{base}.experts.{e}.w3.weight"] = torch.randn(I, H, generator=generator).bfloat16()
            tensors[f"{base}.experts.{e}.w2.weight"] = torch.randn(H, I, generator=generator).bfloat16()
    for key in skip:
        del tensors[key]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or {"num_local_experts": experts}))
    return tensors


def plan_for(folder, *recipes, **options):
    return build_plan(Checkpoint.open(folder), list(recipes), **options)


def test_fuse_plan_is_exact_and_output_matches_torch(tmp_path):
    source = make_mixtral_like(tmp_path / "src")
    plan = plan_for(tmp_path / "src", load_preset("fuse-experts"))
    fused = plan.tensors["model.layers.1.mlp.experts.gate_up_proj"]
    assert (fused.dtype, fused.shape) == ("BF16", (E, 2 * I, H))
    assert plan.tensors["model.layers.0.mlp.experts.down_proj"].shape == (E, H, I)
    assert "model.layers.0.mlp.gate.weight" in plan.tensors  # block_sparse_moe renamed
    assert not any("block_sparse_moe" in key for key in plan.tensors)
    assert fused.sources[:2] == (
        "model.layers.1.block_sparse_moe.experts.0.w1.weight",
        "model.layers.1.block_sparse_moe.experts.0.w3.weight",
    )

    execute(plan, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(plan.tensors)
    for layer in range(2):
        base = f"model.layers.{layer}.block_sparse_moe.experts"
        gate_up = torch.stack([torch.cat([source[f"{base}.{e}.w1.weight"], source[f"{base}.{e}.w3.weight"]]) for e in range(E)])
        down = torch.stack([source[f"{base}.{e}.w2.weight"] for e in range(E)])
        assert torch.equal(out[f"model.layers.{layer}.mlp.experts.gate_up_proj"], gate_up)
        assert torch.equal(out[f"model.layers.{layer}.mlp.experts.down_proj"], down)
    report = json.loads((tmp_path / "out" / "moeconv-report.json").read_text())
    assert {t["key"] for t in report["tensors"]} == set(out)
    assert report["checksums"]["algorithm"] == "xxh3-128"
    assert set(report["checksums"]["files"]) == {"model.safetensors", "config.json"}


def test_chunk_size_does_not_change_a_byte(tmp_path):
    make_mixtral_like(tmp_path / "src")
    recipe = parse_recipe(
        """
[[rule]]
match = '(?P<p>.+)\\.gate_up_proj'
ops = [{ op = "transpose", dim0 = 1, dim1 = 2 }]
target = "{p}.gate_up_proj"
""",
        "t.toml",
    )
    recipes = (load_preset("fuse-experts"), recipe)
    execute(plan_for(tmp_path / "src", *recipes), tmp_path / "big")
    execute(plan_for(tmp_path / "src", *recipes), tmp_path / "small", chunk_bytes=1)
    for name in ("model.safetensors", "moeconv-report.json", "config.json"):
        assert (tmp_path / "big" / name).read_bytes() == (tmp_path / "small" / name).read_bytes()


def test_cascade_later_rule_sees_earlier_output(tmp_path):
    source = make_mixtral_like(tmp_path / "src")
    user = parse_recipe(
        """
[[rule]]
name = "kernel layout"
match = '(?P<p>.+)\\.experts\\.gate_up_proj'
ops = [{ op = "transpose", dim0 = 1, dim1 = 2 }]  # [E, 2I, H] -> [E, H, 2I]
target = "{p}.experts.gate_up_proj_t"
""",
        "mine.toml",
    )
    plan = plan_for(tmp_path / "src", load_preset("fuse-experts"), user)
    tensor = plan.tensors["model.layers.0.mlp.experts.gate_up_proj_t"]
    assert tensor.shape == (E, H, 2 * I)
    assert tensor.rules == ("mixtral gate+up", "kernel layout")
    assert "model.layers.0.mlp.experts.gate_up_proj" not in plan.tensors
    execute(plan, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        got = handle.get_tensor("model.layers.0.mlp.experts.gate_up_proj_t")
    base = "model.layers.0.block_sparse_moe.experts"
    expected = torch.stack([torch.cat([source[f"{base}.{e}.w1.weight"], source[f"{base}.{e}.w3.weight"]]) for e in range(E)])
    assert torch.equal(got, expected.transpose(1, 2))


def test_missing_expert_is_named_with_the_expected_count(tmp_path):
    make_mixtral_like(
        tmp_path / "src",
        skip=["model.layers.1.block_sparse_moe.experts.2.w1.weight", "model.layers.1.block_sparse_moe.experts.2.w3.weight"],
    )
    with pytest.raises(PlanError) as caught:
        plan_for(tmp_path / "src", load_preset("fuse-experts"))
    message = str(caught.value)
    assert "rule 'mixtral gate+up'" in message
    assert "layer=model.layers.1" in message and "expert 2 missing" in message
    assert "expected 4 from config.json num_local_experts" in message


def test_two_keys_naming_one_expert_are_refused(tmp_path):
    """`experts.03` and `experts.3` would both land in slot 3: one of them would silently vanish."""
    make_mixtral_like(tmp_path / "src")
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for name in ("w1", "w2", "w3"):
        tensors[f"model.layers.0.block_sparse_moe.experts.03.{name}.weight"] = tensors[
            f"model.layers.0.block_sparse_moe.experts.3.{name}.weight"
        ].clone()
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(
        PlanError, match=r"'model.layers.0.block_sparse_moe.experts.3.w1.weight' and '.*experts.03.w1.weight' are both expert 3"
    ):
        plan_for(tmp_path / "src", load_preset("fuse-experts"))


def test_non_ascii_digits_are_not_expert_numbers(tmp_path):
    """Python's `\\d` matches Arabic-Indic digits, RE2's (the rules' engine) does not: either way the
    planner must not read '٣' as expert 3."""
    make_mixtral_like(tmp_path / "src")
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    tensors["model.layers.0.block_sparse_moe.experts.٣.w1.weight"] = tensors.pop(
        "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    )
    tensors["model.layers.0.block_sparse_moe.experts.٣.w3.weight"] = tensors.pop(
        "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    )
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(PlanError, match="expert 3 missing for input 'gate' \\(have 0..2; expected 4"):
        plan_for(tmp_path / "src", load_preset("fuse-experts"))


def test_missing_partner_input_is_named(tmp_path):
    make_mixtral_like(tmp_path / "src", skip=["model.layers.0.block_sparse_moe.experts.3.w3.weight"])
    with pytest.raises(PlanError, match=r"'model.layers.0.block_sparse_moe.experts.3.w1.weight' has no partner for input 'up'"):
        plan_for(tmp_path / "src", load_preset("fuse-experts"))


def test_two_rules_writing_one_key(tmp_path):
    make_mixtral_like(tmp_path / "src")
    clash = parse_recipe(
        """
[[rule]]
name = "clash"
match = 'model\\.embed_tokens\\.weight'
target = "model.layers.0.block_sparse_moe.gate.weight"
""",
        "clash.toml",
    )
    with pytest.raises(
        PlanError,
        match=r"clash.toml: rule 'clash' writes 'model.layers.0.block_sparse_moe.gate.weight', which the source already provides",
    ):
        plan_for(tmp_path / "src", clash)


def test_rule_matching_nothing_warns_and_strict_refuses(tmp_path):
    make_mixtral_like(tmp_path / "src")
    recipe = parse_recipe("[[rule]]\nname = 'ghost'\nmatch = 'nothing\\.here'\ntarget = 'x'\n", "ghost.toml")
    plan = plan_for(tmp_path / "src", recipe)
    assert any("rule 'ghost' matched no key" in w for w in plan.warnings)
    with pytest.raises(PlanError, match=r"rule 'ghost' matched no key \(--strict\)"):
        plan_for(tmp_path / "src", recipe, strict=True)


def test_impossible_shape_is_a_plan_error_naming_rule_and_key(tmp_path):
    make_mixtral_like(tmp_path / "src")
    recipe = parse_recipe(
        """
[[rule]]
name = "bad concat"
inputs = { a = '(?P<l>.+)\\.experts\\.(?P<e>\\d+)\\.w1\\.weight', b = '(?P<l>.+)\\.experts\\.(?P<e>\\d+)\\.w2\\.weight' }
ops = [{ op = "concat", dim = 0 }]
target = "{l}.experts.{e}.w12"
""",
        "bad.toml",
    )
    with pytest.raises(PlanError) as caught:
        plan_for(tmp_path / "src", recipe)
    assert "bad.toml: rule 'bad concat'" in str(caught.value)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in str(caught.value)


def test_dtype_casts_every_float_and_sets_config(tmp_path):
    source = make_mixtral_like(tmp_path / "src", config={"num_local_experts": E, "dtype": "bfloat16"})
    plan = plan_for(tmp_path / "src", load_preset("fuse-experts"), dtype="fp32")
    assert {t.dtype for t in plan.tensors.values()} == {"F32"}
    execute(plan, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(out["model.embed_tokens.weight"], source["model.embed_tokens.weight"].float())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("spelling", ["fp16", "float16", "half", "F16", torch.float16])
def test_every_dtype_spelling_plans_the_same(tmp_path, spelling):
    """build_plan takes --dtype's spellings, safetensors names and torch dtypes alike."""
    make_mixtral_like(tmp_path / "src")
    plan = plan_for(tmp_path / "src", load_preset("fuse-experts"), dtype=spelling)
    assert {t.dtype for t in plan.tensors.values()} == {"F16"} and plan.dtype == "F16"


def test_an_unknown_dtype_is_a_plain_error(tmp_path):
    make_mixtral_like(tmp_path / "src")
    with pytest.raises(MoeconvError, match="unknown dtype 'int8'; use one of bf16, fp16, fp32"):
        plan_for(tmp_path / "src", load_preset("fuse-experts"), dtype=torch.int8)


def test_dry_run_reads_no_tensor_data_and_creates_nothing(tmp_path, monkeypatch):
    make_mixtral_like(tmp_path / "src")

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read during a dry run")

    monkeypatch.setattr(Checkpoint, "read", refuse)
    monkeypatch.setattr("safetensors.safe_open", refuse)
    monkeypatch.setattr(graph.SourceNode, "rows", refuse)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "src"), str(out), "--preset", "fuse-experts", "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)
    assert {t["key"] for t in planned["tensors"]} >= {
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    }
    assert not out.exists()


def test_chunk_that_disagrees_with_plan_is_reported_as_a_bug(tmp_path, monkeypatch):
    make_mixtral_like(tmp_path / "src")
    plan = plan_for(tmp_path / "src", load_preset("fuse-experts"))
    node = plan.tensors["model.layers.0.mlp.experts.down_proj"].node
    monkeypatch.setattr(node, "copies_bytes", False)  # through torch, as an op that computes would be
    monkeypatch.setattr(node, "rows", lambda a, b: torch.zeros(b - a, H, I + 1, dtype=torch.bfloat16))
    with pytest.raises(
        InternalError, match=r"rule 'mixtral down' produced .* for 'model.layers.0.mlp.experts.down_proj'.*moeconv bug"
    ):
        execute(plan, tmp_path / "out")
    assert not (tmp_path / "out" / "moeconv-report.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_output_folder_rules(tmp_path):
    make_mixtral_like(tmp_path / "src")
    plan = plan_for(tmp_path / "src", load_preset("fuse-experts"))
    with pytest.raises(WriteError, match="inside it"):
        execute(plan, tmp_path / "src" / "out")
    with pytest.raises(WriteError, match="source folder"):
        execute(plan, tmp_path / "src")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.txt").write_text("x")
    with pytest.raises(WriteError, match="not empty; pass --overwrite"):
        execute(plan, tmp_path / "busy")
    execute(plan, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "moeconv-report.json").exists()


def test_companion_files_are_copied_but_not_subfolders(tmp_path):
    make_mixtral_like(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"x": 1}')
    (tmp_path / "src" / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "src" / "original").mkdir()
    (tmp_path / "src" / "original" / "params.json").write_text("{}")
    (tmp_path / "src" / "weights.bin").write_bytes(b"\x80pickle")
    plan = plan_for(tmp_path / "src", load_preset("fuse-experts"))
    assert plan.companion_files == ["chat_template.jinja", "tokenizer_config.json"]
    execute(plan, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "moeconv-report.json",
        "tokenizer_config.json",
    ]


def test_output_files_are_readable_by_others(tmp_path):
    make_mixtral_like(tmp_path / "src")
    execute(plan_for(tmp_path / "src", load_preset("fuse-experts")), tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_a_drop_rule_removes_every_key_it_matches_even_without_named_groups(tmp_path):
    """Dropping pairs nothing: several keys that a pattern without named groups matches all go."""
    make_mixtral_like(tmp_path / "src")
    recipe = parse_recipe("[[rule]]\nmatch = 'model\\.layers\\.1\\..+'\ndrop = true\n", "drop.toml")
    plan = plan_for(tmp_path / "src", recipe, strict=True)
    assert plan.tensors and not any(key.startswith("model.layers.1.") for key in plan.tensors)
    assert any(key.startswith("model.layers.0.") for key in plan.tensors)
