"""Run a plan on a Ray cluster (`moeconv convert --ray ADDRESS`): the same bytes as `execute`, the
shards written by Ray tasks on the cluster's nodes.

The driver plans as a single-machine run does (headers only) and owns the output folder
(moeconv.output.Output: refusals, --resume, journal, final renames, index, config, report). The
shards still to write are partitioned into tasks (`partition`: one per shard, or shards packed up
to a byte budget; largest first). Each task gets its slice of the plan, put in Ray's object store
once: its shard layouts, the op graph of their tensors, and the headers of the input files it
reads (`_slice`). It reads those files where it runs (SRC at the same path on every node, on a
filesystem they share; or, for a hub repo id, through that node's huggingface_hub cache, which
downloads only the input shards the task reads), streams each shard into OUT's staging with
`execute.write_shard`, and returns the shards' manifests (size, checksum). Tensor data never passes
through Ray, and OUT must be on a filesystem every node shares, at the same path.

A worker or node that dies has its task retried by Ray (`RETRIES`); a rerun rewrites its shards
from the start, same bytes. A shard is journaled only when its task has returned, and the shards
get their final names only once every task is done, so `--resume` continues a killed driver's run
with or without Ray. Ray is imported by `run` alone (`pip install 'moeconv[ray]'`).
"""

import copy
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from moeconv.checksum import DEFAULT as DEFAULT_CHECKSUM
from moeconv.checksum import new_hasher
from moeconv.display import human_bytes, print_all, safe
from moeconv.errors import CheckpointError, ClusterError, MoeconvError, WriteError
from moeconv.execute import Progress, chunk_memory, pool_for, write_shard
from moeconv.format import ShardLayout
from moeconv.hub import fetch_companions, on_this_machine
from moeconv.output import Output, staged_name
from moeconv.plan import Plan, PlannedTensor
from moeconv.source import Checkpoint
from moeconv.stream import CHUNK_BYTES

RETRIES = 3  # reruns of a task whose worker or node died (Ray's max_retries); a MoeconvError is never retried
PROCESS_BYTES = 512 * 2**20  # a worker's own memory besides chunks: Python, torch, Ray (0.28 GB measured)
LOCAL_STORE_BYTES = 256 * 2**20  # --ray local: Ray's object store holds plan slices and manifests, never tensors
CONNECT_SECONDS = 10.0  # for the cluster's address to answer at all
WAIT_SECONDS = 1.0  # the driver wakes this often to handle signals
STOP_SECONDS = 30.0  # after a failure: how long cancelled tasks get to delete their temp files


@dataclass
class Task:
    """Output shards one Ray task writes, and the input files they read."""

    shards: list[ShardLayout]
    inputs: list[str]  # input file names

    @property
    def nbytes(self) -> int:
        return sum(layout.size for layout in self.shards)

    @property
    def label(self) -> str:
        more = f" (+{len(self.shards) - 1} more)" if len(self.shards) > 1 else ""
        return self.shards[0].name + more

    def to_json(self) -> dict:
        return {"shards": [layout.name for layout in self.shards], "bytes": self.nbytes, "inputs": self.inputs}


def partition(plan: Plan, names: set[str] | None = None, budget: int | None = None) -> list[Task]:
    """Tasks writing the shards `names` (default: all): one per shard, or, with `budget`, shards
    packed largest first into tasks of at most `budget` bytes (a larger shard alone). Largest task
    first, the order they are submitted in, so the longest ones start first."""
    layouts = sorted((s for s in plan.shards if names is None or s.name in names), key=lambda s: -s.size)
    groups: list[list[ShardLayout]] = []
    for layout in layouts:
        fits = (g for g in groups if budget is not None and sum(s.size for s in g) + layout.size <= budget)
        group = next(fits, None)
        if group is None:
            groups.append([layout])
        else:
            group.append(layout)
    position = {layout.name: i for i, layout in enumerate(plan.shards)}
    tasks = []
    for group in groups:
        group.sort(key=lambda s: position[s.name])
        sources = {key for layout in group for spec in layout.order for key in plan.tensors[spec.key].sources}
        tasks.append(Task(group, sorted({plan.source.tensors[key].file.name for key in sources})))
    return sorted(tasks, key=lambda t: -t.nbytes)


def render_tasks(tasks: list[Task], console, *, wide: bool = False) -> None:
    """The partition as a table (--dry-run --ray): each task's shards, bytes and input files."""
    from rich.table import Table

    table = Table(title=f"ray tasks: {len(tasks)}, largest first", title_justify="left", box=None, pad_edge=False)
    table.add_column("task", justify="right")
    table.add_column("shards")
    table.add_column("bytes", justify="right")
    table.add_column("reads")
    for number, task in enumerate(tasks, 1):
        shards = ", ".join(layout.name for layout in task.shards)
        table.add_row(str(number), shards, human_bytes(task.nbytes), ", ".join(safe(name) for name in task.inputs))
    print_all(console, table, wide=wide)


