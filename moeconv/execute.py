"""Execute a plan: stream source slices through the op chains, chunk by chunk, into the writer.

Nothing is decided here that the plan did not decide; a chunk that disagrees with the plan is a
bug and is reported as one. Reading, computing and writing overlap: compute threads (one per core,
MOECONV_THREADS to choose) produce chunks a few ahead, handed to a writer thread through a short
queue in write order (preads, torch kernels and file writes all release the GIL). Memory stays
bounded by the chunks in flight, and those live in recycled buffers (buffers.py): fresh pages
cost more than the kernels.

Tensors whose bytes are the source's as they are (a pass-through, or experts stacked or
concatenated along dim 0: `Node.copies_bytes`) are copied as bytes and need no torch, so a
conversion that only renames, drops, fuses or unfuses experts (fuse-experts, unfuse-experts) never
imports it. Importing torch takes 1-2 s cold, so it starts on a thread as the run begins (when any
tensor needs an op) and the copies at the front of the first shard (embeddings, lm_head) go to
disk meanwhile; the first computed chunk waits for the import.
"""

import contextlib
import glob
import hashlib
import importlib
import importlib.util
import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from moeconv import buffers, dtypes, import_hint
from moeconv.checksum import DEFAULT as DEFAULT_CHECKSUM
from moeconv.checksum import file_checksum, new_hasher
from moeconv.errors import InternalError, MoeconvError, OpError, WriteError
from moeconv.graph import chunk_rows
from moeconv.plan import Plan, PlannedTensor
from moeconv.writer import INDEX_NAME, ShardWriter, _fsync_dir, atomic_write_bytes, fsync_file, write_index

CHUNK_BYTES = 32 * 2**20  # one gpt-oss expert (33 MB bf16) per chunk at most; fewer in flight = less memory
AHEAD_CHUNKS = 4  # bytes computed ahead of the writer, in chunks
YIELD_TO_REPORT = 5  # nice increment of the worker threads while the load report is pending
RECYCLE_CHUNKS = 12  # chunk-sized buffers kept for reuse (see buffers.py): about what the pipeline holds at once
REPORT_NAME = "moeconv-report.json"
JOURNAL_NAME = ".moeconv-progress.json"  # an unfinished run: its finished shards, for --resume
REPLACED_NAME = ".moeconv-replaced"  # the files an --overwrite run replaces, deleted while it converts
_DONE = object()

Progress = Callable[[str, int], None]  # (shard name, bytes just written)


