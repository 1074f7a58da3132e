"""The executor's pipelining must be invisible in the output: several compute threads and any
chunk size give the same bytes, errors and report."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import pytest
import torch
from output_lines import error_line
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.execute import execute
from moeconv.output import REPORT_NAME
from moeconv.plan import build_plan
from moeconv.recipe import load_preset, parse_recipe
from moeconv.source import Checkpoint

MiB = 2**20


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_output_is_identical_whatever_the_threads_and_chunks(gpt_oss_mxfp4_dir, tmp_path, monkeypatch, threads):
    """gpt-oss-bf16 with 1..3 compute threads and tiny chunks (many in flight, buffers recycled
    between them) gives the bytes of a one-thread, one-chunk-per-tensor run."""
    plan = lambda: build_plan(Checkpoint.open(gpt_oss_mxfp4_dir), [load_preset("gpt-oss-bf16")])  # noqa: E731
    monkeypatch.setenv("MOECONV_THREADS", "1")
    execute(plan(), tmp_path / "reference", chunk_bytes=2**40)
    monkeypatch.setenv("MOECONV_THREADS", threads)
    execute(plan(), tmp_path / "out", chunk_bytes=4096)
    names = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_an_error_in_a_compute_thread_is_the_usual_one_line_error(gpt_oss_mxfp4_dir, tmp_path, monkeypatch):
    """fp16 overflow happens inside a worker thread; the CLI still prints one line naming the key."""
    monkeypatch.setenv("MOECONV_THREADS", "2")
    monkeypatch.setenv("MOECONV_CHUNK_BYTES", "4096")
    source = tmp_path / "src"
    shutil.copytree(gpt_oss_mxfp4_dir, source)
    shard = next(
        path for path in sorted(source.glob("*.safetensors")) if any(k.endswith("down_proj_scales") for k in load_file(path))
    )
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("down_proj_scales"))
    tensors[key] = torch.full_like(tensors[key], 127 + 20)  # 2**20 * 6: far beyond fp16
    save_file(tensors, shard, metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "out"), "-p", "gpt-oss-bf16", "--dtype", "fp16"])
    assert result.exit_code == 1
    line = error_line(result.stderr)
    assert "overflow fp16" in line and key.removesuffix("_scales") in line
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "moeconv-report.json").exists()


def test_convert_writes_the_same_report_as_the_dry_run_shows(gpt_oss_mxfp4_dir, tmp_path):
    runner = CliRunner()
    dry = runner.invoke(
        app, ["convert", str(gpt_oss_mxfp4_dir), str(tmp_path / "out"), "-p", "gpt-oss-bf16", "--dry-run", "--json"]
    )
    assert dry.exit_code == 0, dry.output
    done = runner.invoke(app, ["convert", str(gpt_oss_mxfp4_dir), str(tmp_path / "out"), "-p", "gpt-oss-bf16"])
    assert done.exit_code == 0, done.output
    written = json.loads((tmp_path / "out" / "moeconv-report.json").read_text())
    planned = json.loads(dry.stdout)
    for field in ("checked", "ok", "consumer", "missing", "unexpected", "mismatched", "conversion_errors"):
        assert written[field] == planned[field], field
    assert written["checked"] and written["ok"]


def test_the_data_path_does_not_wait_for_the_load_report(gpt_oss_mxfp4_dir, tmp_path):
    """Every shard is written while the report is still pending; the final names come once it is ready."""
    plan = build_plan(Checkpoint.open(gpt_oss_mxfp4_dir), [load_preset("gpt-oss-bf16")])
    ready, plan._report = plan.report, Future()
    out = tmp_path / "out"
    worker = threading.Thread(target=execute, args=(plan, out), daemon=True)
    worker.start()
    staged = [out / f".{layout.name}.staged" for layout in plan.shards]
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in staged) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(path.exists() for path in staged) and worker.is_alive()
    # nothing gets its final name before the report is ready (a folder killed now is not loadable)
    assert not (out / REPORT_NAME).exists() and not list(out.glob("*.safetensors"))
    plan._report.set_result(ready)
    worker.join(timeout=120)
    assert json.loads((out / REPORT_NAME).read_text())["consumer"] == ready.consumer


def test_a_real_process_prints_all_its_json_and_exits_0(gpt_oss_mxfp4_dir, tmp_path):
    """stdout is complete on a pipe, and the report computed beside the data path is in the output."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeconv",
            "convert",
            str(gpt_oss_mxfp4_dir),
            str(tmp_path / "out"),
            "-p",
            "gpt-oss-bf16",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["checked"] and printed["ok"] and printed["consumer"].startswith("transformers ")
    assert printed == json.loads((tmp_path / "out" / REPORT_NAME).read_text())


