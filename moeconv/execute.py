"""Execute a plan: chunks of every output tensor, in write order, streamed into the shard writer.

Nothing is decided here that the plan did not decide. Reading, computing and writing overlap:
compute threads (one per core, at most 4; MOECONV_THREADS to choose) produce chunks a few ahead
(moeconv.stream), handed in write order to a writer thread; preads, torch kernels and file writes
all release the GIL. Each chunk is made in one arena of a fixed ring (moeconv.arena), reused only
once that chunk is written, so memory is the ring, whatever the model. The output folder's life
(staging, journal, resume, final renames) is moeconv.output's.
"""

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moeconv import arena
from moeconv.checksum import DEFAULT as DEFAULT_CHECKSUM
from moeconv.checksum import new_hasher
from moeconv.errors import MoeconvError, WriteError
from moeconv.format import ShardLayout
from moeconv.output import Output
from moeconv.plan import Plan, PlannedTensor
from moeconv.stream import CHUNK_BYTES, chunk_nbytes, chunks, produce
from moeconv.writer import ShardWriter

AHEAD_CHUNKS = 4  # bytes computed ahead of the writer, in chunks
ARENA_CHUNKS = 3  # an arena holds a chunk's reads, intermediates and output: ~2.5 chunks for gpt-oss
_DONE = object()

Progress = Callable[[str, int], None]  # (shard name, bytes just written)


def _compute_threads() -> int:
    """Threads computing chunks: one per core this process may use, at most 4 (each holds a chunk)."""
    given = os.environ.get("MOECONV_THREADS", "")
    if given:
        if not (given.isascii() and given.isdigit() and int(given) > 0):
            raise MoeconvError(f"MOECONV_THREADS={given!r}: must be a positive whole number of threads")
        return int(given)
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def _one_torch_thread() -> None:
    """A compute thread runs torch's kernels on itself alone (OpenMP's setting is per thread): the
    pool already fills the cores, and OpenMP teams on top spin idle."""
    import torch

    torch.set_num_threads(1)


class ComputePool:
    """Computes chunks on several threads and hands them back in order. At most `threads` + 1
    chunks are submitted and not yet handed out, and together at most `budget` bytes unless one
    chunk alone is bigger (then one at a time).

    Chunk memory: job j is made in arena j % len(ring). When job j is submitted, the jobs still
    alive are the pending ones (at most `threads`), and the two the writer may hold (one being
    written, one queued: `_BackgroundWriter.put` waits for the writer to take the one before), so
    a ring of `threads` + 4 arenas never reuses one whose chunk is still to be written."""

    def __init__(self, threads: int, budget: int, arena_bytes: int):
        self.threads, self.budget = threads, budget
        self.ring = [arena.Arena(arena_bytes) for _ in range(self.ring_size(threads))]
        self.jobs = 0
        self.pool = ThreadPoolExecutor(threads, "moeconv-compute", initializer=_one_torch_thread) if threads > 1 else None

    @staticmethod
    def ring_size(threads: int) -> int:
        """Arenas in the ring of a pool of `threads` (see the class doc)."""
        return threads + 4

    def _produce(self, slot: arena.Arena, tensor, rows):
        slot.reset()
        with arena.lending(slot):
            return produce(tensor, rows)

    def ordered(self, jobs):
        """Yield (tensor, chunk, last) for each (tensor, rows, last) job, in the jobs' order."""
        if self.pool is None:
            for tensor, rows, last in jobs:
                self.jobs += 1
                yield tensor, self._produce(self.ring[self.jobs % len(self.ring)], tensor, rows), last
            return
        pending: deque = deque()  # (tensor, future, last, bytes), in write order
        try:
            for tensor, rows, last in jobs:
                size = chunk_nbytes(tensor, rows)
                while pending and (len(pending) > self.threads or sum(p[3] for p in pending) + size > self.budget):
                    done, future, done_last, _ = pending.popleft()
                    yield done, future.result(), done_last
                self.jobs += 1
                slot = self.ring[self.jobs % len(self.ring)]
                pending.append((tensor, self.pool.submit(self._produce, slot, tensor, rows), last, size))
            while pending:
                done, future, done_last, _ = pending.popleft()
                yield done, future.result(), done_last
        finally:
            for _, future, _, _ in pending:  # a failure or interrupt: drop what nobody will write
                future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def pool_for(tensors: Iterable[PlannedTensor], threads: int, chunk_bytes: int) -> ComputePool:
    """The compute pool for writing these tensors: arenas as big as their largest chunk."""
    largest = min(chunk_bytes, max((t.nbytes for t in tensors), default=0))
    return ComputePool(threads, AHEAD_CHUNKS * chunk_bytes, ARENA_CHUNKS * largest)


def chunk_memory(tensors: Iterable[PlannedTensor], threads: int, chunk_bytes: int) -> int:
    """The most chunk memory writing these tensors holds: `pool_for`'s arenas, and the tensors
    computed whole (the plan warns of each; the one being written and the next, at most)."""
    tensors = list(tensors)
    largest = min(chunk_bytes, max((t.nbytes for t in tensors), default=0))
    whole = sum(sorted(t.nbytes for t in tensors if t.node.materializes)[-2:])
    return ComputePool.ring_size(threads) * ARENA_CHUNKS * largest + whole


