"""The executor's performance machinery must be invisible in the output: recycled buffers and
several compute threads give the same bytes, errors and report."""

import ctypes
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
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeconv import buffers
from moeconv.cli import app
from moeconv.execute import REPORT_NAME, execute
from moeconv.plan import build_plan
from moeconv.recipe import load_preset, parse_recipe
from moeconv.source import Checkpoint

MiB = 2**20


def test_a_buffer_is_reused_only_once_nothing_refers_to_it():
    with buffers.recycling(8 * MiB):
        a = buffers.empty((MiB,), torch.uint8)
        b = buffers.empty((MiB,), torch.uint8)
        assert a.data_ptr() != b.data_ptr()  # a is still held
        view = a[10:20]
        pointer = a.data_ptr()
        del a
        c = buffers.empty((MiB,), torch.uint8)
        assert c.data_ptr() != pointer  # a view still holds a's storage
        del view
        d = buffers.empty((MiB // 2,), torch.int16)  # same byte size, another dtype and shape
        assert d.data_ptr() == pointer and d.shape == (MiB // 2,) and d.dtype == torch.int16
        b.fill_(1)
        d.fill_(7)
        assert bool((b == 1).all())  # writes to the recycled buffer do not reach a held one
        assert b.data_ptr() not in (c.data_ptr(), d.data_ptr())


def test_byte_windows_share_the_pool_with_tensors_and_are_page_aligned():
    """Pass-through copies read into `window()`s (no torch); a window nobody holds is reused by a
    tensor, and a held one never is."""
    with buffers.recycling(8 * MiB):
        window = buffers.window(2 * MiB)
        address = ctypes.addressof(ctypes.c_char.from_buffer(window))
        assert address % 4096 == 0 and window.nbytes == 2 * MiB and not window.readonly
        part = window[100:200]
        del window
        assert buffers.empty((2 * MiB,), torch.uint8).data_ptr() != address  # `part` still holds it
        del part
        assert buffers.empty((MiB,), torch.int16).data_ptr() == address


def test_recycling_respects_its_budget_and_ends_with_the_block():
    with buffers.recycling(3 * MiB):
        held = [buffers.empty((MiB,), torch.uint8) for _ in range(5)]  # 2 past the budget: plain torch.empty
        pointers = [t.data_ptr() for t in held]
        del held
        again = [buffers.empty((MiB,), torch.uint8) for _ in range(3)]
        assert {t.data_ptr() for t in again} <= set(pointers[:3])
    assert buffers._maps == [] and buffers._budget == 0  # the pool let go; `again` alone keeps its memory
    assert buffers.empty((MiB // 4,), torch.float32).shape == (MiB // 4,)  # small or outside: torch.empty


def test_idle_buffers_of_other_sizes_make_room_whatever_their_place_in_the_pool():
    with buffers.recycling(6 * MiB):
        held = buffers.empty((MiB,), torch.uint8)  # first in the pool, and kept busy
        idle = buffers.empty((4 * MiB,), torch.uint8)
        del idle
        wanted = buffers.empty((3 * MiB // 2,), torch.uint8)  # 4 MiB is over twice that: the idle one goes
        assert wanted.numel() == 3 * MiB // 2 and held.numel() == MiB
        assert [len(buffer) for buffer in buffers._maps] == [MiB, 3 * MiB // 2]


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
    shard = next(path for path in sorted(source.glob("*.safetensors")) if any(k.endswith("down_proj_scales") for k in load_file(path)))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("down_proj_scales"))
    tensors[key] = torch.full_like(tensors[key], 127 + 20)  # 2**20 * 6: far beyond fp16
    save_file(tensors, shard, metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "out"), "-p", "gpt-oss-bf16", "--dtype", "fp16"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "overflow fp16" in lines[0] and key.removesuffix("_scales") in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "moeconv-report.json").exists()


def test_convert_writes_the_same_report_as_the_dry_run_shows(gpt_oss_mxfp4_dir, tmp_path):
    runner = CliRunner()
    dry = runner.invoke(app, ["convert", str(gpt_oss_mxfp4_dir), str(tmp_path / "out"), "-p", "gpt-oss-bf16", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    done = runner.invoke(app, ["convert", str(gpt_oss_mxfp4_dir), str(tmp_path / "out"), "-p", "gpt-oss-bf16"])
    assert done.exit_code == 0, done.output
    written = json.loads((tmp_path / "out" / "moeconv-report.json").read_text())
    planned = json.loads(dry.stdout)
    for field in ("checked", "ok", "consumer", "missing", "unexpected", "mismatched", "conversion_errors"):
        assert written[field] == planned[field], field
    assert written["checked"] and written["ok"]


def test_the_data_path_does_not_wait_for_the_load_report(gpt_oss_mxfp4_dir, tmp_path):
    """Every shard is written while the report is still pending; the report file comes once it is ready."""
    plan = build_plan(Checkpoint.open(gpt_oss_mxfp4_dir), [load_preset("gpt-oss-bf16")])
    ready, plan.load_report = plan.load_report, Future()
    out = tmp_path / "out"
    worker = threading.Thread(target=execute, args=(plan, out), daemon=True)
    worker.start()
    shards = [out / layout.name for layout in plan.shards]
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in shards) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(path.exists() for path in shards) and worker.is_alive()
    assert not (out / REPORT_NAME).exists()
    plan.load_report.set_result(ready)
    worker.join(timeout=120)
    assert json.loads((out / REPORT_NAME).read_text())["consumer"] == ready.consumer


def test_a_real_process_prints_all_its_json_and_exits_0(gpt_oss_mxfp4_dir, tmp_path):
    """`main()` ends the process with os._exit: stdout must still be complete on a pipe, and the
    background report must be in the output."""
    proc = subprocess.run(
        [sys.executable, "-m", "moeconv", "convert", str(gpt_oss_mxfp4_dir), str(tmp_path / "out"), "-p", "gpt-oss-bf16", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["checked"] and printed["ok"] and printed["consumer"].startswith("transformers ")
    assert printed == json.loads((tmp_path / "out" / REPORT_NAME).read_text())


def test_a_failed_conversion_stops_the_report_child(gpt_oss_mxfp4_dir, tmp_path):
    import multiprocessing

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    result = CliRunner().invoke(app, ["convert", str(gpt_oss_mxfp4_dir), str(out), "-p", "gpt-oss-bf16"])
    assert result.exit_code == 1 and "not empty" in result.stderr
    assert multiprocessing.active_children() == []  # killed and reaped, not left computing


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


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness and the report child are Linux-only")
def test_the_conversion_threads_give_way_to_a_pending_report_child(gpt_oss_mxfp4_dir, tmp_path, monkeypatch):
    """While the load report is computed in its child, compute threads run at a lower CPU priority;
    with the report already there, at the caller's."""
    from moeconv import execute as execution
    from moeconv.report_process import BackgroundReport

    seen: list[int] = []

    def produce(tensor, rows):
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))  # this thread's niceness (Linux)
        return original(tensor, rows)

    original = execution._produce
    monkeypatch.setattr(execution, "_produce", produce)
    monkeypatch.setenv("MOECONV_THREADS", "2")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    background = BackgroundReport()
    plan = build_plan(Checkpoint.open(gpt_oss_mxfp4_dir), [load_preset("gpt-oss-bf16")], background_report=background)
    assert plan.report_pending
    execute(plan, tmp_path / "pending")
    assert not plan.report_pending and plan.report.ok()
    assert seen and set(seen) == {min(base + execution.YIELD_TO_REPORT, 19)}
    seen.clear()
    execute(build_plan(Checkpoint.open(gpt_oss_mxfp4_dir), [load_preset("gpt-oss-bf16")]), tmp_path / "ready")
    assert seen and set(seen) == {base}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller's own thread is untouched


RENAME_ONLY = """
[[rule]]
name = "rename"
match = 'model\\.(?P<rest>.+)'
target = "backbone.{rest}"
"""

NO_TORCH_RUN = """
import sys
from typer.testing import CliRunner
from moeconv.cli import app
result = CliRunner().invoke(app, ["convert", *sys.argv[1:]])
assert result.exit_code == 0, result.output
print(sorted(name for name in sys.modules if name.split(".")[0] == "torch"))
"""


def test_a_conversion_that_only_copies_bytes_never_imports_torch(mixtral_dir, tmp_path):
    """Planning is pure Python and pass-through tensors are copied as bytes, so a rename-only
    conversion runs without torch in the process (the load report's child imports it, not us);
    small chunks make every tensor take several byte windows, and the output is the source's bytes."""
    recipe = tmp_path / "rename.toml"
    recipe.write_text(RENAME_ONLY)
    out = tmp_path / "out"
    env = {**os.environ, "MOECONV_CHUNK_BYTES": "4096"}
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_RUN, str(mixtral_dir), str(out), "--recipe", str(recipe)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"
    source = {k: v for f in sorted(mixtral_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    written = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    renamed = {("backbone." + k[len("model."):] if k.startswith("model.") else k): v for k, v in source.items()}
    assert written.keys() == renamed.keys()
    for key, tensor in renamed.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key].view(torch.uint8), tensor.view(torch.uint8)), key
    assert json.loads((out / REPORT_NAME).read_text())["consumer"].startswith("transformers ")


def test_fusing_experts_copies_bytes_without_torch(mixtral_dir, tmp_path):
    """Stacking experts and concatenating gate and up rows along dim 0 moves bytes only: the
    conversion runs without torch in the process, and with chunks of 3 rows of an expert (64-byte
    rows; I = 16, so rows 15:18 straddle gate and up) the fused tensors are torch.stack / torch.cat
    of the source."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_RUN, str(mixtral_dir), str(out), "--preset", "fuse-experts"],
        capture_output=True, text=True, env={**os.environ, "MOECONV_CHUNK_BYTES": "192", "XDG_CACHE_HOME": str(cache)}, timeout=300,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"
    # torch's import hint, then, is learnt by the load report's child, the one process that imports it
    learnt = next((cache / "moeconv").glob("torch-imports-*.txt")).read_text().splitlines()
    assert os.path.join(os.path.dirname(torch.__file__), "__init__.py") in learnt
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
    from moeconv import execute as executing
    from moeconv.graph import OpNode
    from moeconv.verify import _as_bytes

    fused = tmp_path / "fused"
    execute(build_plan(Checkpoint.open(mixtral_dir), [load_preset("fuse-experts")]), fused)
    for source, preset in ((mixtral_dir, "fuse-experts"), (fused, "unfuse-experts")):
        plan = build_plan(Checkpoint.open(source), [load_preset(preset)])
        moved = [t for t in plan.tensors.values() if isinstance(t.node, OpNode)]
        assert moved and all(t.node.copies_bytes for t in moved)
        for tensor in moved:
            for rows in executing._chunks(tensor, chunk_bytes):
                as_bytes = _as_bytes(executing._produce(tensor, rows))
                tensor.node.copies_bytes = False  # the same chunk through the ops
                computed = _as_bytes(executing._produce(tensor, rows))
                tensor.node.copies_bytes = True
                assert as_bytes == computed, (preset, tensor.key, rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_torch_libraries_load_before_the_import_without_importing_it():
    """The early import's first step maps torch's native libraries through ctypes (which lets go
    of the GIL), and imports nothing: `import torch` then finds them loaded."""
    script = (
        "import sys\nfrom moeconv import execute\nexecute._load_torch_libraries()\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('libtorch_cpu.so' in maps, 'libtorch_python.so' in maps, 'torch' in sys.modules)\n"
        "import torch\nprint(torch.ones(2).sum().item())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "False", "2.0"]


TORCH_HINT_RUN = """
import json, sys
from moeconv import execute, import_hint
seen, threads = [], []
def prefetch(files, at_once=1):  # what the early import reads ahead, and how many files at once
    seen.extend(files)
    threads.append(at_once)
import_hint.prefetch = prefetch
execute._import_kernels()
print(json.dumps({"prefetched": seen, "threads": threads, "hint": import_hint.read(import_hint.TORCH)}))
"""


def test_the_early_import_records_what_torch_read_and_the_next_one_reads_it_ahead(monkeypatch, tmp_path):
    """Fresh processes (here torch is imported already): the first records torch's module files
    (not the libraries it maps, measured slower), the next prefetches exactly that list and,
    reading the same files, leaves it as it is."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = json.loads(subprocess.run([sys.executable, "-c", TORCH_HINT_RUN], capture_output=True, text=True, check=True, timeout=300).stdout)
    files = first["hint"]
    assert first["prefetched"] == [] and first["threads"] == []  # nothing recorded yet
    package = os.path.dirname(torch.__file__)
    assert os.path.join(package, "__init__.py") in files and any(f.startswith(package) and f.endswith(".pyc") for f in files)
    assert not any(f"{os.sep}lib{os.sep}libtorch" in f for f in files)
    assert all(os.path.isfile(f) for f in files) and len(set(files)) == len(files)
    hint = next((tmp_path / "moeconv").glob("torch-imports-*.txt"))
    written = hint.stat().st_mtime_ns
    second = json.loads(subprocess.run([sys.executable, "-c", TORCH_HINT_RUN], capture_output=True, text=True, check=True, timeout=300).stdout)
    assert second == {"prefetched": files, "threads": [1], "hint": files}  # one at a time (see execute._import_kernels)
    assert hint.stat().st_mtime_ns == written


def test_a_hint_learns_what_it_lacks_and_drops_what_is_gone(monkeypatch, tmp_path):
    """Two processes learn torch's import (the conversion and the report child) from their own
    points of view: the hint keeps the union, so neither rewrites it on every run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from moeconv import import_hint

    a, b, c = (tmp_path / name for name in "abc")
    for file in (a, b, c):
        file.write_text("x")
    import_hint.learn("t", [str(a), str(b)], [])
    assert import_hint.read("t") == [str(a), str(b)]
    path = import_hint.hint_path("t")
    written = path.stat().st_mtime_ns
    import_hint.learn("t", [str(b)], import_hint.read("t"))  # the other process's view: nothing new
    assert path.stat().st_mtime_ns == written
    b.unlink()
    import_hint.learn("t", [str(c)], import_hint.read("t"))
    assert import_hint.read("t") == [str(a), str(c)]


def test_an_early_import_after_torch_was_imported_leaves_the_hint_alone(monkeypatch, tmp_path):
    """A library caller that imported torch itself: nothing to read ahead, nothing to learn."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from moeconv import execute as executing, import_hint

    import_hint.write(import_hint.TORCH, ["/nonexistent/torch/__init__.py"])
    prefetched = []
    monkeypatch.setattr(import_hint, "prefetch", lambda files, threads=1: prefetched.extend(files))
    executing._import_kernels()
    assert prefetched == [] and import_hint.read(import_hint.TORCH) == ["/nonexistent/torch/__init__.py"]


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
