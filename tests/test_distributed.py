"""--ray without Ray running: the task partition, a task's plan slice (pickled as Ray sends it, then
written in this process: the same bytes), a hub task reading its own machine's cache, the messages
when Ray is missing. And the wrapper that runs tests/test_ray.py, the tests on a real Ray instance,
inside a loopback-only network namespace (Ray binds the machine's interface address otherwise)."""

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_hub import COMMIT_A, REPO, add_snapshot, cached_repo, hf_cache  # noqa: F401  (fixtures, used by name)
from typer.testing import CliRunner

from moeconv import distributed
from moeconv.cli import app
from moeconv.display import human_bytes
from moeconv.execute import execute
from moeconv.hub import open_source
from moeconv.plan import build_plan
from moeconv.recipe import load_preset
from moeconv.source import Checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def convert(*args):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def plan_of(src, preset: str, max_shard_size: int):
    source = open_source(str(src))
    return build_plan(source, [load_preset(preset)], max_shard_size=max_shard_size)


def write_tasks_here(plan, tasks, out: Path) -> dict:
    """Each task's slice pickled and unpickled (what Ray does), then its body run in this process."""
    manifests = {}
    for task in tasks:
        work = distributed._slice(plan, task, token=None, out_dir=str(out), checksum="xxh3-128", chunk_bytes=4096, threads=1)
        manifests.update(distributed._write(pickle.loads(pickle.dumps(work))))
    return manifests


# ---- the partition ---------------------------------------------------------------------------------


def test_one_task_per_shard_largest_first_with_the_inputs_each_reads(gpt_oss_mxfp4_dir):
    plan = plan_of(gpt_oss_mxfp4_dir, "gpt-oss-bf16", 40_000)
    tasks = distributed.partition(plan)
    assert sorted(layout.name for t in tasks for layout in t.shards) == sorted(s.name for s in plan.shards)
    assert all(len(t.shards) == 1 for t in tasks)
    assert [t.nbytes for t in tasks] == sorted((t.nbytes for t in tasks), reverse=True)
    for task in tasks:
        keys = [spec.key for spec in task.shards[0].order]
        read = {plan.source.tensors[s].file.name for k in keys for s in plan.tensors[k].sources}
        assert task.inputs == sorted(read)
    assert {name for t in tasks for name in t.inputs} == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_a_byte_budget_packs_shards_first_fit_largest_first(gpt_oss_mxfp4_dir):
    plan = plan_of(gpt_oss_mxfp4_dir, "gpt-oss-bf16", 40_000)
    biggest = max(s.size for s in plan.shards)
    tasks = distributed.partition(plan, budget=biggest + 40_000)
    assert len(tasks) < len(plan.shards)
    assert all(t.nbytes <= biggest + 40_000 for t in tasks)
    assert sorted(layout.name for t in tasks for layout in t.shards) == sorted(s.name for s in plan.shards)
    for task in tasks:  # a task writes its shards in the plan's order
        assert [s.name for s in task.shards] == sorted(s.name for s in task.shards)
    (one,) = distributed.partition(plan, budget=sum(s.size for s in plan.shards))
    assert len(one.shards) == len(plan.shards)
    only = distributed.partition(plan, names={plan.shards[0].name})
    assert [[s.name for s in t.shards] for t in only] == [[plan.shards[0].name]]


