"""Human views of a plan and of a running conversion or verification (rich, on stderr or stdout)."""

import os
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from moeconv.display import Column, KeyRow, human_bytes, key_table, print_all, printable, safe, shape_text
from moeconv.keys import collapse_keys
from moeconv.plan import Plan, PlannedTensor
from moeconv.report import render_report

PLAN_COLUMNS = [Column("dtype"), Column("shape"), Column("count", right=True, optional=True), Column("bytes", right=True)]


def _via(tensor: PlannedTensor) -> str:
    """What made a tensor: its op chain, 'renamed by rule ...', or '' (copied as is)."""
    if tensor.ops:
        return " -> ".join(tensor.ops)
    if tensor.sources != (tensor.key,):
        return f"renamed by {' then '.join(repr(r) for r in tensor.rules) or 'a rule'}"
    return ""


def plan_rows(plan: Plan) -> list[KeyRow]:
    """One row per group of output keys that differ only in layer/expert indices and share dtype,
    shape and what made them, in the order of the plan's first member."""
    by_signature: dict[tuple, list[str]] = {}
    for tensor in plan.tensors.values():
        by_signature.setdefault((tensor.dtype, tensor.shape, _via(tensor)), []).append(tensor.key)
    rows = []
    for (dtype, shape, via), keys in by_signature.items():
        for pattern, members in collapse_keys(keys):
            size = sum(plan.tensors[k].nbytes for k in members)
            cells = (dtype, shape_text(shape), f"x{len(members)}", human_bytes(size))
            rows.append((members[0], KeyRow(pattern, cells, via)))
    position = {key: i for i, key in enumerate(plan.tensors)}
    return [row for _, row in sorted(rows, key=lambda r: position[r[0]])]


def render_plan(plan: Plan, console: Console, *, report: bool = True, wide: bool = False, dry_run: bool = False) -> None:
    """The planned output: tensors (layer indices collapsed), shards, files copied, warnings, and
    (with `report`) the load report."""
    title = f"planned output: {len(plan.tensors)} tensors, {human_bytes(plan.total_bytes)}"
    parts = key_table(console, title, PLAN_COLUMNS, plan_rows(plan), note_header="via", wide=wide)
    shards = Table(title="shards", title_justify="left", box=None, pad_edge=False)
    shards.add_column("file")
    shards.add_column("tensors", justify="right")
    shards.add_column("bytes", justify="right")
    shards.add_column(f"not {plan.align}-aligned", justify="right")
    for layout in plan.shards:
        shards.add_row(layout.name, str(len(layout.order)), human_bytes(layout.size), str(len(layout.misaligned)))
    print_all(console, *parts, "", shards, wide=wide)
    copies = ", ".join(safe(name) for name in plan.companion_files)
    config = "config.json (rewritten)" if plan.config is not None else ""
    if config or copies:
        verb = "would write next to the shards" if dry_run else "next to the shards"
        console.print(f"{verb}: {', '.join(filter(None, (config, copies)))}", highlight=False)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {safe(warning)}", highlight=False)
    if report:
        render_report(plan.report, console)


# ---- progress ----------------------------------------------------------------------------------------

LINE_SECONDS = 10.0  # off a terminal: a progress line at least this often (MOECONV_PROGRESS_SECONDS)


class _Bytes(ProgressColumn):
    """'12.5/465.3 KiB': done and total in the total's binary unit."""

    def render(self, task) -> Text:
        total = int(task.total or 0)
        unit = human_bytes(total).split()[-1]
        scale = 1024 ** ["B", "KiB", "MiB", "GiB", "TiB", "PiB"].index(unit)
        digits = 0 if unit == "B" else 1
        return Text(f"{task.completed / scale:.{digits}f}/{total / scale:.{digits}f} {unit}", style="progress.download")


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{human_bytes(int(speed))}/s", style="progress.data.speed")


def _seconds(text: str) -> float:
    """MOECONV_PROGRESS_SECONDS, or the default when unset or not a number of seconds."""
    try:
        return max(0.0, float(text))
    except ValueError:
        return LINE_SECONDS


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Meter:
    """Bytes going through named parts (shards, files) in phases ("writing", "hashing"):

    - "bar": a rich bar per phase with bytes, rate and ETA, and one for the current part;
    - "lines": timestamped plain lines (CI logs, pipes): as each part completes, and every few seconds;
    - "off": nothing (--quiet).

    `advance` may be called from any thread."""

    def __init__(self, console: Console, mode: str, interval: float | None = None):
        self.console, self.mode = console, mode
        self.interval = interval if interval is not None else _seconds(os.environ.get("MOECONV_PROGRESS_SECONDS", ""))
        self.lock = threading.Lock()
        self.progress: Progress | None = None
        self.label, self.total, self.done, self.parts, self.noun = "", 0, 0, {}, "file"
        self.part_done: dict[str, int] = {}
        self.started = self.last_line = 0.0
        self.task = self.part_task = None
        self.current: str | None = None

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def phase(self, label: str, total: int, parts: dict[str, int] | None = None, noun: str = "file") -> None:
        """Start counting `total` bytes under `label`; `parts`: name -> bytes, each reported when
        complete (on the bar: `noun` k/n)."""
        with self.lock:
            self.label, self.total, self.done, self.parts, self.noun = label, total, 0, dict(parts or {}), noun
            self.part_done = dict.fromkeys(self.parts, 0)
            self.started = self.last_line = time.monotonic()
            self.current = None
            if self.mode == "bar" and self.progress is None:  # started by the first phase: nothing shows before
                columns = (TextColumn("{task.description}"), BarColumn(bar_width=24), _Bytes(), _Rate(), TimeRemainingColumn())
                self.progress = Progress(*columns, console=self.console, transient=False)
                self.progress.start()
            if self.progress is not None:
                if self.part_task is not None:  # the previous phase's current part
                    self.progress.update(self.part_task, visible=False)
                self.task = self.progress.add_task(label, total=total)
                self.part_task = self.progress.add_task("", total=1, visible=False) if len(self.parts) > 1 else None

    def advance(self, nbytes: int, part: str | None = None) -> None:
        """`nbytes` more done (in `part`)."""
        with self.lock:
            self.done += nbytes
            finished = None
            if part is not None and part in self.part_done:
                self.part_done[part] += nbytes
                if self.part_done[part] >= self.parts[part]:
                    finished = part
            if self.progress is not None:
                self._advance_bar(nbytes, part)
            elif self.mode == "lines":
                now = time.monotonic()
                if finished or now - self.last_line >= self.interval or self.done >= self.total:
                    self.last_line = now
                    self._line(now, finished)

    def _advance_bar(self, nbytes: int, part: str | None) -> None:
        self.progress.advance(self.task, nbytes)
        if self.part_task is None or part is None:
            return
        if part != self.current:
            self.current = part
            number = list(self.parts).index(part) + 1 if part in self.parts else "?"
            description = f"  {self.noun} {number}/{len(self.parts)}"
            self.progress.reset(self.part_task, total=self.parts.get(part, 1), description=description, visible=True)
        self.progress.advance(self.part_task, nbytes)

    def _line(self, now: float, finished: str | None) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        eta = f", ETA {_clock((self.total - self.done) / rate)}" if rate and self.done < self.total else ""
        line = f"{time.strftime('%H:%M:%S')} {self.label}: {human_bytes(self.done)} of {human_bytes(self.total)}{share}"
        line += f", {human_bytes(int(rate))}/s{eta}"
        if finished:
            line += f"; {printable(finished)} done ({human_bytes(self.parts[finished])})"
        self.console.print(line, markup=False, highlight=False)