def test_a_bad_thread_count_is_a_one_line_error(gpt_oss_mxfp4_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOECONV_THREADS", "two")
    result = CliRunner().invoke(app, ["convert", str(gpt_oss_mxfp4_dir), str(tmp_path / "out"), "-p", "gpt-oss-bf16"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: MOECONV_THREADS='two': must be a positive whole number of threads"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_stacking_along_any_dim_is_exact_in_any_chunking(tmp_path, dim):
    """Only a stack along dim 0 may be produced as slices of one expert; along dim 1 or 2 the rows
    interleave the members, and tiny chunks must still give torch.stack's bytes."""
    generator = torch.Generator().manual_seed(dim)
    experts = {f"model.layers.0.experts.{e}.w1.weight": torch.randn(6, 5, generator=generator) for e in range(3)}
    (tmp_path / "src").mkdir()
    save_file(experts, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    recipe = parse_recipe(
        f"""
[[rule]]
match = '(?P<layer>.+)\\.experts\\.(?P<expert>\\d+)\\.w1\\.weight'
group = "expert"
ops = [{{ op = "stack", dim = {dim} }}]
target = "{{layer}}.w1_stacked"
""",
        "stack.toml",
    )
    plan = build_plan(Checkpoint.open(tmp_path / "src"), [recipe])
    assert plan.tensors["model.layers.0.w1_stacked"].node.splits_rows == (dim == 0)
    execute(plan, tmp_path / "out", chunk_bytes=8)
    got = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.w1_stacked"]
    assert torch.equal(got, torch.stack([experts[f"model.layers.0.experts.{e}.w1.weight"] for e in range(3)], dim=dim))


def test_fusing_experts_copies_bytes_in_any_chunking(mixtral_dir, tmp_path, monkeypatch):
    """Stacking experts and concatenating gate and up rows along dim 0 moves bytes only: with
    chunks of 3 rows of an expert (64-byte rows; I = 16, so rows 15:18 straddle gate and up) the
    fused tensors are torch.stack / torch.cat of the source."""
    out = tmp_path / "out"
    monkeypatch.setenv("MOECONV_CHUNK_BYTES", "192")
    done = CliRunner().invoke(app, ["convert", str(mixtral_dir), str(out), "--preset", "fuse-experts"])
    assert done.exit_code == 0, done.output
    source = {k: v for f in sorted(mixtral_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    written = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert source["model.layers.0.block_sparse_moe.experts.0.w1.weight"].shape == (16, 32)  # the rows the chunks cut
    experts = sorted({int(k.split(".")[5]) for k in source if ".experts." in k})
    for layer in sorted({int(k.split(".")[2]) for k in source if k.startswith("model.layers.")}):
        member = f"model.layers.{layer}.block_sparse_moe.experts.{{}}.{{}}.weight"
        gate_up = torch.stack([torch.cat([source[member.format(e, "w1")], source[member.format(e, "w3")]]) for e in experts])
        down = torch.stack([source[member.format(e, "w2")] for e in experts])
        assert torch.equal(written[f"model.layers.{layer}.mlp.experts.gate_up_proj"].view(torch.uint8), gate_up.view(torch.uint8))
        assert torch.equal(written[f"model.layers.{layer}.mlp.experts.down_proj"].view(torch.uint8), down.view(torch.uint8))


@pytest.mark.parametrize("chunk_bytes", [64, 192, 4096, 1 << 20])
def test_rows_copied_as_bytes_equal_what_the_ops_compute(mixtral_dir, tmp_path, chunk_bytes):
    """stack, concat (fuse-experts) and unstack, split (unfuse-experts): every chunk's source
    byte ranges (Node.pieces) hold exactly what the ops compute with torch, rows split or not."""
    from moeconv.graph import OpNode
    from moeconv.stream import as_bytes, chunks, produce

    fused = tmp_path / "fused"
    execute(build_plan(Checkpoint.open(mixtral_dir), [load_preset("fuse-experts")]), fused)
    for source, preset in ((mixtral_dir, "fuse-experts"), (fused, "unfuse-experts")):
        plan = build_plan(Checkpoint.open(source), [load_preset(preset)])
        moved = [t for t in plan.tensors.values() if isinstance(t.node, OpNode)]
        assert moved and all(t.node.copies_bytes for t in moved)
        for tensor in moved:
            for rows in chunks(tensor, chunk_bytes):
                copied = as_bytes(produce(tensor, rows))
                tensor.node.copies_bytes = False  # the same chunk through the ops
                computed = as_bytes(produce(tensor, rows))
                tensor.node.copies_bytes = True
                assert copied == computed, (preset, tensor.key, rows)


@pytest.mark.parametrize("interrupted_call", [1, 2], ids=["journal", "first-shard"])
def test_an_interrupt_as_a_temp_file_is_created_leaves_no_file(gpt_oss_mxfp4_dir, tmp_path, monkeypatch, interrupted_call):
    """Ctrl-C can land right after a temp file is created, before any code owns it (the open()
    returns late while another thread holds the GIL): the run's cleanup removes it all the same."""
    from moeconv import writer

    real, calls = writer._temp_file, []

    def interrupted(final):
        fd, temp = real(final)
        calls.append(temp)
        if len(calls) == interrupted_call:
            os.close(fd)
            raise KeyboardInterrupt
        return fd, temp

    monkeypatch.setattr(writer, "_temp_file", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        execute(build_plan(Checkpoint.open(gpt_oss_mxfp4_dir), [load_preset("gpt-oss-bf16")]), out)
    assert len(calls) == interrupted_call and sorted(os.listdir(out)) == []
