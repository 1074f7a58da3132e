"""Execute a plan: stream source slices through the op chains, chunk by chunk, into the writer.

Nothing is decided here that the plan did not decide; a chunk that disagrees with the plan is a
bug and is reported as one. Computing and writing overlap: a writer thread takes finished chunks
from a short queue (torch kernels and file writes both release the GIL), so memory stays bounded
by a few chunks.
"""

import hashlib
import json
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from moeconv.errors import InternalError, OpError, WriteError
from moeconv.graph import chunk_rows
from moeconv.plan import Plan, PlannedTensor
from moeconv.writer import ShardWriter, atomic_write_bytes, write_index

CHUNK_BYTES = 64 * 2**20
REPORT_NAME = "moeconv-report.json"
_DONE = object()

Progress = Callable[[str, int], None]  # (shard name, bytes just written)


def _chunks(tensor: PlannedTensor, budget: int):
    """(start, stop) row ranges covering the tensor, or one None for a 0-d tensor."""
    node = tensor.node
    if not node.shape:
        yield None
        return
    step = chunk_rows(node, budget)
    for start in range(0, node.shape[0], step):
        yield start, min(start + step, node.shape[0])


def _produce(tensor: PlannedTensor, rows: tuple[int, int] | None):
    node = tensor.node
    try:
        chunk = node.whole() if rows is None else node.rows(*rows)
    except OpError as error:  # data-dependent problems (fp16 overflow) only show up here
        raise OpError(f"'{tensor.key}' (rule '{'/'.join(tensor.rules)}'): {error}") from None
    expected = node.shape if rows is None else (rows[1] - rows[0], *node.shape[1:])
    if tuple(chunk.shape) != tuple(expected) or chunk.dtype != node.dtype:
        raise InternalError(
            f"rule '{'/'.join(tensor.rules) or 'pass-through'}' produced {chunk.dtype} {list(chunk.shape)} for "
            f"'{tensor.key}' rows {rows}, the plan says {node.dtype} {list(expected)}: this is a moeconv bug"
        )
    return chunk.contiguous()


class _BackgroundWriter:
    """Writes (key, chunk) pairs on a thread so the next chunk is computed meanwhile."""

    def __init__(self, writer: ShardWriter, progress: Progress | None, shard: str):
        self.writer, self.progress, self.shard = writer, progress, shard
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not _DONE:
            if self.error is not None:
                continue  # drain after a failure
            key, chunk = item
            try:
                self.writer.write(key, chunk)
                if self.progress:
                    self.progress(self.shard, chunk.numel() * chunk.element_size())
            except BaseException as error:  # handed to the main thread in put()/close()
                self.error = error

    def put(self, key: str, chunk) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((key, chunk))

    def close(self) -> None:
        self.queue.put(_DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error


def prepare_output(out_dir: Path, source_root: Path, overwrite: bool) -> None:
    """Refuse an output folder that is the source, inside it, or not empty (unless overwrite)."""
    out = out_dir.resolve()
    src = source_root.resolve()
    if out == src or src in out.parents:
        raise WriteError(f"{out_dir}: output folder is the source folder or inside it; choose another folder")
    if out.exists() and not out.is_dir():
        raise WriteError(f"{out_dir}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise WriteError(f"{out_dir}: output folder is not empty; pass --overwrite to replace its contents")
        # The report and index go first so a half-replaced folder never looks complete.
        for name in (REPORT_NAME, "model.safetensors.index.json"):
            (out / name).unlink(missing_ok=True)
        for path in out.glob("*.safetensors"):
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(16 * 2**20):
            digest.update(block)
    return digest.hexdigest()


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
    chunk_bytes: int = CHUNK_BYTES,
    progress: Progress | None = None,
    low_disk: bool = False,
) -> dict:
    """Write the planned checkpoint to `out_dir`: shards, index, config, small files, then the report.

    Every file is written under a temporary name and renamed when complete; the index and the
    report come last, so an interrupted run never leaves a folder that looks complete.
    `low_disk` (hub sources only): each input shard is deleted (`Checkpoint.release_file`) as soon
    as no later output tensor needs it; the report records it and the peak input bytes held.
    Returns the report that was written to `out_dir/moeconv-report.json`.
    """
    out_dir = Path(out_dir)
    if low_disk and plan.source.evict is None:
        raise WriteError(f"{plan.source.origin}: --low-disk deletes input shards, so it only works on hub repo ids, never on local files")
    prepare_output(out_dir, plan.source.root, overwrite)
    release, peak_input = input_schedule(plan) if low_disk else ({}, 0)
    position = 0
    written: list[Path] = []
    for layout in plan.shards:
        with ShardWriter(out_dir, layout) as writer:
            background = _BackgroundWriter(writer, progress, layout.name)
            try:
                for spec in layout.order:
                    tensor = plan.tensors[spec.key]
                    for rows in _chunks(tensor, chunk_bytes):
                        background.put(spec.key, _produce(tensor, rows))
                    tensor.node.release()
                    for file in release.get(position, ()):
                        plan.source.release_file(file)  # unlinking a mapped file is safe: queued chunks keep their pages
                    position += 1
            finally:
                background.close()
            written.append(writer.finish())
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
    report = {**plan.to_json(), "sha256": {path.name: _sha256(path) for path in written}}
    if low_disk:
        report.update(low_disk=True, peak_input_bytes=peak_input)
    atomic_write_bytes(out_dir / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
    return report
