"""fuse-experts / unfuse-experts end to end, checked against transformers itself."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeconv.cli import app
from checkpoints import build_per_expert, loading_info, logits

FAMILIES = ["qwen3_moe", "mixtral", "olmoe"]


def convert(*args: str):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def all_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.fixture(scope="module", params=FAMILIES)
def per_expert(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, build_per_expert(request.param, folder / "src")


def test_fused_output_loads_cleanly_with_identical_logits(per_expert, tmp_path):
    family, source = per_expert
    result = convert(source, tmp_path / "fused", "--preset", "fuse-experts", "--strict")
    assert result.exit_code == 0, result.output
    keys = set(all_tensors(tmp_path / "fused"))
    assert any(key.endswith("mlp.experts.gate_up_proj") for key in keys)
    assert not any(".experts.0." in key for key in keys)

    info = loading_info(tmp_path / "fused")
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(logits(tmp_path / "fused"), logits(source))


def test_unfuse_after_fuse_gives_back_the_source_bytes(per_expert, tmp_path):
    family, source = per_expert
    assert convert(source, tmp_path / "fused", "--preset", "fuse-experts").exit_code == 0
    result = convert(tmp_path / "fused", tmp_path / "back", "--preset", "unfuse-experts", "--strict")
    assert result.exit_code == 0, result.output
    original, back = all_tensors(source), all_tensors(tmp_path / "back")
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        assert back[key].view(torch.uint8).flatten().tolist() == tensor.view(torch.uint8).flatten().tolist(), key


def test_dry_run_reports_exactly_the_missing_and_unexpected_key(tmp_path):
    source = build_per_expert("qwen3_moe", tmp_path / "src")
    (shard,) = source.glob("*.safetensors")
    tensors = load_file(str(shard))
    with safe_open(str(shard), "pt") as handle:
        metadata = handle.metadata()
    del tensors["model.norm.weight"]
    tensors["model.foreign.weight"] = torch.ones(3, dtype=torch.bfloat16)
    save_file(tensors, str(shard), metadata=metadata)

    result = convert(source, tmp_path / "out", "--preset", "fuse-experts", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["missing"] == ["model.norm.weight"]
    assert report["unexpected"] == ["model.foreign.weight"]
    assert report["mismatched"] == []
    assert not (tmp_path / "out").exists()

    human = convert(source, tmp_path / "out", "--preset", "fuse-experts", "--dry-run")
    assert "MISSING" in human.stdout and "UNEXPECTED" in human.stdout

    strict = convert(source, tmp_path / "out", "--preset", "fuse-experts", "--strict")
    assert strict.exit_code == 3
    assert not (tmp_path / "out").exists()
