"""Hostile input, failed and interrupted runs, --resume, reproducible output: end to end through
`moeconv convert` (CliRunner on moeconv.cli.app, and real `python -m moeconv` subprocesses where a
traceback, a signal or a resource limit is the point).

Every failure must be exit 1 (130/143 for SIGINT/SIGTERM) with ONE error line on stderr naming the
file or key and the problem (the last line: a run that had started writing printed its plan and
progress before it), and leave nothing in OUT that looks complete: no report, no index, no
final-named shard, no temp file.
"""

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors_bytes as sb
from output_lines import error_line
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.errors import WriteError
from moeconv.execute import _BackgroundWriter
from moeconv.format import INDEX_NAME
from moeconv.output import JOURNAL_NAME, REPORT_NAME
from moeconv.writer import ShardWriter

REPO = Path(__file__).resolve().parents[1]


def convert(*args) -> "CliRunner.Result":
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def leftovers(out: Path) -> list[str]:
    """Anything in OUT that looks complete or half-written (staged shards are hidden on purpose)."""
    if not out.exists():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if p.name in (REPORT_NAME, INDEX_NAME) or p.name.endswith(".safetensors") or p.name.endswith(".tmp")
    )


def assert_clean_failure(result, out: Path, *needles: str, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    line = error_line(result.stderr)
    for needle in needles:
        assert needle in line, line
    assert leftovers(out) == []
    return line


# ---- forging bad checkpoints ------------------------------------------------------------------------


@pytest.fixture
def single(mixtral_dir, tmp_path) -> Path:
    return Path(shutil.copytree(mixtral_dir, tmp_path / "src"))


@pytest.fixture
def gpt_oss(gpt_oss_mxfp4_dir, tmp_path) -> Path:
    return Path(shutil.copytree(gpt_oss_mxfp4_dir, tmp_path / "src"))


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def rewrite_header(path: Path, change) -> None:
    header, data = split_file(path)
    change(header)
    sb.write(path, header, data)


def first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def shard(folder: Path, n: int) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[n]


def edit_index(folder: Path, change) -> None:
    path = folder / INDEX_NAME
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


def drop_keys(folder: Path, keep) -> None:
    """Remove tensors (and their index entries) for which keep(key) is False."""
    for path in folder.glob("*.safetensors"):
        tensors = load_file(str(path))
        save_file({k: v for k, v in tensors.items() if keep(k)}, str(path), metadata={"format": "pt"})
    if (folder / INDEX_NAME).exists():
        edit_index(folder, lambda m: [m.pop(k) for k in list(m) if not keep(k)])


def _truncate(src):
    path = shard(src, 1)
    path.write_bytes(path.read_bytes()[:-10])
    return path.name, "truncated"


def _header_beyond_file(src):
    path = shard(src, 0)
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return path.name, "beyond the file size"


def _header_over_cap(src):
    path = shard(src, 0)
    path.write_bytes(struct.pack("<Q", 200_000_000) + path.read_bytes()[8:])
    return path.name, "over the 100000000-byte limit"


def _header_not_object(src):
    sb.write(shard(src, 2), "[1, 2, 3]")
    return shard(src, 2).name, "not an object"


def _unknown_dtype(src):
    def change(h):
        h[first_tensor(h)]["dtype"] = "Q7"

    rewrite_header(shard(src, 0), change)
    return "Q7", "unsupported dtype"


def _shape_mismatch(src):
    key = []

    def change(h):
        key.append(first_tensor(h))
        h[key[0]]["shape"] = [h[key[0]]["shape"][0] + 1, *h[key[0]]["shape"][1:]]

    rewrite_header(shard(src, 1), change)
    return key[0], "bytes but data_offsets"


def _overlap(src):
    def change(h):
        keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        begin, end = h[keys[1]]["data_offsets"]
        h[keys[1]]["data_offsets"] = [begin - 2, end - 2]

    rewrite_header(shard(src, 0), change)
    return shard(src, 0).name, "overlap"


def _gap(src):
    def change(h):
        keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        begin, end = h[keys[1]]["data_offsets"]
        h[keys[1]]["data_offsets"] = [begin + 2, end + 2]

    rewrite_header(shard(src, 0), change)
    return shard(src, 0).name, "hole"


def _index_missing_shard(src):
    edit_index(src, lambda m: m.update({k: "model-00009-of-00009.safetensors" for k in list(m)[:1]}))
    return "model-00009-of-00009.safetensors", "missing"


def _index_dotdot(src):
    edit_index(src, lambda m: m.update({k: "../elsewhere.safetensors" for k in list(m)[:1]}))
    return "../elsewhere.safetensors", "outside the checkpoint folder"


def _index_absolute(src):
    edit_index(src, lambda m: m.update({k: "/etc/passwd" for k in list(m)[:1]}))
    return "/etc/passwd", "outside the checkpoint folder"


def _index_key_not_in_shard(src):
    edit_index(src, lambda m: m.update({"model.phantom.weight": shard(src, 0).name}))
    return "model.phantom.weight", "lacks it"


def _key_in_two_shards(src):
    (src / INDEX_NAME).unlink()  # loaders then read every root-level file
    a = load_file(str(shard(src, 0)))
    b = load_file(str(shard(src, 1)))
    key = next(iter(a))
    save_file({**b, key: a[key]}, str(shard(src, 1)), metadata={"format": "pt"})
    return key, "is also in"


def _group_missing_expert(src):
    drop_keys(src, lambda k: ".layers.1.block_sparse_moe.experts.2." not in k)
    return "expert 2 missing", "layer=model.layers.1"


HOSTILE = {
    "truncated shard": _truncate,
    "header length beyond the file": _header_beyond_file,
    "header length over 100 MB": _header_over_cap,
    "header not a JSON object": _header_not_object,
    "unknown dtype": _unknown_dtype,
    "shape x itemsize != byte range": _shape_mismatch,
    "overlapping offsets": _overlap,
    "gapped offsets": _gap,
    "index names a missing shard": _index_missing_shard,
    "index path with ..": _index_dotdot,
    "index absolute path": _index_absolute,
    "index key its shard lacks": _index_key_not_in_shard,
    "key in two shards": _key_in_two_shards,
    "group missing an expert": _group_missing_expert,
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_checkpoint_is_one_clean_line(case, sharded, tmp_path):
    needles = HOSTILE[case](sharded)
    out = tmp_path / "out"
    assert_clean_failure(convert(sharded, out, "-p", "fuse-experts"), out, *needles)
    assert not out.exists()  # refused before anything was created


def test_mxfp4_blocks_without_scales(gpt_oss, tmp_path):
    key = "model.layers.1.mlp.experts.down_proj_scales"
    drop_keys(gpt_oss, lambda k: k != key)
    out = tmp_path / "out"
    assert_clean_failure(
        convert(gpt_oss, out, "-p", "gpt-oss-bf16"), out, "model.layers.1.mlp.experts.down_proj_blocks", "no partner", "scales"
    )


def test_mxfp4_blocks_and_scales_shapes_disagree(gpt_oss, tmp_path):
    key = "model.layers.0.mlp.experts.gate_up_proj_scales"
    index = json.loads((gpt_oss / INDEX_NAME).read_text())["weight_map"]
    path = gpt_oss / index[key]
    tensors = load_file(str(path))
    tensors[key] = tensors[key][..., :-1].clone()  # one scale short per row: [E, 2I, H/32 - 1]
    save_file(tensors, str(path), metadata={"format": "pt"})
    out = tmp_path / "out"
    line = assert_clean_failure(convert(gpt_oss, out, "-p", "gpt-oss-bf16"), out, "model.layers.0.mlp.experts.gate_up_proj")
    assert "dequantize" in line or "scales" in line


def test_recipe_regex_that_does_not_compile(single, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[[rule]]\nname = 'broken'\nmatch = '(?P<x>unclosed'\ntarget = '{x}'\n")
    out = tmp_path / "out"
    assert_clean_failure(convert(single, out, "-r", recipe), out, "bad.toml", "broken", "regex does not compile")


def test_out_equal_to_or_inside_src(single):
    for out in (single, single / "sub" / "out"):
        result = convert(single, out, "-p", "fuse-experts")
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "inside it" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (single / "sub").exists()
    assert not (single / REPORT_NAME).exists()


def test_out_not_empty_refused_unless_overwrite(single, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = convert(single, out, "-p", "fuse-experts")
    assert result.exit_code == 1 and "--overwrite" in result.stderr and "--resume" not in result.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert convert(single, out, "-p", "fuse-experts", "--overwrite").exit_code == 0
    assert (out / REPORT_NAME).exists()


def test_overwrite_replaces_the_old_shards_and_leftovers(single, tmp_path):
    """The old report and index go first, then every old shard and temp file: the new output is
    whole and nothing of the old one is left beside it."""
    out = tmp_path / "out"
    assert convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB").exit_code == 0
    old = sorted(p.name for p in out.glob("*.safetensors"))
    (out / ".model.safetensors.1234.tmp").write_bytes(b"half")
    assert convert(single, out, "-p", "fuse-experts", "--overwrite").exit_code == 0
    assert len(old) >= 2 and sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob(".*.tmp")) and load_file(out / "model.safetensors").keys()
    assert json.loads((out / REPORT_NAME).read_text())["shards"][0]["name"] == "model.safetensors"


def test_an_old_file_that_cannot_be_deleted_is_a_one_line_error(single, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB").exit_code == 0
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name.startswith("model-00001"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    result = convert(single, out, "-p", "fuse-experts", "--overwrite")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert "model-00001-of-" in line and "cannot delete this file of the replaced output: Permission denied" in line
    assert not (out / REPORT_NAME).exists() and not (out / INDEX_NAME).exists()  # the old output no longer looks complete


# ---- failures while writing -------------------------------------------------------------------------


def _fail_in_shard(monkeypatch, name_part: str):
    real = ShardWriter.write

    def write(self, key, data):
        if name_part in self.layout.name:
            raise WriteError(f"{self.final}: write failed: No space left on device")
        return real(self, key, data)

    monkeypatch.setattr(ShardWriter, "write", write)


def test_failure_in_shard_2_leaves_nothing_final_and_resume_completes_it(single, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    assert convert(single, reference, "-p", "fuse-experts", "--max-shard-size", "20KB").exit_code == 0
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(shards) >= 3

    out = tmp_path / "out"
    _fail_in_shard(monkeypatch, "00002-of")
    result = convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB")
    line = assert_clean_failure(result, out, "No space left on device", "--resume")
    assert "1 finished shard(s)" in line
    assert (out / JOURNAL_NAME).exists() and (out / f".{shards[0]}.staged").exists()

    again = convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB")  # no --resume
    assert again.exit_code == 1 and "--resume" in again.stderr

    monkeypatch.undo()
    inode = (out / f".{shards[0]}.staged").stat().st_ino
    assert convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB", "--resume").exit_code == 0
    assert (out / shards[0]).stat().st_ino == inode  # kept, not rewritten
    assert_same_folder(reference, out)


def test_failure_in_first_shard_leaves_an_empty_folder(single, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_in_shard(monkeypatch, "model")
    result = convert(single, out, "-p", "fuse-experts")
    line = assert_clean_failure(result, out, "No space left on device")
    assert "--resume" not in line
    assert list(out.iterdir()) == []  # no journal either: nothing to resume


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_shards_are_fsynced_once_at_the_end_before_any_final_name(single, tmp_path, monkeypatch):
    """One disk flush per run, not one per shard: no shard is fsynced while another is being
    written, and every shard is fsynced before the first gets its final name."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_init = os.fsync, os.replace, ShardWriter.__init__

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, **kwargs)

    def init(self, out_dir, layout, *args, **kwargs):
        events.append(("open", layout.name))
        return real_init(self, out_dir, layout, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(ShardWriter, "__init__", init)
    out = tmp_path / "out"
    assert convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB").exit_code == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3
    synced = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and path.endswith(".safetensors.staged")]
    assert sorted(Path(events[i][1]).name for i in synced) == [f".{name}.staged" for name in shards]  # each once
    last_open = max(i for i, (kind, _) in enumerate(events) if kind == "open")
    first_final = min(i for i, (kind, path) in enumerate(events) if kind == "replace" and Path(path).name in shards)
    assert last_open < min(synced) and max(synced) < first_final
    assert (out / REPORT_NAME).exists()


def test_file_size_limit_in_a_real_process(single, tmp_path):
    out = tmp_path / "out"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run(
        [sys.executable, "-m", "moeconv", "convert", str(single), str(out), "-p", "fuse-experts"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    assert "File too large" in line and "model.safetensors" in line
    assert leftovers(out) == [] and not (out / JOURNAL_NAME).exists()


def test_hostile_input_in_a_real_process_has_no_traceback(sharded, tmp_path):
    name, _ = _truncate(sharded)
    proc = subprocess.run(
        [sys.executable, "-m", "moeconv", "convert", str(sharded), str(tmp_path / "out"), "-p", "fuse-experts"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert name in line and "truncated" in line


# ---- signals and --resume ---------------------------------------------------------------------------


def start_slow(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A real conversion slowed to ~one 64-byte row per 20 ms, so it is mid-write for seconds."""
    env = {**os.environ, "MOECONV_CHUNK_BYTES": "64", "MOECONV_CHUNK_DELAY": "0.02"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moeconv",
            "convert",
            str(src),
            str(out),
            "-p",
            "fuse-experts",
            "--max-shard-size",
            "20KB",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # A test run started in the background (`cmd &` in a script) ignores SIGINT, and so would this
        # child, as Unix intends: give it the default, as from a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
        assert time.monotonic() < deadline, "conversion never got there"
        time.sleep(0.02)


def journaled(out: Path) -> int:
    try:
        return len(json.loads((out / JOURNAL_NAME).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def temp_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.tmp")) if out.exists() else []


def test_the_background_writer_closes_after_a_put_interrupted_midway():
    """Ctrl-C can land in put() after it took the waiting chunk's lock and before it queued the
    chunk: close() must still end the writer thread (it once hung there, the writer asleep)."""
    written = []

    class Recording:
        def write(self, key, chunk):
            written.append((key, bytes(chunk)))

    background = _BackgroundWriter(Recording(), None, "shard")
    background.put("a", memoryview(b"1"))
    background.waiting.acquire()  # what the interrupted put leaves: the lock taken, nothing queued
    closing = threading.Thread(target=background.close, daemon=True)
    closing.start()
    closing.join(timeout=60)
    assert not closing.is_alive() and not background.thread.is_alive()
    assert written == [("a", b"1")]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_write_removes_temp_files(single, tmp_path, sig, code):
    out = tmp_path / "out"
    proc = start_slow(single, out)
    wait_for(lambda: temp_files(out), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    line = error_line(err)
    assert signal.Signals(sig).name in line
    assert leftovers(out) == []


def test_kill_9_then_resume_is_byte_identical(single, tmp_path):
    reference = tmp_path / "reference"
    assert convert(single, reference, "-p", "fuse-experts", "--max-shard-size", "20KB").exit_code == 0

    out = tmp_path / "out"
    proc = start_slow(single, out)
    wait_for(lambda: journaled(out) >= 1 and temp_files(out), proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert [n for n in leftovers(out) if not n.endswith(".tmp")] == []  # kill -9 cannot clean, but nothing looks complete
    kept = json.loads((out / JOURNAL_NAME).read_text())["shards"]
    inodes = {name: (out / f".{name}.staged").stat().st_ino for name in kept}

    refused = convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB")
    assert refused.exit_code == 1 and "--resume" in refused.stderr
    other = convert(single, out, "-p", "fuse-experts", "--max-shard-size", "30KB", "--resume")
    assert other.exit_code == 1 and "--overwrite" in other.stderr  # another plan: not resumable

    result = convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB", "--resume")
    assert result.exit_code == 0, result.output
    assert {name: (out / name).stat().st_ino for name in kept} == inodes
    assert temp_files(out) == [] and not (out / JOURNAL_NAME).exists()
    assert_same_folder(reference, out)


def test_resume_redoes_a_kept_shard_whose_bytes_changed(single, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    assert convert(single, reference, "-p", "fuse-experts", "--max-shard-size", "20KB").exit_code == 0
    out = tmp_path / "out"
    _fail_in_shard(monkeypatch, "00003-of")
    assert convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB").exit_code == 1
    monkeypatch.undo()
    staged = sorted(out.glob(".*.staged"))
    assert len(staged) == 2
    raw = bytearray(staged[0].read_bytes())
    raw[-1] ^= 0xFF
    staged[0].write_bytes(bytes(raw))
    (out / ".model-00003-of-00003.safetensors.abc.tmp").write_bytes(b"stale")
    assert convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB", "--resume").exit_code == 0
    assert temp_files(out) == []
    assert_same_folder(reference, out)


def test_journal_records_the_algorithm_and_each_shards_checksum(single, tmp_path, monkeypatch):
    import hashlib

    import xxhash

    digest = {"xxh3-128": lambda b: xxhash.xxh3_128(b).hexdigest(), "sha256": lambda b: hashlib.sha256(b).hexdigest()}
    for algorithm in digest:
        out = tmp_path / algorithm
        _fail_in_shard(monkeypatch, "00003-of")
        assert convert(single, out, "-p", "fuse-experts", "--max-shard-size", "20KB", "--checksum", algorithm).exit_code == 1
        monkeypatch.undo()
        journal = json.loads((out / JOURNAL_NAME).read_text())
        assert journal["algorithm"] == algorithm and len(journal["shards"]) == 2
        for name, entry in journal["shards"].items():
            data = (out / f".{name}.staged").read_bytes()
            assert entry == {"size": len(data), "checksum": digest[algorithm](data)}, name


@pytest.mark.parametrize("first, then", [("xxh3-128", "sha256"), ("sha256", "xxh3-128")])
def test_resume_with_another_checksum_is_refused_and_overwrite_redoes_every_shard(single, tmp_path, monkeypatch, first, then):
    args = ("-p", "fuse-experts", "--max-shard-size", "20KB")
    reference = tmp_path / "reference"
    assert convert(single, reference, *args, "--checksum", then).exit_code == 0
    out = tmp_path / "out"
    _fail_in_shard(monkeypatch, "00003-of")
    assert convert(single, out, *args, "--checksum", first).exit_code == 1
    monkeypatch.undo()
    staged = sorted(out.glob(".*.staged"))
    assert len(staged) == 2
    for path in staged:
        os.utime(path, (1_000_000, 1_000_000))  # a kept shard would keep this mtime
    before = folder_bytes(out)

    refused = convert(single, out, *args, "--checksum", then, "--resume")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    (line,) = refused.stderr.strip().splitlines()
    assert f"checksummed its shards with {first}, not {then}" in line
    assert f"--checksum {first}" in line and "--overwrite" in line
    assert folder_bytes(out) == before  # refused before touching anything

    result = convert(single, out, *args, "--checksum", then, "--resume", "--overwrite")
    assert result.exit_code == 0, result.output
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 3 and all(p.stat().st_mtime != 1_000_000 for p in shards)  # none kept
    assert_same_folder(reference, out)
    assert json.loads((out / REPORT_NAME).read_text())["checksums"]["algorithm"] == then


def test_resume_with_the_same_checksum_keeps_sha256_shards(single, tmp_path, monkeypatch):
    args = ("-p", "fuse-experts", "--max-shard-size", "20KB", "--checksum", "sha256")
    reference = tmp_path / "reference"
    assert convert(single, reference, *args).exit_code == 0
    out = tmp_path / "out"
    _fail_in_shard(monkeypatch, "00003-of")
    assert convert(single, out, *args).exit_code == 1
    monkeypatch.undo()
    for path in out.glob(".*.staged"):
        os.utime(path, (1_000_000, 1_000_000))
    assert convert(single, out, *args, "--resume").exit_code == 0
    kept = [p.name for p in sorted(out.glob("*.safetensors")) if p.stat().st_mtime == 1_000_000]
    assert kept == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"]
    assert_same_folder(reference, out)


def test_resume_without_a_journal(single, tmp_path):
    out = tmp_path / "out"
    assert convert(single, out, "-p", "fuse-experts", "--resume").exit_code == 0  # empty OUT: a plain run
    again = convert(single, out, "-p", "fuse-experts", "--resume")
    assert again.exit_code == 1 and "nothing to resume" in again.stderr


# ---- reproducible output ----------------------------------------------------------------------------


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same_folder(a: Path, b: Path) -> None:
    left, right = folder_bytes(a), folder_bytes(b)
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name] == right[name], name


@pytest.mark.parametrize("preset, fixture", [("fuse-experts", "sharded_mixtral_dir"), ("gpt-oss-bf16", "gpt_oss_mxfp4_dir")])
def test_same_input_gives_byte_identical_output_from_any_folder(preset, fixture, request, tmp_path, monkeypatch):
    source = request.getfixturevalue(fixture)
    for run in ("a", "b"):
        shutil.copytree(source, tmp_path / run / "ckpt")
        monkeypatch.chdir(tmp_path / run)
        assert convert("ckpt", "out", "-p", preset, "--max-shard-size", "40KB").exit_code == 0
    assert_same_folder(tmp_path / "a" / "out", tmp_path / "b" / "out")
    report = json.loads((tmp_path / "a" / "out" / REPORT_NAME).read_text())
    assert report["source"] == "ckpt"
    assert str(tmp_path) not in (tmp_path / "a" / "out" / REPORT_NAME).read_text()
    for path in (tmp_path / "a" / "out").glob("*.safetensors"):
        header, _ = split_file(path)
        assert header["__metadata__"]["format"] == "pt"  # and provenance that names no folder
        assert str(tmp_path) not in json.dumps(header["__metadata__"]) and "moeconv.recipes" in header["__metadata__"]


def test_report_xxh3_hashed_while_writing_matches_the_files(sharded_mixtral_dir, tmp_path):
    import xxhash

    out = tmp_path / "out"
    assert convert(sharded_mixtral_dir, out, "-p", "fuse-experts", "--max-shard-size", "20KB").exit_code == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert "sha256" not in report and report["checksums"]["algorithm"] == "xxh3-128"
    files = report["checksums"]["files"]
    assert set(files) == {p.name for p in out.iterdir()} - {REPORT_NAME}
    assert len([n for n in files if n.endswith(".safetensors")]) >= 3
    for name, digest in files.items():
        assert xxhash.xxh3_128((out / name).read_bytes()).hexdigest() == digest, name