class Chunk(NamedTuple):
    """Rows start:stop of axis 0; with `inner` = (a, b), rows a:b of axis 1 of the single row
    `start` (stop = start + 1): part of a row too big for one chunk (a 235 MB Mixtral expert)."""

    start: int
    stop: int
    inner: tuple[int, int] | None = None

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.inner is None:
            return (self.stop - self.start, *full[1:])
        return (1, self.inner[1] - self.inner[0], *full[2:])

    def byte_offset(self, full: tuple[int, ...], nbytes: int) -> int:
        """Where this chunk starts inside the tensor's bytes."""
        row_bytes = nbytes // full[0]
        inner = self.inner[0] * (row_bytes // full[1]) if self.inner else 0
        return self.start * row_bytes + inner


def _chunks(tensor: PlannedTensor, budget: int):
    """Chunks covering the tensor in byte order, or one None for a 0-d tensor."""
    node = tensor.node
    if not node.shape:
        yield None
        return
    row_bytes = node.nbytes // max(node.shape[0], 1)
    if node.splits_rows and len(node.shape) >= 2 and node.shape[1] > 1 and row_bytes > budget:
        step = max(1, budget // max(row_bytes // node.shape[1], 1))
        for row in range(node.shape[0]):
            for a in range(0, node.shape[1], step):
                yield Chunk(row, row + 1, (a, min(a + step, node.shape[1])))
        return
    step = chunk_rows(node, budget)
    for start in range(0, node.shape[0], step):
        yield Chunk(start, min(start + step, node.shape[0]))


def copies_bytes(tensor: PlannedTensor) -> bool:
    """Its chunks are source bytes as they are (a pass-through, or experts stacked or concatenated
    along dim 0): read and written as bytes, no torch."""
    return tensor.node.copies_bytes


def _produce(tensor: PlannedTensor, rows: Chunk | None):
    """Chunk `rows` of the tensor: a contiguous tensor, or for a byte copy a tuple of memoryviews
    (one per source range: a stacked expert's gate rows, then its up rows) to write in turn."""
    node = tensor.node
    if copies_bytes(tensor):
        if rows is None:  # a 0-d tensor: a source's own
            return (node.checkpoint.read_bytes(node.key),)
        found = node.pieces(rows.start, rows.stop) if rows.inner is None else node.pieces(*rows.inner, within=rows.start)
        return tuple(source.checkpoint.read_bytes(source.key, a, b, within=within) for source, a, b, within in found)
    try:
        if rows is None:
            chunk = node.whole()
        elif rows.inner is None:
            chunk = node.rows(rows.start, rows.stop)
        else:
            chunk = node.rows_within(rows.start, *rows.inner).unsqueeze(0)
    except OpError as error:  # data-dependent problems (fp16 overflow) only show up here
        raise OpError(f"'{tensor.key}' (rule '{'/'.join(tensor.rules)}'): {error}") from None
    expected = node.shape if rows is None else rows.shape(node.shape)
    if tuple(chunk.shape) != tuple(expected) or dtypes.to_safetensors(chunk.dtype) != node.dtype:
        raise InternalError(
            f"rule '{'/'.join(tensor.rules) or 'pass-through'}' produced {chunk.dtype} {list(chunk.shape)} for "
            f"'{tensor.key}' rows {rows}, the plan says {node.dtype} {list(expected)}: this is a moeconv bug"
        )
    return chunk.contiguous()


def _jobs(plan: Plan, layout, chunk_bytes: int):
    """(tensor, rows, last chunk of the tensor?) for every chunk of a shard, in write order."""
    for spec in layout.order:
        tensor = plan.tensors[spec.key]
        ranges = list(_chunks(tensor, chunk_bytes))
        for i, rows in enumerate(ranges):
            yield tensor, rows, i == len(ranges) - 1


def _chunk_bytes(tensor: PlannedTensor, rows: Chunk | None) -> int:
    node = tensor.node
    return node.nbytes if rows is None else math.prod(rows.shape(node.shape)) * dtypes.itemsize(node.dtype)


def _compute_threads() -> int:
    """Threads computing chunks: one per core this process may use, at most 4 (each holds a few
    chunks of memory)."""
    given = os.environ.get("MOECONV_THREADS", "")
    if given:
        if not (given.isascii() and given.isdigit() and int(given) > 0):
            raise MoeconvError(f"MOECONV_THREADS={given!r}: must be a positive whole number of threads")
        return int(given)
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def _worker_thread(niceness: int) -> None:
    """Set up a compute or writer thread. `niceness`: lower its CPU priority (Linux: per thread)."""
    if niceness and sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + niceness)


_thread_state = threading.local()


def _torch_on_this_thread_alone() -> None:
    """Before a worker thread's first torch work: its kernels run on it alone (OpenMP's setting is
    per thread): the pool's threads already fill the cores, and OpenMP teams on top spun idle for
    ~10 % of all CPU time. Here rather than at thread start, which would wait for torch's import."""
    if not getattr(_thread_state, "single", False):
        import torch

        torch.set_num_threads(1)
        _thread_state.single = True


def _produce_on_worker(tensor: PlannedTensor, rows: Chunk | None):
    if not copies_bytes(tensor):
        _torch_on_this_thread_alone()
    return _produce(tensor, rows)


def _load_torch_libraries() -> None:
    """dlopen torch's native libraries through ctypes, which lets go of the GIL meanwhile.

    `import torch` holds the GIL while the dynamic loader maps and relocates them, and every copy
    thread stalls (a thread ticking beside a cold import: 0.50-0.74 s at once); ctypes lets go of
    it (0.06-0.08 s). The import then finds them loaded: same libraries, same flags (RTLD_NOW,
    local). Best effort: any failure leaves it to the import.
    """
    try:
        spec = importlib.util.find_spec("torch")
        library = Path(spec.origin).parent / "lib" / "libtorch_python.so"  # pulls in libtorch_cpu, libc10
        if library.is_file():
            import ctypes

            ctypes.CDLL(str(library))
    except (ImportError, AttributeError, TypeError, OSError, ValueError):
        pass


def _import_kernels() -> None:
    """Import torch and the MXFP4 kernel, its ~1,750 module files read ahead from the import hint:
    read one at a time as the import asks, they queue behind the copies' big reads, and the expert
    kernels wait for the import. A small gain, if any (2-layer gpt-oss, cold, report recalled:
    faster in 16 of 26 interleaved pairs, medians 0.7-4.6 % lower; benchmarks/RESULTS.md)."""
    if "torch" in sys.modules:  # imported by whoever called us: nothing to read ahead or learn
        importlib.import_module("moeconv.mxfp4")
        return
    before, hint = set(sys.modules), import_hint.read(import_hint.TORCH)
    # One file at a time: this import is not what the run waits for, and 32 threads' worth of GIL
    # hand-offs cost the busy conversion more (report computed, 8 pairs: 7.69 -> 8.00 s, with the child's).
    import_hint.read_ahead(hint)
    _load_torch_libraries()
    importlib.import_module("moeconv.mxfp4")  # torch, and the MXFP4 kernel's tables
    # Module files only: hinted, torch's libraries (libtorch_cpu.so alone is 434 MB) delayed the run (report_process.py).
    import_hint.learn(import_hint.TORCH, import_hint.imported_since(before), hint)


def import_torch_early(plan: Plan) -> None:
    """Start importing torch (and the MXFP4 kernel) on a thread, when some tensor of the plan needs
    it: the pass-through copies ahead of it go on meanwhile. The first use of torch elsewhere
    waits for this import to finish (Python's import lock)."""
    if not all(copies_bytes(t) for t in plan.tensors.values()):
        threading.Thread(target=_import_kernels, name="moeconv-import", daemon=True).start()


class _ComputePool:
    """Computes chunks on several threads (torch kernels and preads release the GIL) and hands them
    back in order. At most `threads` + 1 chunks are submitted and not yet handed out, and together
    at most `budget` bytes unless one chunk alone is bigger (a 235 MB Mixtral expert: one at a time)."""

    def __init__(self, threads: int, budget: int, niceness: int = 0):
        self.threads, self.budget = threads, budget
        self.pool = None
        if threads > 1:
            self.pool = ThreadPoolExecutor(threads, thread_name_prefix="moeconv-compute", initializer=_worker_thread, initargs=(niceness,))

    def ordered(self, jobs):
        """Yield (tensor, chunk, last) for each (tensor, rows, last) job, in the jobs' order."""
        if self.pool is None:
            for tensor, rows, last in jobs:
                yield tensor, _produce(tensor, rows), last
            return
        pending: deque = deque()  # (tensor, future, last, bytes), in write order
        try:
            for tensor, rows, last in jobs:
                size = _chunk_bytes(tensor, rows)
                while pending and (len(pending) > self.threads or sum(p[3] for p in pending) + size > self.budget):
                    done, future, done_last, _ = pending.popleft()
                    yield done, future.result(), done_last
                pending.append((tensor, self.pool.submit(_produce_on_worker, tensor, rows), last, size))
            while pending:
                done, future, done_last, _ = pending.popleft()
                yield done, future.result(), done_last
        finally:
            for _, future, _, _ in pending:  # a failure or interrupt: drop what nobody will write
                future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _BackgroundWriter:
    """Writes (key, chunk) pairs on a thread so the next chunk is computed meanwhile.

    The hand-off is built from C primitives (a SimpleQueue, and a lock held while a chunk waits in
    it), because Ctrl-C raises KeyboardInterrupt in the main thread between any two bytecodes:
    inside queue.Queue's pure-Python condition variables it could lose the writer's wake-up, and
    one run of the signal tests hung with the writer asleep in get() after close() had queued its
    end marker. A put interrupted after taking the lock only leaves it taken; close() needs none.
    """

    def __init__(self, writer: ShardWriter, progress: Progress | None, shard: str, niceness: int = 0):
        self.writer, self.progress, self.shard, self.niceness = writer, progress, shard, niceness
        self.chunks: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting = threading.Lock()  # held while a chunk waits in `chunks`: the compute pool holds the ones ahead
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        _worker_thread(self.niceness)
        while (item := self.chunks.get()) is not _DONE:
            self.waiting.release()
            if self.error is not None:
                continue  # drain after a failure
            key, chunk = item
            try:
                if not isinstance(chunk, memoryview):
                    _torch_on_this_thread_alone()  # the stage copy goes through torch
                self.writer.write(key, chunk)
                if self.progress:
                    self.progress(self.shard, chunk.nbytes if isinstance(chunk, memoryview) else chunk.numel() * chunk.element_size())
            except BaseException as error:  # handed to the main thread in put()/close()
                self.error = error

    def put(self, key: str, chunk) -> None:
        if self.error is not None:
            raise self.error
        self.waiting.acquire()
        self.chunks.put((key, chunk))

    def close(self) -> None:
        self.chunks.put(_DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error


def staged_name(name: str) -> str:
    """Where a finished shard waits until every shard is done: hidden, and no loader's `*.safetensors`."""
    return f".{name}.staged"


def plan_fingerprint(plan: Plan, checksum: str = DEFAULT_CHECKSUM) -> str:
    """What a journal must match for --resume: every output tensor and shard layout, the recipes'
    TOML, the options (with the checksum algorithm), and the source's header layout (its data is
    not re-read)."""
    basis = {
        "tensors": plan.tensors_json(),
        "shards": plan.shards_json(),
        "recipes": [r.text for r in plan.recipes],
        "options": {**{k: v for k, v in plan.rebuild().items() if k != "recipes"}, "checksum": checksum},
        "source": [[k, i.dtype, list(i.shape), i.file.name, i.begin, i.end] for k, i in plan.source.tensors.items()],
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def _leftovers(out: Path) -> list[Path]:
    """Temp files of unfinished writes and staged shards of an unfinished run."""
    return [*out.glob(".*.tmp"), *out.glob(".*.staged")]


class _OldOutput:
    """Deletes the files an --overwrite run replaces.

    Deleting a big file keeps the disk busy a while (a 4.5 GB shard: 0.6-0.7 s here, ext4 mounted
    with discard) and nothing else moves meanwhile. So the old files are renamed into a hidden
    folder at once (out of any loader's sight; a failed rename still stops the run before it
    starts), and when the disk has room for the new output beside them, deleted on a thread while
    the conversion runs; otherwise before it starts, as the space is needed. Whatever the folder
    still holds from an interrupted run goes too.
    """

    def __init__(self, out: Path, paths: list[Path], room_needed: int):
        self.error: OSError | None = None
        self.thread: threading.Thread | None = None
        self.folder = out / REPLACED_NAME
        if not paths and not os.path.lexists(self.folder):
            return
        try:
            if self.folder.is_symlink() or self.folder.is_file():
                self.folder.unlink()  # not one we made: never follow a link to delete its target
            self.folder.mkdir(exist_ok=True)
            for path in paths:
                os.replace(path, self.folder / path.name)
            room = shutil.disk_usage(out).free >= room_needed
        except OSError as error:
            raise self._cannot_delete(error) from None
        if room:
            self.thread = threading.Thread(target=self._delete, name="moeconv-delete", daemon=True)
            self.thread.start()
        else:
            self._delete()
            self.wait()

    def _delete(self) -> None:
        try:
            for path in self.folder.iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            self.folder.rmdir()
        except OSError as error:
            self.error = error

    def wait(self) -> None:
        """Return once the old files are gone; a failure to delete them is a WriteError."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise self._cannot_delete(error)

    @staticmethod
    def _cannot_delete(error: OSError) -> WriteError:
        return WriteError(f"{error.filename}: cannot delete this file of the replaced output: {error.strerror or error}")


def prepare_output(
    out_dir: Path,
    source_root: Path,
    overwrite: bool,
    *,
    resume: bool = False,
    fingerprint: str | None = None,
    checksum: str = DEFAULT_CHECKSUM,
) -> tuple[dict[str, dict], list[Path]]:
    """Refuse an output folder that is the source, inside it, or not empty (unless overwrite or resume).

    Returns (kept shards, replaced files). With `overwrite`, the old report, index and journal are
    deleted here; the old shards and leftovers are the replaced files, for the caller to delete
    (_OldOutput).

    With `resume` and a progress journal there, the shards it lists are kept when their bytes still
    hash to what it recorded: {shard name: {"size", "checksum"}} of the kept ones. A journal
    written with another `checksum` algorithm is refused (started over with `overwrite`).
    """
    out = out_dir.resolve()
    src = source_root.resolve()
    if out == src or src in out.parents:
        raise WriteError(f"{out_dir}: output folder is the source folder or inside it; choose another folder")
    if out.exists() and not out.is_dir():
        raise WriteError(f"{out_dir}: exists and is not a folder")
    journal = out / JOURNAL_NAME
    if out.exists() and any(out.iterdir()):
        if resume and journal.is_file():
            kept = _resume(out_dir, fingerprint, overwrite, checksum)
            if kept is not None:
                return kept, []
        elif not overwrite:
            if journal.is_file():
                raise WriteError(
                    f"{out_dir}: holds an unfinished conversion ({JOURNAL_NAME}); pass --resume to continue it"
                    " (same source, recipes and options) or --overwrite to start over"
                )
            if resume:
                raise WriteError(f"{out_dir}: nothing to resume (no {JOURNAL_NAME}); pass --overwrite to replace its contents")
            raise WriteError(f"{out_dir}: output folder is not empty; pass --overwrite to replace its contents")
        # The report and index go first so a half-replaced folder never looks complete.
        for name in (REPORT_NAME, INDEX_NAME):
            (out / name).unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
        return {}, [*out.glob("*.safetensors"), *_leftovers(out)]
    out.mkdir(parents=True, exist_ok=True)
    return {}, []


def _resume(out_dir: Path, fingerprint: str | None, overwrite: bool, checksum: str) -> dict[str, dict] | None:
    """Check the journal against the plan and checksum algorithm; keep each journaled shard whose
    file still hashes right, delete everything else an unfinished run left. None: start over
    (--overwrite, journal unusable)."""
    out = out_dir.resolve()
    try:
        journal = json.loads((out / JOURNAL_NAME).read_text(encoding="utf-8"))
        shards = journal["shards"]
        assert isinstance(shards, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        if overwrite:
            return None
        raise WriteError(f"{out_dir}: {JOURNAL_NAME} is unreadable; pass --overwrite to start over") from None
    recorded = journal.get("algorithm")
    if recorded != checksum:  # its hashes cannot vouch for the shards under another algorithm
        if overwrite:
            return None
        if not isinstance(recorded, str):
            raise WriteError(f"{out_dir}: {JOURNAL_NAME} records no checksum algorithm (another moeconv version); pass --overwrite to start over")
        raise WriteError(
            f"{out_dir}: the unfinished conversion there checksummed its shards with {recorded}, not {checksum};"
            f" rerun with --checksum {recorded} to resume it, or pass --overwrite to start over"
        )
    if journal.get("fingerprint") != fingerprint:
        if overwrite:
            return None
        raise WriteError(
            f"{out_dir}: the unfinished conversion there was planned from another source, recipes or options;"
            " rerun with the same ones, or pass --overwrite to start over"
        )
    for name in (REPORT_NAME, INDEX_NAME):  # a run killed while renaming its shards into place
        (out / name).unlink(missing_ok=True)
    for path in out.glob(".*.tmp"):
        path.unlink()
    kept: dict[str, dict] = {}
    for name, entry in shards.items():
        if not isinstance(name, str) or Path(name).name != name or not isinstance(entry, dict):
            continue
        staged, final = out / staged_name(name), out / name
        found = staged if staged.is_file() else final if final.is_file() else None
        if found is not None and found.stat().st_size == entry.get("size") and file_checksum(found, checksum) == entry.get("checksum"):
            if found == final:
                os.replace(final, staged)
            kept[name] = {"size": entry["size"], "checksum": entry["checksum"]}
    for path in out.glob(".*.staged"):
        if path.name.removeprefix(".").removesuffix(".staged") not in kept:
            path.unlink()
    for path in out.glob("*.safetensors"):
        path.unlink()
    return kept


def _write_journal(out_dir: Path, fingerprint: str, checksum: str, shards: dict[str, dict]) -> None:
    data = {"fingerprint": fingerprint, "algorithm": checksum, "shards": shards}
    # Not fsynced, like the shards it lists (see execute): --resume re-hashes every shard it keeps.
    atomic_write_bytes(out_dir / JOURNAL_NAME, (json.dumps(data, indent=2) + "\n").encode(), sync=False)


def _abandon(out_dir: Path, plan: Plan, finished: dict[str, dict], error: BaseException) -> None:
    """After a failure: with no finished shard there is nothing to resume, so the journal goes too;
    otherwise say how to continue. The unfinished shard's temp file is gone already, except when
    Ctrl-C lands as a temp file is created, before any code owns it (while another thread holds
    the GIL, the open() returns late); any temp file of this run is removed here."""
    ours = [staged_name(layout.name) for layout in plan.shards] + [JOURNAL_NAME, INDEX_NAME, "config.json", REPORT_NAME]
    for name in ours + list(plan.companion_files):
        for temp in out_dir.glob(f".{glob.escape(name)}.*.tmp"):
            temp.unlink(missing_ok=True)
    if not finished:
        (out_dir / JOURNAL_NAME).unlink(missing_ok=True)
    elif isinstance(error, MoeconvError):
        error.args = (f"{error}; {len(finished)} finished shard(s) kept out of sight in {out_dir}: rerun with --resume to continue",)


def input_schedule(plan: Plan) -> tuple[dict[int, list[Path]], int]:
    """--low-disk bookkeeping, from the plan alone: (output position -> input files no later output
    tensor needs, so they can go once that tensor is written; the peak bytes of input files held).

    Positions count output tensors in the order execute writes them (shard by shard). A file is
    held from the first output tensor that reads it to the last one.
    """
    order = [spec.key for layout in plan.shards for spec in layout.order]
    first: dict[Path, int] = {}
    last: dict[Path, int] = {}
    for position, key in enumerate(order):
        for source_key in plan.tensors[key].sources:
            file = plan.source.tensors[source_key].file
            first.setdefault(file, position)
            last[file] = position
    size: dict[Path, int] = {}
    for info in plan.source.tensors.values():  # a shard's data ends at its last byte
        size[info.file] = max(size.get(info.file, 0), info.end)
    release: dict[int, list[Path]] = {}
    for file, position in last.items():
        release.setdefault(position, []).append(file)
    peak = max((sum(size[f] for f in first if first[f] <= p <= last[f]) for p in range(len(order))), default=0)
    return release, peak


def execute(
    plan: Plan,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    chunk_bytes: int | None = None,
    progress: Progress | None = None,
    low_disk: bool = False,
    resume: bool = False,
    checksum: str = DEFAULT_CHECKSUM,
) -> dict:
    """Write the planned checkpoint to `out_dir`: shards, index, config, small files, then the report.

    Every file is written under a temporary name and renamed when complete; the index and the
    report come last, so an interrupted run never leaves a folder that looks complete.
    `low_disk` (hub sources only): each input shard is deleted (`Checkpoint.release_file`) as soon
    as no later output tensor needs it; the report records it and the peak input bytes held.
    `resume`: continue the unfinished run in `out_dir` (see `prepare_output`): shards its journal
    lists and whose bytes still hash right are kept, the rest is redone; the result is byte-identical.
    `checksum`: the algorithm (moeconv.checksum.ALGORITHMS) of the report's `checksums` and the
    journal; a journal written with another one is refused for resume.
    `chunk_bytes`: about how much of a tensor is computed at once (default CHUNK_BYTES, or
    MOECONV_CHUNK_BYTES); memory in flight is a small multiple of it.
    Returns the report that was written to `out_dir/moeconv-report.json`.
    """
    out_dir = Path(out_dir)
    if low_disk and plan.source.evict is None:
        raise WriteError(f"{plan.source.origin}: --low-disk deletes input shards, so it only works on hub repo ids, never on local files")
    new_hasher(checksum)  # an unknown algorithm fails before anything is touched
    threads = _compute_threads()
    import_torch_early(plan)
    fingerprint = plan_fingerprint(plan, checksum)
    kept, replaced = prepare_output(out_dir, plan.source.root, overwrite, resume=resume, fingerprint=fingerprint, checksum=checksum)
    old_output = _OldOutput(out_dir.resolve(), replaced, room_needed=sum(layout.size for layout in plan.shards))
    release, peak_input = input_schedule(plan) if low_disk else ({}, 0)
    chunk_bytes = chunk_bytes or int(os.environ.get("MOECONV_CHUNK_BYTES", CHUNK_BYTES))  # test hooks: small chunks,
    delay = float(os.environ.get("MOECONV_CHUNK_DELAY", 0))  # and a pause after each (interrupt tests)
    # Finished shards wait under hidden staged names, recorded in the journal, until every shard is
    # done; only then do they all get their final names (then index, config, report). So a failed
    # or interrupted run never leaves a final-named shard, and --resume can keep what was finished.
    # The shards are fsynced together at the end, not each as it finishes, and the journal never:
    # on this kind of virtual disk every fsync flushed the disk's cache for 0.3-1.4 s with nothing
    # else moving (2-layer gpt-oss: 0.83 + 1.30 s for its two shards), and the I/O floor pays one.
    # A process that dies keeps them all (the page cache outlives it); after a machine crash,
    # --resume re-hashes every shard the journal lists and redoes any that did not survive whole.
    finished = dict(kept)
    position = 0
    # While the load report is computed in its child process, the conversion's threads give way to
    # it: it is what the run waits for at the end (2-layer gpt-oss: 10.4 -> 9.5 s over 8 pairs).
    niceness = YIELD_TO_REPORT if plan.report_pending else 0
    compute = _ComputePool(threads, AHEAD_CHUNKS * chunk_bytes, niceness)
    try:
        _write_journal(out_dir, fingerprint, checksum, finished)
        with buffers.recycling(RECYCLE_CHUNKS * chunk_bytes):
            for layout in plan.shards:
                if layout.name in finished:  # kept by --resume: its bytes were checked against the journal
                    position += len(layout.order)
                    if progress:
                        progress(layout.name, sum(spec.nbytes for spec in layout.order))
                    continue
                with ShardWriter(out_dir, layout, out_dir / staged_name(layout.name), checksum=checksum) as writer:
                    background = _BackgroundWriter(writer, progress, layout.name, niceness)
                    try:
                        for tensor, chunk, last in compute.ordered(_jobs(plan, layout, chunk_bytes)):
                            for piece in chunk if isinstance(chunk, tuple) else (chunk,):
                                background.put(tensor.key, piece)
                            if delay:
                                time.sleep(delay)
                            if last:
                                tensor.node.release()
                                for file in release.get(position, ()):
                                    plan.source.release_file(file)  # unlinking a mapped file is safe: queued chunks keep their pages
                                position += 1
                    finally:
                        background.close()
                    writer.finish(sync=False)
                finished[layout.name] = {"size": layout.size, "checksum": writer.checksum}
                _write_journal(out_dir, fingerprint, checksum, finished)
        old_output.wait()
    except BaseException as error:
        if isinstance(error, Exception):  # not Ctrl-C: the next run would find them (_leftovers)
            with contextlib.suppress(WriteError):
                old_output.wait()
        _abandon(out_dir, plan, finished, error)
        raise
    finally:
        compute.close()
    renamed: list[str] = []
    try:
        for layout in plan.shards:  # durable before any of them gets its final name (see above)
            fsync_file(out_dir / staged_name(layout.name))
        for layout in plan.shards:
            os.replace(out_dir / staged_name(layout.name), out_dir / layout.name)
            renamed.append(layout.name)
        _fsync_dir(out_dir)
        written: list[Path] = []
        index = write_index(out_dir, plan.shards)
        if index is not None:
            written.append(index)
        for name in plan.companion_files:
            target = out_dir / name
            atomic_write_bytes(target, (plan.source.root / name).read_bytes())
            written.append(target)
        if plan.config is not None:
            target = out_dir / "config.json"
            atomic_write_bytes(target, (json.dumps(plan.config, indent=2) + "\n").encode())
            written.append(target)
        hashes = {name: entry["checksum"] for name, entry in finished.items()}  # hashed while written
        hashes = {layout.name: hashes[layout.name] for layout in plan.shards}
        hashes.update({p.name: file_checksum(p, checksum) for p in written})
        report = {**plan.to_json(), "rebuild": plan.rebuild(), "checksums": {"algorithm": checksum, "files": hashes}}
        if low_disk:
            report.update(low_disk=True, peak_input_bytes=peak_input)
        atomic_write_bytes(out_dir / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
    except BaseException as error:
        (out_dir / INDEX_NAME).unlink(missing_ok=True)
        for name in renamed:  # back out of sight: the journal still lists them for --resume
            os.replace(out_dir / name, out_dir / staged_name(name))
        _abandon(out_dir, plan, finished, error)
        raise
    (out_dir / JOURNAL_NAME).unlink(missing_ok=True)
    return report