# ---- a task -----------------------------------------------------------------------------------------


@dataclass
class _Slice:
    """What one task receives: its shards, their tensors' op graphs, the input files' headers."""

    shards: list[ShardLayout]
    tensors: dict[str, PlannedTensor]
    source: Checkpoint  # only the input files this task reads
    hub: bool  # a hub repo id: read through the node's huggingface_hub cache
    token: str | None
    out_dir: str
    checksum: str
    chunk_bytes: int
    threads: int


def _slice(plan: Plan, task: Task, **settings) -> _Slice:
    source = plan.source
    files = {source.root / name for name in task.inputs}
    headers = {key: info for key, info in source.tensors.items() if info.file in files}
    part = Checkpoint(source.root, sorted(files), headers, None, origin=source.origin)
    keys = [spec.key for layout in task.shards for spec in layout.order]
    # the graph copied with every reference to the whole source replaced by the part this task reads
    tensors = copy.deepcopy({key: plan.tensors[key] for key in keys}, memo={id(source): part})
    return _Slice(task.shards, tensors, part, hub=source.fetch is not None, **settings)


def _write(work: _Slice) -> dict[str, dict]:
    """A Ray task's body: write the slice's shards into OUT's staging; {shard name: manifest}."""
    out, source = Path(work.out_dir), work.source
    where = f"on Ray node {socket.gethostname()}"
    if not out.is_dir():
        raise WriteError(f"{out}: no such folder {where}; --ray writes OUT from every node: put it on a filesystem they share")
    if work.hub:
        on_this_machine(source, work.token)
    else:
        for file in source.files:
            if not file.is_file():
                raise CheckpointError(f"{file}: no such file {where}; --ray reads a local SRC at the same path on every node")
    plan = Plan(source, [], work.tensors, work.shards, None, [], [], align=0)  # these shards alone
    compute = pool_for(work.tensors.values(), work.threads, work.chunk_bytes)
    try:
        return {
            layout.name: write_shard(
                plan,
                layout,
                out / staged_name(layout.name),
                compute=compute,
                checksum=work.checksum,
                chunk_bytes=work.chunk_bytes,
            )
            for layout in work.shards
        }
    finally:
        compute.close()
        source.close()


# ---- the driver -------------------------------------------------------------------------------------


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray, an optional extra: pip install 'moeconv[ray]'") from None
    return ray


@contextmanager
def _connected(ray, address: str | None) -> Iterator[None]:
    """Connected to the cluster at `address` ("local": a new Ray instance on this machine) for the
    block; a connection this process already has (ray.init by the caller) is used as it is."""
    if ray.is_initialized():
        yield
        return
    if address is not None:
        _check_reachable(address)
    options = {"object_store_memory": LOCAL_STORE_BYTES, "include_dashboard": False} if address == "local" else {}
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", **options)
    except Exception as error:
        raise ClusterError(f"--ray {address}: cannot start or reach Ray there: {_first_line(error)}") from None
    if on_sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # Ray's core replaced it with one that aborts the process
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that nothing answers at is refused at once: Ray itself
    would retry for minutes."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # "auto", "local"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise ClusterError(
            f"--ray {address}: nothing answers there ({error.strerror or error}); is the cluster's head node up at that address?"
        ) from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _result(ray, ref, task: Task) -> dict[str, dict]:
    """A finished task's manifests; its failure as one MoeconvError line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = error.cause
        if isinstance(cause, MoeconvError):
            raise cause from None
        raise ClusterError(f"the Ray task writing {task.label} failed: {type(cause).__name__}: {_first_line(cause)}") from None
    except ray.exceptions.RayError as error:
        raise ClusterError(f"the Ray task writing {task.label} failed: {_first_line(error)}") from None


def _stop(ray, refs: list) -> None:
    """Cancel unfinished tasks and wait for them to stop (their writers delete their temp files);
    the ones that do not stop in time are killed."""
    for force in (False, True):
        if not refs:
            return
        for ref in refs:
            try:
                ray.cancel(ref, force=force)
            except Exception:  # already finished, or its node is gone: nothing to stop
                pass
        _, refs = ray.wait(refs, num_returns=len(refs), timeout=STOP_SECONDS)


def _submit(ray, plan: Plan, tasks: list[Task], settings: dict) -> Iterator[tuple]:
    """Each task's slice put in the object store once, then the task submitted: (ref, task) pairs."""
    write = ray.remote(_write)
    variables = {k: v for k, v in os.environ.items() if k.startswith("MOECONV_")}  # the driver's settings hold for every task
    for task in tasks:
        work = _slice(plan, task, **settings)
        options = {
            "name": f"moeconv {task.label}",
            "num_cpus": work.threads,
            "memory": PROCESS_BYTES + chunk_memory(work.tensors.values(), work.threads, work.chunk_bytes),
            "max_retries": RETRIES,
        }
        if variables:
            options["runtime_env"] = {"env_vars": variables}
        yield write.options(**options).remote(ray.put(work)), task


