"""`moeconv convert --ray` on a real Ray instance: the same bytes as a single-machine run.

Collected only inside the loopback-only network namespace that
test_distributed.py::test_ray_suite_in_a_loopback_only_network_namespace makes (conftest.py),
so all of Ray's traffic stays on 127.0.0.1. One local cluster (2 CPUs, a 100 MB object store)
serves every test; this process stays connected to it, and moeconv uses that connection. Workers
find this tree through PYTHONPATH, inherited from this process by the cluster's raylets.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_distributed import convert, plan_of
from test_hub import COMMIT_A, REPO, add_snapshot, cached_repo, hf_cache  # noqa: F401  (fixtures, used by name)
from test_reliability import assert_same_folder, journaled, leftovers, temp_files, wait_for

from moeconv import distributed
from moeconv.errors import MoeconvError
from moeconv.output import JOURNAL_NAME

pytestmark = pytest.mark.ray
REPO_ROOT = Path(__file__).resolve().parents[1]
STORE = 100 * 2**20
SLOW = {"MOECONV_CHUNK_BYTES": "256", "MOECONV_CHUNK_DELAY": "0.02"}  # 20 ms per 256 bytes: ~1.6 s per 20 KB shard


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A local Ray cluster, this process connected to it. Workers see an offline huggingface_hub
    cache of their own (the driver's is another folder)."""
    assert [name for _, name in socket.if_nameindex()] == ["lo"], "not in a loopback-only network namespace"
    import ray
    from ray.cluster_utils import Cluster

    node_cache = tmp_path_factory.mktemp("node-hf-cache")
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": STORE, "include_dashboard": False}
    )
    hub = {"HF_HUB_CACHE": str(node_cache), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    ray.init(address=cluster.address, runtime_env={"env_vars": hub}, log_to_driver=False, logging_level="ERROR")
    cluster.node_cache = node_cache
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def reference(tmp_path: Path, src: Path, *args: str) -> Path:
    out = tmp_path / "reference"
    result = convert(src, out, *args)
    assert result.exit_code == 0, result.output
    return out


def task_workers() -> dict[int, int]:
    """pid -> parent pid (its node's raylet) of this test's Ray workers running a moeconv task."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0]
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith(b"ray::moeconv ") and _descends_from_us(int(entry.name)):
            found[int(entry.name)] = parent
    return found


def _descends_from_us(pid: int) -> bool:
    """Only processes this test session started (other Ray users on the machine are not ours)."""
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def start(*args) -> subprocess.Popen:
    """`moeconv convert ARGS` in a process of its own, slowed down (SLOW)."""
    command = [sys.executable, "-m", "moeconv", "convert", *map(str, args)]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **SLOW},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal, even when run in the background
    )


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_workers_import_this_tree(cluster):
    import ray

    @ray.remote
    def where() -> str:
        import moeconv

        return moeconv.__file__

    assert ray.get(where.remote()) == str(REPO_ROOT / "moeconv" / "__init__.py")


@pytest.mark.parametrize(
    "preset, fixture, size", [("gpt-oss-bf16", "gpt_oss_mxfp4_dir", "40KB"), ("fuse-experts", "sharded_mixtral_dir", "20KB")]
)
def test_output_is_byte_identical_to_a_single_machine_run(cluster, preset, fixture, size, request, tmp_path):
    src = request.getfixturevalue(fixture)
    expected = reference(tmp_path, src, "-p", preset, "--max-shard-size", size)
    assert len(list(expected.glob("*.safetensors"))) >= 3
    result = convert(src, tmp_path / "out", "-p", preset, "--max-shard-size", size, "--ray", cluster.address)
    assert result.exit_code == 0, result.output
    assert_same_folder(expected, tmp_path / "out")  # shards, index, config, companions, report


def test_two_nodes_write_the_same_bytes(cluster, sharded_mixtral_dir, tmp_path, monkeypatch):
    """A task takes 2 CPUs and each node has 2: tasks running side by side are on both nodes."""
    expected = reference(tmp_path, sharded_mixtral_dir, "-p", "fuse-experts", "--max-shard-size", "20KB")
    second = cluster.add_node(num_cpus=2, object_store_memory=STORE, include_dashboard=False)
    try:
        for name, value in {**SLOW, "MOECONV_CHUNK_BYTES": "1024", "MOECONV_THREADS": "2"}.items():
            monkeypatch.setenv(name, value)
        raylets: set[int] = set()
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                raylets.update(task_workers().values())
                time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            result = convert(
                sharded_mixtral_dir, tmp_path / "out", "-p", "fuse-experts", "--max-shard-size", "20KB", "--ray", cluster.address
            )
        finally:
            done.set()
            watcher.join()
        assert result.exit_code == 0, result.output
        assert len(raylets) == 2, raylets  # workers of both nodes' raylets ran a task
        assert_same_folder(expected, tmp_path / "out")
    finally:
        cluster.remove_node(second)


def test_a_worker_killed_mid_task_is_retried_and_the_output_is_the_same(cluster, sharded_mixtral_dir, tmp_path, monkeypatch):
    expected = reference(tmp_path, sharded_mixtral_dir, "-p", "fuse-experts", "--max-shard-size", "20KB")
    for name, value in SLOW.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            workers = task_workers() if temp_files(out) else {}  # a task is writing its shard
            for pid in list(workers)[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    result = convert(sharded_mixtral_dir, out, "-p", "fuse-experts", "--max-shard-size", "20KB", "--ray", cluster.address)
    killer.join()
    assert killed, "no task was ever seen running"
    assert result.exit_code == 0, result.output
    assert_same_folder(expected, out)  # the killed worker's temp file is gone too


def test_a_failing_task_is_one_line_and_leaves_nothing_complete(cluster, sharded_mixtral_dir, tmp_path):
    src = Path(shutil.copytree(sharded_mixtral_dir, tmp_path / "src"))
    plan = plan_of(src, "fuse-experts", 20_000)
    (src / "model-00002-of-00003.safetensors").write_bytes(b"")  # after planning: only the tasks find out
    out = tmp_path / "out"
    with pytest.raises(MoeconvError) as raised:
        distributed.run(plan, out, address=cluster.address)
    message = str(raised.value)
    assert "\n" not in message and "model-00002-of-00003.safetensors" in message and "end of the file" in message
    assert leftovers(out) == []


def test_resume_after_the_driver_is_killed_with_or_without_ray(cluster, sharded_mixtral_dir, tmp_path):
    expected = reference(tmp_path, sharded_mixtral_dir, "-p", "fuse-experts", "--max-shard-size", "20KB")
    for first, then in ((["--ray", cluster.address], []), ([], ["--ray", cluster.address])):
        out = tmp_path / f"out{len(first)}"
        proc = start(sharded_mixtral_dir, out, "-p", "fuse-experts", "--max-shard-size", "20KB", *first)
        wait_for(lambda out=out: journaled(out) >= 1 and temp_files(out), proc, timeout=240)
        proc.kill()
        proc.communicate(timeout=60)
        wait_until(lambda: not task_workers())  # Ray ends the dead driver's tasks
        assert [n for n in leftovers(out) if not n.endswith(".tmp")] == []
        kept = json.loads((out / JOURNAL_NAME).read_text())["shards"]
        inodes = {name: (out / f".{name}.staged").stat().st_ino for name in kept}
        result = convert(sharded_mixtral_dir, out, "-p", "fuse-experts", "--max-shard-size", "20KB", "--resume", *then)
        assert result.exit_code == 0, result.output
        assert {name: (out / name).stat().st_ino for name in kept} == inodes  # kept, not rewritten
        assert_same_folder(expected, out)


def test_a_hub_repo_is_read_from_each_nodes_own_cache(cluster, request, gpt_oss_mxfp4_dir, tmp_path):
    driver_snapshot = request.getfixturevalue("cached_repo")
    expected = reference(tmp_path, REPO, "-p", "gpt-oss-bf16", "--max-shard-size", "40KB")
    add_snapshot(cluster.node_cache, REPO, COMMIT_A, gpt_oss_mxfp4_dir)
    for shard in driver_snapshot.glob("*.safetensors"):  # the driver's copies: the same headers, zeros for data
        raw = shard.resolve().read_bytes()
        start = 8 + int.from_bytes(raw[:8], "little")
        shard.resolve().write_bytes(raw[:start] + bytes(len(raw) - start))
    result = convert(REPO, tmp_path / "out", "-p", "gpt-oss-bf16", "--max-shard-size", "40KB", "--ray", cluster.address)
    assert result.exit_code == 0, result.output
    assert_same_folder(expected, tmp_path / "out")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_driver_stops_its_tasks_and_leaves_nothing_complete(cluster, sharded_mixtral_dir, tmp_path, sig, code):
    out = tmp_path / "out"
    proc = start(sharded_mixtral_dir, out, "-p", "fuse-experts", "--max-shard-size", "20KB", "--ray", cluster.address)
    wait_for(lambda: task_workers() and temp_files(out), proc, timeout=240)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert signal.Signals(sig).name in lines[-1]
    assert leftovers(out) == []  # the tasks were cancelled and removed their temp files
    assert not task_workers()


def test_an_address_nothing_answers_at_is_one_line_at_once(sharded_mixtral_dir, tmp_path):
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "moeconv", "convert", str(sharded_mixtral_dir), str(out), "-p", "fuse-experts", "--ray", address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --ray {address}: nothing answers there")
    assert "Traceback" not in result.stderr and not out.exists()