def test_dry_run_prints_the_partition_without_ray(gpt_oss_mxfp4_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importing Ray would fail
    out = tmp_path / "out"
    result = convert(gpt_oss_mxfp4_dir, out, "-p", "gpt-oss-bf16", "--max-shard-size", "40KB", "--dry-run", "--ray", "local")
    assert result.exit_code == 0, result.output
    tasks = distributed.partition(plan_of(gpt_oss_mxfp4_dir, "gpt-oss-bf16", 40_000))
    assert f"ray tasks: {len(tasks)}, largest first" in result.stdout and len(tasks) >= 3
    table = result.stdout[result.stdout.index("ray tasks:") :].splitlines()[2:]
    for number, (task, line) in enumerate(zip(tasks, table), 1):
        inputs = ", ".join(task.inputs)
        assert line.split() == [str(number), task.shards[0].name, *human_bytes(task.nbytes).split(), *inputs.split()]
    result = convert(
        gpt_oss_mxfp4_dir, out, "-p", "gpt-oss-bf16", "--max-shard-size", "40KB", "--dry-run", "--ray", "local", "--json"
    )
    assert json.loads(result.stdout)["ray_tasks"] == [task.to_json() for task in tasks]
    assert not out.exists()


def test_without_ray_installed_one_line_says_how_to_install_it(mixtral_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "out"
    result = convert(mixtral_dir, out, "-p", "fuse-experts", "--ray", "local")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --ray needs Ray, an optional extra: pip install 'moeconv[ray]'"
    assert not out.exists()


@pytest.mark.usefixtures("cached_repo")
def test_low_disk_with_ray_is_refused_in_one_line(tmp_path):
    result = convert(REPO, tmp_path / "out", "-p", "gpt-oss-bf16", "--ray", "local", "--low-disk")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "--low-disk does not combine with --ray" in line
    assert not (tmp_path / "out").exists()


# ---- a task's body, in this process -----------------------------------------------------------------


@pytest.mark.parametrize("preset, fixture", [("gpt-oss-bf16", "gpt_oss_mxfp4_dir"), ("fuse-experts", "sharded_mixtral_dir")])
def test_pickled_slices_write_the_shards_of_a_single_machine_run(preset, fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    plan = plan_of(src, preset, 20_000)
    execute(plan, tmp_path / "reference")
    out = tmp_path / "out"
    out.mkdir()
    tasks = distributed.partition(plan, budget=60_000)
    manifests = write_tasks_here(plan, tasks, out)
    assert len(plan.shards) >= 3 and set(manifests) == {s.name for s in plan.shards}
    report = json.loads((tmp_path / "reference" / "moeconv-report.json").read_text())
    for layout in plan.shards:
        assert (out / f".{layout.name}.staged").read_bytes() == (tmp_path / "reference" / layout.name).read_bytes()
        assert manifests[layout.name] == {"size": layout.size, "checksum": report["checksums"]["files"][layout.name]}


def test_a_fresh_process_writes_a_slice_whose_op_comes_from_a_users_module(tmp_path):
    """The op's module is imported where the slice is unpickled (a new Ray worker has not)."""
    import torch
    import toy_format  # noqa: F401  (registers dequantize-int8-rows here)
    from safetensors.torch import save_file
    from test_format_extension import RECIPE

    from moeconv.recipe import parse_recipe

    src = tmp_path / "src"
    src.mkdir()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-128, 128, (37, 24), dtype=torch.int8, generator=generator)
    save_file({"layer.weight": weight, "layer.weight_scale": torch.rand(37, generator=generator)}, src / "model.safetensors")
    plan = build_plan(Checkpoint.open(src), [parse_recipe(RECIPE, "toy.toml")])
    execute(plan, tmp_path / "reference")
    (task,) = distributed.partition(plan)
    work = distributed._slice(
        plan, task, token=None, out_dir=str(tmp_path / "out"), checksum="xxh3-128", chunk_bytes=256, threads=1
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "slice.pickle").write_bytes(pickle.dumps(work))
    code = "import pickle, sys; from moeconv import distributed; distributed._write(pickle.load(open(sys.argv[1], 'rb')))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path / "slice.pickle")], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    written = (tmp_path / "out" / ".model.safetensors.staged").read_bytes()
    assert written == (tmp_path / "reference" / "model.safetensors").read_bytes()


def test_a_slice_holds_only_the_headers_of_the_files_it_reads(gpt_oss_mxfp4_dir):
    plan = plan_of(gpt_oss_mxfp4_dir, "gpt-oss-bf16", 40_000)
    task = next(t for t in distributed.partition(plan) if len(t.inputs) == 1)
    work = distributed._slice(plan, task, token=None, out_dir="/nowhere", checksum="xxh3-128", chunk_bytes=4096, threads=1)
    assert [f.name for f in work.source.files] == task.inputs
    assert {info.file.name for info in work.source.tensors.values()} == set(task.inputs)
    assert work.source.config is None and work.source.fetch is None
    assert set(work.tensors) == {spec.key for spec in task.shards[0].order}
    assert len(pickle.dumps(work)) < len(pickle.dumps(plan.source)) + sum(len(s.header) for s in task.shards) * 4


def test_a_missing_input_file_on_the_node_is_one_line(sharded_mixtral_dir, tmp_path):
    src = Path(shutil.copytree(sharded_mixtral_dir, tmp_path / "src"))
    plan = plan_of(src, "fuse-experts", 30_000)
    (src / "model-00002-of-00003.safetensors").unlink()
    out = tmp_path / "out"
    out.mkdir()
    task = next(t for t in distributed.partition(plan) if "model-00002-of-00003.safetensors" in t.inputs)
    with pytest.raises(Exception) as raised:
        write_tasks_here(plan, [task], out)
    assert "model-00002-of-00003.safetensors: no such file on Ray node" in str(raised.value)
    assert "same path on every node" in str(raised.value)
    with pytest.raises(Exception, match="no such folder on Ray node"):
        write_tasks_here(plan, [task], tmp_path / "not-there")


@pytest.mark.usefixtures("cached_repo")
def test_a_hub_task_reads_the_shards_it_needs_from_its_own_machines_cache(request, gpt_oss_mxfp4_dir, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    driver_cache = request.getfixturevalue("hf_cache")
    plan = plan_of(REPO, "gpt-oss-bf16", 40_000)
    execute(plan, tmp_path / "reference")
    # "another machine": its own cache, holding the same commit; the driver's cache is gone
    node_cache = tmp_path / "node-cache"
    add_snapshot(node_cache, REPO, COMMIT_A, gpt_oss_mxfp4_dir)
    shutil.rmtree(driver_cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(node_cache))
    downloads = []
    real = huggingface_hub.hf_hub_download
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda repo, name, **kw: downloads.append(name) or real(repo, name, **kw)
    )

    out = tmp_path / "out"
    out.mkdir()
    for task in distributed.partition(plan):
        downloads.clear()
        write_tasks_here(plan, [task], out)
        assert sorted(downloads) == task.inputs  # only what it reads
        layout = task.shards[0]
        assert (out / f".{layout.name}.staged").read_bytes() == (tmp_path / "reference" / layout.name).read_bytes()


# ---- the tests on Ray ---------------------------------------------------------------------------------


def _namespace_refusal() -> str | None:
    """Why a loopback-only network namespace cannot be made here (None: it can)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip (util-linux, iproute2) is not installed"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n is refused here ({probe.stderr.strip() or probe.returncode}); it needs root or user namespaces"
    return None


@pytest.mark.ray
def test_ray_suite_in_a_loopback_only_network_namespace():
    """tests/test_ray.py in a child pytest inside `unshare -n` with only `lo` up: every byte of
    Ray's traffic stays on 127.0.0.1, and one Ray instance serves all of those tests."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install -e '.[test,ray]' runs the Ray tests")
    refusal = _namespace_refusal()
    if refusal:
        pytest.skip(f"the Ray tests need a loopback-only network namespace: {refusal}")
    env = {
        **os.environ,
        "MOECONV_RAY_NETNS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ray.py"]
    child = subprocess.run(
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = child.stdout.strip().splitlines()[-1:] or ["(no output)"]
    print(f"tests/test_ray.py in a loopback-only namespace: {summary[0]}")
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
