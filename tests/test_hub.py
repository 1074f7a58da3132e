"""Hub repo ids through huggingface_hub's real code, without network.

A huggingface_hub cache is laid out on disk as huggingface_hub writes it
(`models--org--name/{blobs,refs,snapshots/<commit>/...}`, snapshot files symlinked to blobs) and
HF_HUB_OFFLINE is set both in the environment and in huggingface_hub.constants (read at import).
The online dry run is tested by replacing HfApi's own `model_info` / `get_safetensors_metadata` with
functions returning huggingface_hub's real objects built from a fixture's headers; the endpoint
points at a closed port so any request that slipped through fails instead of reaching a network.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelInfo, constants
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
from output_lines import error_line
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.format import INDEX_NAME
from moeconv.source import Checkpoint, read_header

REPO = "acme/tiny-gpt-oss"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
GARBAGE = b"\xde\xad not a safetensors file: reading this must fail \xbe\xef"


def convert(*args) -> "object":
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def add_snapshot(cache: Path, repo_id: str, commit: str, folder: Path, refs: tuple[str, ...] = ()) -> Path:
    """Put `folder` in the cache as huggingface_hub does: content-addressed blobs, a snapshot of
    relative symlinks, refs/<name> holding the commit. Files under original/ and metal/ become garbage."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for file in sorted(folder.rglob("*")):
        if not file.is_file():
            continue
        relative = file.relative_to(folder)
        data = GARBAGE if relative.parts[0] in ("original", "metal") else file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty huggingface_hub cache under HF_HOME, offline, with the endpoint on a closed port."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in (
        ("HF_HOME", home),
        ("HF_HUB_CACHE", cache),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_ENDPOINT", "http://127.0.0.1:9"),
    ):
        monkeypatch.setenv(name, str(value))
    # huggingface_hub reads these at import: patch what its code actually consults.
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


@pytest.fixture
def cached_repo(hf_cache, gpt_oss_mxfp4_dir) -> Path:
    """REPO at COMMIT_A = the tiny gpt-oss MXFP4 fixture (original/ + metal/ are garbage), refs/main."""
    return add_snapshot(hf_cache, REPO, COMMIT_A, gpt_oss_mxfp4_dir, refs=("main",))


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """Each shard's data buffer and its header's tensor entries (a hub source also names itself in
    the header's provenance metadata: `moeconv.source`, the only difference)."""
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        data = path.read_bytes()
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
        header["__metadata__"].pop("moeconv.source", None)
        found[path.name] = json.dumps(header, sort_keys=True).encode() + data[8 + length :]
    return found