class _BackgroundWriter:
    """Writes (key, chunk) pairs on a thread so the next chunk is computed meanwhile.

    The hand-off is built from C primitives (a SimpleQueue, and a lock held while a chunk waits in
    it), because Ctrl-C raises KeyboardInterrupt in the main thread between any two bytecodes:
    inside queue.Queue's pure-Python condition variables it could lose the writer's wake-up.
    """

    def __init__(self, writer: ShardWriter, progress: Progress | None, shard: str):
        self.writer, self.progress, self.shard = writer, progress, shard
        self.chunks: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting = threading.Lock()  # held while a chunk waits in `chunks`: the compute pool holds the ones ahead
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="moeconv-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        single = False
        while (item := self.chunks.get()) is not _DONE:
            self.waiting.release()
            if self.error is not None:
                continue  # drain after a failure
            key, chunk = item
            try:
                if not single and not isinstance(chunk, memoryview):  # the writer's stage copy goes through torch
                    _one_torch_thread()
                    single = True
                self.writer.write(key, chunk)
                if self.progress:
                    self.progress(
                        self.shard, chunk.nbytes if isinstance(chunk, memoryview) else chunk.numel() * chunk.element_size()
                    )
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


def write_shard(
    plan: Plan,
    layout: ShardLayout,
    path: Path,
    *,
    compute: ComputePool,
    checksum: str = DEFAULT_CHECKSUM,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Progress | None = None,
    tensor_done: Callable[[str], None] | None = None,
) -> dict:
    """Stream one planned shard into `path` (through a temp file): {"size", "checksum"} of the file.
    `tensor_done(key)` is called once each tensor is handed to the writer."""
    delay = float(os.environ.get("MOECONV_CHUNK_DELAY", 0))  # test hook: a pause after each chunk
    jobs = (
        (plan.tensors[spec.key], rows, i == len(ranges) - 1)
        for spec in layout.order
        for ranges in [list(chunks(plan.tensors[spec.key], chunk_bytes))]
        for i, rows in enumerate(ranges)
    )
    with ShardWriter(path.parent, layout, path, checksum=checksum) as writer:
        background = _BackgroundWriter(writer, progress, layout.name)
        try:
            for tensor, chunk, last in compute.ordered(jobs):
                for piece in chunk if isinstance(chunk, tuple) else (chunk,):
                    background.put(tensor.key, piece)
                if delay:
                    time.sleep(delay)
                if last:
                    tensor.node.release()
                    if tensor_done:
                        tensor_done(tensor.key)
        finally:
            background.close()
        writer.finish(sync=False)
    return {"size": layout.size, "checksum": writer.checksum}


def input_schedule(plan: Plan) -> tuple[dict[str, list[Path]], int]:
    """--low-disk bookkeeping, from the plan alone: (output key -> input files no later output
    tensor needs, so they can go once it is written; the peak bytes of input files held).
    Output tensors count in the order execute writes them (shard by shard)."""
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
    release: dict[str, list[Path]] = {}
    for file, position in last.items():
        release.setdefault(order[position], []).append(file)
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
    started: Callable[[list[str]], None] | None = None,
) -> dict:
    """Write the planned checkpoint to `out_dir`: shards, index, config, small files, then the report.

    Every file is written under a temporary name and renamed when complete; the index and the
    report come last, so an interrupted run never leaves a folder that looks complete.
    `low_disk` (hub sources only): each input shard is deleted (`Checkpoint.release_file`) as soon
    as no later output tensor needs it; the report records it and the peak input bytes held.
    `resume`: continue the unfinished run in `out_dir`: shards its journal lists and whose bytes
    still hash right are kept, the rest is redone; the result is byte-identical.
    `checksum`: the algorithm (moeconv.checksum.ALGORITHMS) of the report's `checksums` and the
    journal; a journal written with another one is refused for resume.
    `started(notes)`: called once the output folder is ready (refused or not, --resume decided),
    before any data is read; `notes` says what --resume kept or redid and why. An error it raises
    is handled as one of the run.
    `chunk_bytes`: about how much of a tensor is computed at once (default CHUNK_BYTES, or
    MOECONV_CHUNK_BYTES); memory in flight is a small multiple of it.
    Returns the report that was written to `out_dir/moeconv-report.json`.
    """
    if low_disk and plan.source.evict is None:
        raise WriteError(
            f"{plan.source.origin}: --low-disk deletes input shards, so it only works on hub repo ids, never on local files"
        )
    new_hasher(checksum)  # an unknown algorithm fails before anything is touched
    chunk_bytes = chunk_bytes or int(os.environ.get("MOECONV_CHUNK_BYTES", CHUNK_BYTES))
    release, peak_input = input_schedule(plan) if low_disk else ({}, 0)

    def tensor_done(key: str) -> None:
        for file in release.get(key, ()):
            plan.source.release_file(file)  # unlinking a file being read is safe: open descriptors keep it

    threads = _compute_threads()
    output = Output(out_dir, plan, overwrite=overwrite, resume=resume, checksum=checksum)
    kept = output.open()
    compute = pool_for(plan.tensors.values(), threads, chunk_bytes)
    try:
        if started:
            started(list(output.notes))
        for layout in plan.shards:
            if layout.name in kept:  # its bytes were checked against the journal
                if progress:
                    progress(layout.name, sum(spec.nbytes for spec in layout.order))
                continue
            manifest = write_shard(
                plan,
                layout,
                output.staged(layout.name),
                compute=compute,
                checksum=checksum,
                chunk_bytes=chunk_bytes,
                progress=progress,
                tensor_done=tensor_done,
            )
            output.record(layout.name, manifest)
    except BaseException as error:
        output.abandon(error)
        raise
    finally:
        compute.close()
    return output.finalize({"low_disk": True, "peak_input_bytes": peak_input} if low_disk else None)
