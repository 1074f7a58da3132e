"""moeconv verify: a fresh output passes; a flipped byte, a truncated or missing file is named."""

import hashlib
import json
import shutil

import pytest
from output_lines import error_line
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.output import REPORT_NAME
from moeconv.verify import sample_rows, verify


def run(*args):
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sharded_mixtral_dir):
    out = tmp_path_factory.mktemp("verify") / "out"
    result = run("convert", sharded_mixtral_dir, out, "-p", "fuse-experts", "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def converted_sha256(tmp_path_factory, sharded_mixtral_dir):
    out = tmp_path_factory.mktemp("verify_sha256") / "out"
    result = run("convert", sharded_mixtral_dir, out, "-p", "fuse-experts", "--max-shard-size", "20KB", "--checksum", "sha256")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def out(converted, tmp_path):
    return shutil.copytree(converted, tmp_path / "out")


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    return error_line(result.stderr)


def flip_last_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def last_tensor(out, name):
    tensors = [t for t in json.loads((out / REPORT_NAME).read_text())["tensors"] if t["shard"] == name]
    return max(tensors, key=lambda t: t["offset"])["key"]


def test_fresh_output_passes(converted, sharded_mixtral_dir):
    assert run("verify", converted).exit_code == 0
    result = run("verify", converted, "--against", sharded_mixtral_dir)
    assert result.exit_code == 0, result.output
    assert "equal to the source" in result.stdout
    sampled = run("verify", converted, "--against", sharded_mixtral_dir, "--sample", "2", "--json")
    assert sampled.exit_code == 0, sampled.output
    report = json.loads(sampled.stdout)
    assert report["ok"] and report["problems"] == [] and report["compared"] == report["tensors"] > 0


def test_gpt_oss_output_verifies_against_its_mxfp4_source(gpt_oss_mxfp4_dir, tmp_path):
    out = tmp_path / "bf16"
    assert run("convert", gpt_oss_mxfp4_dir, out, "-p", "gpt-oss-bf16", "--dtype", "fp32", "--align", "64").exit_code == 0
    result = run("verify", out, "--against", gpt_oss_mxfp4_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["compared"] > 0


def test_flipped_byte_names_the_file_and_with_against_the_key(out, sharded_mixtral_dir):
    shard = sorted(out.glob("*.safetensors"))[1]
    flip_last_byte(shard)
    line = one_line_error(run("verify", out))
    assert shard.name in line and "xxh3-128" in line

    key = last_tensor(out, shard.name)
    line = one_line_error(run("verify", out, "--against", sharded_mixtral_dir))
    assert shard.name in line and "xxh3-128" in line and f"'{key}' differs" in line

    result = run("verify", out, "--against", sharded_mixtral_dir, "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert any(key in p for p in problems)


def test_flipped_byte_in_an_unsampled_row_passes_sampling_but_not_the_hash(out, sharded_mixtral_dir):
    report = json.loads((out / REPORT_NAME).read_text())
    tensor = next(t for t in report["tensors"] if t["key"].endswith("layers.0.mlp.experts.gate_up_proj"))
    experts, row_bytes = tensor["shape"][0], tensor["nbytes"] // tensor["shape"][0]
    assert 1 not in sample_rows(experts, 2)
    path = out / tensor["shard"]
    raw = bytearray(path.read_bytes())
    raw[tensor["offset"] + row_bytes] ^= 0x01  # expert 1
    path.write_bytes(bytes(raw))
    result = verify(out, against=str(sharded_mixtral_dir), sample=2)
    assert len(result.problems) == 1 and "xxh3-128" in result.problems[0]
    full = verify(out, against=str(sharded_mixtral_dir))
    assert any(f"'{tensor['key']}' differs" in p and "row 1 " in p for p in full.problems)


def test_sha256_report_holds_hashlib_digests_and_verifies(converted_sha256, sharded_mixtral_dir):
    report = json.loads((converted_sha256 / REPORT_NAME).read_text())
    assert report["checksums"]["algorithm"] == "sha256" and "sha256" not in report
    files = report["checksums"]["files"]
    assert set(files) == {p.name for p in converted_sha256.iterdir()} - {REPORT_NAME}
    for name, digest in files.items():
        assert digest == hashlib.sha256((converted_sha256 / name).read_bytes()).hexdigest(), name
    result = run("verify", converted_sha256, "--against", sharded_mixtral_dir)
    assert result.exit_code == 0, result.output
    assert f"{len(files)} files match their sha256 checksum" in result.stdout


@pytest.mark.parametrize("algorithm", ["xxh3-128", "sha256"])
def test_flipped_byte_is_caught_under_both_algorithms(algorithm, converted, converted_sha256, tmp_path):
    out = shutil.copytree(converted if algorithm == "xxh3-128" else converted_sha256, tmp_path / "out")
    assert verify(out).ok and verify(out).algorithm == algorithm
    shard = sorted(out.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # inside tensor data: the header still reads fine
    shard.write_bytes(bytes(raw))
    (problem,) = verify(out).problems
    assert problem.startswith(f"{shard}: {algorithm} ") and "the file changed after conversion" in problem
    line = one_line_error(run("verify", out))
    assert shard.name in line and algorithm in line


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda r: r["checksums"].update(algorithm="md5"), 'unknown checksum algorithm "md5"'),
        (lambda r: r["checksums"].pop("algorithm"), "unknown checksum algorithm null"),
        (lambda r: r.update(sha256=r.pop("checksums")["files"]), "older moeconv"),
        (lambda r: r.pop("checksums"), "needs 'checksums'"),
    ],
)
def test_report_with_an_unknown_algorithm_or_without_checksums(out, change, needle):
    report = json.loads((out / REPORT_NAME).read_text())
    change(report)
    (out / REPORT_NAME).write_text(json.dumps(report))
    line = one_line_error(run("verify", out))
    assert line.startswith(f"error: {out / REPORT_NAME}: ") and needle in line


def test_truncated_shard(out):
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    line = one_line_error(run("verify", out))
    assert shard.name in line and "truncated" in line


def test_missing_file(out, sharded_mixtral_dir):
    shard = sorted(out.glob("*.safetensors"))[-1]
    shard.unlink()
    line = one_line_error(run("verify", out, "--against", sharded_mixtral_dir))
    assert shard.name in line and "missing" in line


def test_header_changed_to_lie_about_a_tensor(out):
    from safetensors_bytes import build

    shard = sorted(out.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "BF16")
    header[key]["dtype"] = "F16"  # same size: the reader accepts it, the report does not
    text = json.dumps(header, separators=(",", ":")).encode()
    shard.write_bytes(build(text + b" " * (length - len(text)), raw[8 + length :]))
    problems = verify(out).problems
    assert any(f"'{key}': dtype F16, the report says BF16" in p for p in problems)


def test_no_report_and_no_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert REPORT_NAME in one_line_error(run("verify", tmp_path / "empty"))
    assert "no such folder" in one_line_error(run("verify", tmp_path / "nowhere"))


def test_against_another_source_names_the_first_key(out, qwen3_moe_dir):
    line = one_line_error(run("verify", out, "--against", qwen3_moe_dir))
    assert "tensor '" in line


def test_sample_rows_is_deterministic_and_covers_the_ends():
    assert sample_rows(128, 4) == [0, 42, 85, 127]
    assert sample_rows(3, 8) == [0, 1, 2]
    assert sample_rows(5, 1) == [0]


def test_experts_bigger_than_a_chunk_are_written_and_verified_in_parts(out, sharded_mixtral_dir, tmp_path):
    """With a chunk smaller than one fused expert, each expert is produced as slices of its rows
    (never whole); the bytes equal the one-chunk-per-expert output, and verify in such slices still
    names the expert (axis-0 row) of a flipped byte."""
    from moeconv.execute import execute
    from moeconv.plan import build_plan
    from moeconv.recipe import load_preset
    from moeconv.source import Checkpoint
    from moeconv.stream import chunks

    plan = build_plan(Checkpoint.open(sharded_mixtral_dir), [load_preset("fuse-experts")], max_shard_size=20_000)
    gate_up = next(t for t in plan.tensors.values() if t.key.endswith("layers.0.mlp.experts.gate_up_proj"))
    expert_bytes = gate_up.nbytes // gate_up.shape[0]
    budget = expert_bytes // 3
    chunks = list(chunks(gate_up, budget))
    assert all(c.inner is not None and c.stop == c.start + 1 for c in chunks)
    assert [c.start for c in chunks] == sorted(c.start for c in chunks) and len(chunks) > gate_up.shape[0]
    assert max(gate_up.nbytes // gate_up.shape[0] // gate_up.shape[1] * (c.inner[1] - c.inner[0]) for c in chunks) <= budget

    execute(plan, tmp_path / "parts", chunk_bytes=budget)
    for path in sorted(out.glob("*.safetensors")):
        assert (tmp_path / "parts" / path.name).read_bytes() == path.read_bytes(), path.name

    whole = verify(out, against=str(sharded_mixtral_dir), chunk_bytes=budget)
    assert whole.ok and whole.rows == sum(t.shape[0] for t in plan.tensors.values() if t.shape)
    report = json.loads((out / REPORT_NAME).read_text())
    entry = next(t for t in report["tensors"] if t["key"] == gate_up.key)
    path = out / entry["shard"]
    raw = bytearray(path.read_bytes())
    raw[entry["offset"] + 2 * expert_bytes + expert_bytes // 2 + 1] ^= 0x01  # expert 2, second half
    path.write_bytes(bytes(raw))
    result = verify(out, against=str(sharded_mixtral_dir), chunk_bytes=budget)
    assert any(f"'{gate_up.key}' differs" in p and "row 2 of axis 0" in p for p in result.problems), result.problems