def test_offline_repo_id_converts_like_the_local_folder(cached_repo, gpt_oss_mxfp4_dir, tmp_path):
    local = tmp_path / "local"
    shutil.copytree(gpt_oss_mxfp4_dir, local)
    assert convert(local, tmp_path / "from-local", "-p", "gpt-oss-bf16").exit_code == 0
    result = convert(REPO, tmp_path / "from-hub", "-p", "gpt-oss-bf16")
    assert result.exit_code == 0, result.output
    assert shard_bytes(tmp_path / "from-hub") == shard_bytes(tmp_path / "from-local")
    hub_header = json.loads((tmp_path / "from-hub" / "model.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    assert hub_header["__metadata__"]["moeconv.source"] == f"{REPO}@{COMMIT_A[:12]}"
    names = {p.name for p in (tmp_path / "from-hub").iterdir()}
    assert {"config.json", "generation_config.json"} <= names
    assert not any("original" in n or "metal" in n for n in names)
    report = json.loads((tmp_path / "from-hub" / "moeconv-report.json").read_text())
    assert report["source"] == f"{REPO}@{COMMIT_A[:12]}"
    assert "low_disk" not in report


def test_revision_picks_another_snapshot(cached_repo, hf_cache, tmp_path):
    from checkpoints import build_gpt_oss_mxfp4

    other = build_gpt_oss_mxfp4(tmp_path / "other", layers=1, shards=1)
    add_snapshot(hf_cache, REPO, COMMIT_B, other, refs=("v2",))

    def planned_keys(*extra) -> set[str]:
        result = convert(REPO, tmp_path / "unused", "-p", "gpt-oss-bf16", "--dry-run", "--json", *extra)
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)
        return plan["source"], {t["key"] for t in plan["tensors"]}

    source, main_keys = planned_keys()
    assert source.endswith(COMMIT_A[:12]) and any(k.startswith("model.layers.1.") for k in main_keys)
    for revision in ("v2", COMMIT_B):
        source, keys = planned_keys("--revision", revision)
        assert source.endswith(COMMIT_B[:12])
        assert not any(k.startswith("model.layers.1.") for k in keys) and keys


def test_unknown_revision_and_uncached_repo_are_one_line_errors(cached_repo):
    for args in (["--revision", "nope"], []):
        repo = REPO if args else "acme/not-cached"
        result = convert(repo, "out", "-p", "gpt-oss-bf16", "--dry-run", *args)
        assert result.exit_code == 1
        message = result.stderr.strip()
        assert "\n" not in message and "not in the huggingface_hub cache" in message and "HF_HUB_OFFLINE" in message


def test_pickle_only_repo_is_refused_without_unpickling(hf_cache, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mixtral"}')
    (folder / "pytorch_model.bin").write_bytes(GARBAGE)  # unpickling this would raise, not refuse
    add_snapshot(hf_cache, "acme/pickled", COMMIT_A, folder, refs=("main",))
    result = convert("acme/pickled", tmp_path / "out", "-p", "fuse-experts")
    assert result.exit_code == 1
    assert "only pickled weights (pytorch_model.bin)" in result.stderr and "\n" not in result.stderr.strip()


def test_an_existing_local_path_wins_over_a_repo_id(hf_cache, mixtral_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(mixtral_dir, tmp_path / "acme" / "mixtral")
    result = convert("acme/mixtral", tmp_path / "out", "-p", "fuse-experts", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert (
        json.loads(result.stdout)["source"] == "acme/mixtral"
    )  # the local path as given; a repo would be "acme/mixtral@<commit>"


def test_low_disk_and_revision_are_refused_on_local_folders(mixtral_dir, tmp_path):
    local = tmp_path / "local"
    shutil.copytree(mixtral_dir, local)
    for flags in (["--low-disk"], ["--revision", "main"]):
        result = convert(local, tmp_path / "out", "-p", "fuse-experts", *flags)
        assert result.exit_code == 1
        assert f"{flags[0]} only apply to hub repo ids" in result.stderr
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in mixtral_dir.iterdir())
    assert not (tmp_path / "out").exists()


def test_low_disk_deletes_used_shards_from_the_cache_and_writes_the_same_bytes(cached_repo, hf_cache, tmp_path):
    result = convert(REPO, tmp_path / "normal", "-p", "gpt-oss-bf16", "--max-shard-size", "60KB")
    assert result.exit_code == 0, result.output
    repo = hf_cache / ("models--" + REPO.replace("/", "--"))
    shards = sorted(p for p in cached_repo.glob("*.safetensors"))
    blobs = {p.resolve() for p in shards}
    sizes = {p.name: p.stat().st_size for p in shards}
    assert len(shards) == 2 and all(b.exists() for b in blobs)

    result = convert(REPO, tmp_path / "low", "-p", "gpt-oss-bf16", "--max-shard-size", "60KB", "--low-disk")
    assert result.exit_code == 0, result.output
    assert shard_bytes(tmp_path / "low") == shard_bytes(tmp_path / "normal")
    assert len(shard_bytes(tmp_path / "low")) > 1
    # Deleting in the cache = the blob and the snapshot's symlink: huggingface_hub would fetch it again.
    assert not any(p.is_symlink() or p.exists() for p in shards)
    assert not any(b.exists() for b in blobs)
    assert (cached_repo / "config.json").is_file() and (cached_repo / INDEX_NAME).is_file()
    assert (cached_repo / "original").is_dir()  # never touched
    report = json.loads((tmp_path / "low" / "moeconv-report.json").read_text())
    assert report["low_disk"] is True
    assert max(sizes.values()) <= report["peak_input_bytes"] <= sum(sizes.values())
    assert {p.name for p in (repo / "blobs").iterdir()}  # other blobs stay

    again = convert(REPO, tmp_path / "again", "-p", "gpt-oss-bf16", "--dry-run")
    assert again.exit_code == 1 and "is not in the huggingface_hub cache" in again.stderr


def test_low_disk_schedule_releases_each_shard_after_its_last_reader(gpt_oss_mxfp4_dir):
    from moeconv.execute import input_schedule
    from moeconv.plan import build_plan
    from moeconv.recipe import load_preset

    source = Checkpoint.open(gpt_oss_mxfp4_dir)
    plan = build_plan(source, [load_preset("gpt-oss-bf16")], max_shard_size=60_000)
    release, peak = input_schedule(plan)
    order = [spec.key for layout in plan.shards for spec in layout.order]
    assert sorted(f for files in release.values() for f in files) == sorted(source.files)
    for last_key, files in release.items():
        for file in files:
            readers = [i for i, key in enumerate(order) if any(source.tensors[s].file == file for s in plan.tensors[key].sources)]
            assert order[max(readers)] == last_key
    assert peak <= sum(p.stat().st_size for p in source.files)


# ---- online: HfApi's own functions return real huggingface_hub objects ----------------------------


def repo_metadata(folder: Path) -> tuple[ModelInfo, SafetensorsRepoMetadata]:
    """What the hub would answer for `folder`: model_info (root files + sizes; subfolders too) and
    get_safetensors_metadata (index + every shard's header), built from the files' real headers."""
    files_metadata = {}
    for shard in sorted(folder.glob("*.safetensors")):
        length = int.from_bytes(shard.read_bytes()[:8], "little")
        header = json.loads(shard.read_bytes()[8 : 8 + length])
        files_metadata[shard.name] = SafetensorsFileMetadata(
            metadata=header.pop("__metadata__", {}),
            tensors={
                k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                for k, v in header.items()
            },
        )
    index = json.loads((folder / INDEX_NAME).read_text())
    siblings = [
        {"rfilename": str(p.relative_to(folder)), "size": p.stat().st_size} for p in sorted(folder.rglob("*")) if p.is_file()
    ]
    info = ModelInfo(id=REPO, sha=COMMIT_A, siblings=siblings)
    metadata = SafetensorsRepoMetadata(
        metadata=index.get("metadata"), sharded=True, weight_map=index["weight_map"], files_metadata=files_metadata
    )
    return info, metadata


@pytest.fixture
def online(hf_cache, gpt_oss_mxfp4_dir, monkeypatch):
    """Online mode; HfApi.model_info / get_safetensors_metadata answer from the fixture; calls are recorded."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    info, metadata = repo_metadata(gpt_oss_mxfp4_dir)
    calls = []

    def model_info(self, repo_id, *, revision=None, files_metadata=False, **kw):
        calls.append(("model_info", repo_id, revision, files_metadata))
        return info

    def get_safetensors_metadata(self, repo_id, *, revision=None, **kw):
        calls.append(("get_safetensors_metadata", repo_id, revision))
        return metadata

    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", get_safetensors_metadata)
    return calls


def cache_small_files(hf_cache, gpt_oss_mxfp4_dir, tmp_path, *, shards: bool) -> Path:
    """What hf_hub_download would have fetched: config.json + index (and, for a run, the shards)."""
    part = tmp_path / "part"
    part.mkdir()
    for name in ("config.json", "generation_config.json", INDEX_NAME):
        shutil.copy(gpt_oss_mxfp4_dir / name, part / name)
    if shards:
        for shard in gpt_oss_mxfp4_dir.glob("*.safetensors"):
            shutil.copy(shard, part / shard.name)
    return add_snapshot(hf_cache, REPO, COMMIT_A, part)


def test_online_dry_run_plans_from_remote_headers_without_any_weight_file(online, hf_cache, gpt_oss_mxfp4_dir, tmp_path):
    snapshot = cache_small_files(hf_cache, gpt_oss_mxfp4_dir, tmp_path, shards=False)
    result = convert(REPO, tmp_path / "out", "-p", "gpt-oss-bf16", "--dry-run", "--json", "--revision", "main")
    assert result.exit_code == 0, result.output
    remote = json.loads(result.stdout)
    local = convert(gpt_oss_mxfp4_dir, tmp_path / "out", "-p", "gpt-oss-bf16", "--dry-run", "--json")
    expected = json.loads(local.stdout)
    assert remote["source"] == f"{REPO}@{COMMIT_A[:12]}"
    for field in ("total_bytes", "files", "warnings"):
        assert remote[field] == expected[field], field
    # the same tensors and shards; offsets differ by the header's provenance (`moeconv.source`) alone
    for field, varying in (("tensors", "offset"), ("shards", "size")):
        assert [{k: v for k, v in e.items() if k != varying} for e in remote[field]] == [
            {k: v for k, v in e.items() if k != varying} for e in expected[field]
        ], field
    assert ("model_info", REPO, "main", True) in online
    assert ("get_safetensors_metadata", REPO, COMMIT_A) in online  # pinned to the commit model_info resolved
    assert not list(snapshot.glob("*.safetensors")) and not (tmp_path / "out").exists()


def test_remote_headers_give_the_exact_offsets_of_the_files(online, hf_cache, gpt_oss_mxfp4_dir, tmp_path):
    from moeconv.hub import open_source

    cache_small_files(hf_cache, gpt_oss_mxfp4_dir, tmp_path, shards=False)
    remote = open_source(REPO)
    local = Checkpoint.open(gpt_oss_mxfp4_dir)
    assert [(t.key, t.dtype, t.shape, t.file.name, t.begin, t.end) for t in remote.tensors.values()] == [
        (t.key, t.dtype, t.shape, t.file.name, t.begin, t.end) for t in local.tensors.values()
    ]
    assert "original/model.safetensors" not in remote.listing and "metal/model.bin" not in remote.listing


def test_online_run_reads_the_cached_shards_it_planned(online, hf_cache, gpt_oss_mxfp4_dir, tmp_path):
    cache_small_files(hf_cache, gpt_oss_mxfp4_dir, tmp_path, shards=True)
    result = convert(REPO, tmp_path / "hub", "-p", "gpt-oss-bf16")
    assert result.exit_code == 0, result.output
    assert convert(gpt_oss_mxfp4_dir, tmp_path / "local", "-p", "gpt-oss-bf16").exit_code == 0
    assert shard_bytes(tmp_path / "hub") == shard_bytes(tmp_path / "local")


def test_a_downloaded_shard_that_differs_from_its_planned_header_is_refused(online, hf_cache, gpt_oss_mxfp4_dir, tmp_path):
    snapshot = cache_small_files(hf_cache, gpt_oss_mxfp4_dir, tmp_path, shards=True)
    victim = sorted(snapshot.glob("*.safetensors"))[0]
    tensors, _, _ = read_header(victim)
    data = bytearray(victim.resolve().read_bytes())
    victim.unlink()
    victim.write_bytes(bytes(data[:-1]))  # truncated download
    result = convert(REPO, tmp_path / "out", "-p", "gpt-oss-bf16")
    assert result.exit_code == 1 and victim.name in error_line(result.stderr)


def test_missing_or_gated_repo_is_one_line_error(hf_cache, monkeypatch):
    import httpx2
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    response = httpx2.Response(401, request=httpx2.Request("GET", "http://127.0.0.1:9/api/models/acme/x"))
    for error, words in ((RepositoryNotFoundError, "no such repo on the hub, or it is private"), (GatedRepoError, "gated repo")):

        def model_info(self, *a, _error=error, **kw):
            raise _error("multi\nline\nmessage", response=response)

        monkeypatch.setattr(HfApi, "model_info", model_info)
        result = convert("acme/x", "out", "-p", "gpt-oss-bf16", "--dry-run")
        assert result.exit_code == 1
        assert words in result.stderr and "--token or HF_TOKEN" in result.stderr and "\n" not in result.stderr.strip()


def test_unreachable_hub_is_one_line_error(hf_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the endpoint is a closed local port
    result = convert(REPO, "out", "-p", "gpt-oss-bf16", "--dry-run")
    assert result.exit_code == 1
    assert "cannot reach the hub" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr and "\n" not in result.stderr.strip()


# ---- local paths vs repo ids, inspect of repo ids -------------------------------------------------


@pytest.mark.parametrize(
    "src, repo",
    [
        ("acme/tiny", True),
        ("openai/gpt-oss-20b", True),
        ("./acme/tiny", False),
        ("/acme/tiny", False),
        ("~/acme/tiny", False),
        ("acme/tiny/sub", False),
        ("tiny", False),
        ("acme/model.safetensors", False),
        ("acme/model.safetensors.index.json", False),
        ("examples/tiny", False),  # ./examples exists (the test runs from the repository)
    ],
)
def test_what_is_a_repo_id(src, repo, monkeypatch):
    from moeconv.hub import is_repo_id

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert is_repo_id(src) is repo


def test_a_mistyped_local_path_is_no_such_folder_never_a_hub_request(hf_cache, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # a request would go to the closed port
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    for src in ("./examples/tiny-gpt-os", "examples/tiny-gpt-os", "examples/a/b", str(tmp_path / "nope")):
        result = convert(src, tmp_path / "out", "-p", "gpt-oss-bf16", "--dry-run")
        assert result.exit_code == 1
        line = error_line(result.stderr)
        assert "no such file or folder" in line and "hub" not in line.replace("a hub repo id is", ""), line
    line = error_line(convert("examples/tiny-gpt-os", tmp_path / "out", "-p", "gpt-oss-bf16").stderr)
    assert "read as a local path because ./examples exists here" in line


def test_an_unreachable_repo_id_says_it_was_read_as_one(hf_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the endpoint is a closed local port
    line = error_line(convert(REPO, "out", "-p", "gpt-oss-bf16", "--dry-run").stderr)
    assert line.startswith(f"error: {REPO}: read as a hub repo id (no local folder 'acme' here), but cannot reach the hub")


def test_inspect_takes_a_cached_repo_id(cached_repo, gpt_oss_mxfp4_dir):
    local = json.loads(CliRunner().invoke(app, ["inspect", str(gpt_oss_mxfp4_dir), "--json"]).stdout)
    result = CliRunner().invoke(app, ["inspect", REPO, "--json"])
    assert result.exit_code == 0, result.output
    remote = json.loads(result.stdout)
    assert remote["tensors"] == local["tensors"] and remote["files"] == local["files"]


def test_inspect_of_a_repo_id_reads_headers_only(online, hf_cache, gpt_oss_mxfp4_dir, tmp_path):
    snapshot = cache_small_files(hf_cache, gpt_oss_mxfp4_dir, tmp_path, shards=False)
    result = CliRunner().invoke(app, ["inspect", REPO, "--revision", "main"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{REPO}@{COMMIT_A[:12]}: ")
    assert "model.layers.{0...1}.mlp.experts.gate_up_proj_blocks" in result.stdout
    assert ("model_info", REPO, "main", True) in online and not list(snapshot.glob("*.safetensors"))