def _wait(ray, refs: list) -> list:
    """The refs of finished tasks, after at most WAIT_SECONDS. A signal handler's exception
    (Ctrl-C, SIGTERM) raised while Ray's core waits comes out as a SystemError caused by it: it
    is raised as itself, for the CLI to report."""
    try:
        return ray.wait(refs, num_returns=1, timeout=WAIT_SECONDS, fetch_local=False)[0]
    except SystemError as error:
        if isinstance(error.__cause__, BaseException) and not isinstance(error.__cause__, Exception):
            raise error.__cause__ from None
        raise


def _collect(ray, submissions: Iterator[tuple], output: Output, progress: Progress | None) -> None:
    """Submit the tasks, then journal each shard as its task returns; on any failure or signal,
    stop the other tasks."""
    pending: dict = {}
    try:
        for ref, task in submissions:
            pending[ref] = task
        while pending:
            done = _wait(ray, list(pending))
            for ref in done:
                task = pending.pop(ref)
                manifests = _result(ray, ref, task)
                for layout in task.shards:
                    output.record(layout.name, manifests[layout.name])
                    if progress:
                        progress(layout.name, sum(spec.nbytes for spec in layout.order))
    except BaseException:
        _stop(ray, list(pending))
        for layout in output.plan.shards:  # written by a task that never returned: not vouched for by the journal
            if layout.name not in output.finished:
                output.staged(layout.name).unlink(missing_ok=True)
        raise


def _task_threads() -> int:
    """Compute threads (and Ray CPUs) per task: MOECONV_THREADS, else 1 (Ray runs tasks side by side)."""
    given = os.environ.get("MOECONV_THREADS", "")
    if given and not (given.isascii() and given.isdigit() and int(given) > 0):
        raise MoeconvError(f"MOECONV_THREADS={given!r}: must be a positive whole number of threads")
    return int(given) if given else 1


def run(
    plan: Plan,
    out_dir: str | Path,
    *,
    address: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    checksum: str = DEFAULT_CHECKSUM,
    progress: Progress | None = None,
    low_disk: bool = False,
    token: str | None = None,
    chunk_bytes: int | None = None,
    task_bytes: int | None = None,
    started: Callable[[list[str]], None] | None = None,
) -> dict:
    """Write the planned checkpoint to `out_dir` as `execute` does, byte for byte, with the shards
    written by Ray tasks on the cluster at `address` (`ray.init`'s: "ray://host:10001", "auto",
    "local" for a new instance on this machine; None, or a process already connected, uses that).

    OUT, and a local SRC, must be at the same paths on every node. `token`: for a hub repo id, the
    token the tasks download with (default: each node's own). `task_bytes`: pack shards into tasks
    of up to this many bytes (default: one task per shard). Each task declares to Ray
    `MOECONV_THREADS` CPUs (default 1) and the memory its chunks need. `started(notes)`: as for
    `execute`, once OUT is ready. Returns the report.
    """
    if low_disk:
        raise ClusterError(
            "--low-disk does not combine with --ray: each task downloads only the input shards it reads, into its node's cache"
        )
    new_hasher(checksum)  # an unknown algorithm fails before anything is touched
    ray = _import_ray()
    settings = {
        "token": token,
        "out_dir": str(Path(out_dir).absolute()),
        "checksum": checksum,
        "chunk_bytes": chunk_bytes or int(os.environ.get("MOECONV_CHUNK_BYTES", CHUNK_BYTES)),
        "threads": _task_threads(),
    }
    fetch_companions(plan)  # hub repo ids: the small files the driver copies at the end
    with _connected(ray, address):  # before OUT is touched: an unreachable cluster leaves no trace
        output = Output(out_dir, plan, overwrite=overwrite, resume=resume, checksum=checksum)
        kept = output.open()
        try:
            if started:
                started(list(output.notes))
            for layout in plan.shards:
                if layout.name in kept and progress:
                    progress(layout.name, sum(spec.nbytes for spec in layout.order))
            tasks = partition(plan, {layout.name for layout in plan.shards} - kept.keys(), task_bytes)
            _collect(ray, _submit(ray, plan, tasks, settings), output, progress)
            output.remove_temp_files()  # a killed worker's, whose task was retried
        except BaseException as error:
            output.abandon(error)
            raise
    return output.finalize()
