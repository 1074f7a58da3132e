"""fuse-experts / unfuse-experts end to end, checked against transformers itself."""

import json

import pytest
import torch
from checkpoints import build_per_expert, loading_info, logits
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeconv.cli import app

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


def test_unfuse_reads_each_source_byte_once_in_bounded_chunks(tmp_path, monkeypatch):
    """Splitting a stacked gate_up_proj reads just each expert's gate rows, then its up rows: no
    expert is read whole twice, and no chunk is bigger than the chunk size (unless one row is)."""
    from moeconv.execute import execute
    from moeconv.plan import build_plan
    from moeconv.recipe import load_preset
    from moeconv.source import Checkpoint

    source = build_per_expert("mixtral", tmp_path / "src")
    assert convert(source, tmp_path / "fused", "--preset", "fuse-experts").exit_code == 0
    read_bytes, largest = [0], [0]
    original_read, original_read_bytes = Checkpoint.read, Checkpoint.read_bytes

    def count(nbytes: int) -> None:
        read_bytes[0] += nbytes
        largest[0] = max(largest[0], nbytes)

    def counting_read(self, *args, **kwargs):
        tensor = original_read(self, *args, **kwargs)
        count(tensor.numel() * tensor.element_size())
        return tensor

    def counting_read_bytes(self, *args, **kwargs):  # pass-through tensors
        view = original_read_bytes(self, *args, **kwargs)
        count(view.nbytes)
        return view

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    monkeypatch.setattr(Checkpoint, "read_bytes", counting_read_bytes)
    fused = Checkpoint.open(tmp_path / "fused")
    plan = build_plan(fused, [load_preset("unfuse-experts")])
    gate_up = next(k for k in fused.tensors if k.endswith("gate_up_proj"))
    row_bytes = fused.tensors[gate_up].nbytes // fused.tensors[gate_up].shape[0] // fused.tensors[gate_up].shape[1]
    execute(plan, tmp_path / "back", chunk_bytes=4 * row_bytes)
    assert read_bytes[0] == sum(info.nbytes for info in fused.tensors.values())
    assert largest[0] <= max(4 * row_bytes, max(i.nbytes // max(i.shape[0], 1) for i in fused.tensors.values() if i.shape))
    original, back = all_tensors(source), all_tensors(tmp_path / "back")
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


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


def test_the_python_api_writes_what_the_cli_writes(gpt_oss_mxfp4_dir, tmp_path):
    """moeconv.plan_for + moeconv.convert (the README's Python snippet) give the CLI's bytes and report."""
    import moeconv
    from moeconv.cli import app

    plan = moeconv.plan_for(gpt_oss_mxfp4_dir, presets=["gpt-oss-bf16"])
    assert plan.report.ok() and not plan.report.missing and not plan.report.unexpected
    report = moeconv.convert(plan, tmp_path / "api")
    assert (
        CliRunner().invoke(app, ["convert", str(gpt_oss_mxfp4_dir), str(tmp_path / "cli"), "-p", "gpt-oss-bf16"]).exit_code == 0
    )
    cli_report = json.loads((tmp_path / "cli" / "moeconv-report.json").read_text())
    assert report["checksums"] == cli_report["checksums"] and report["ok"]
