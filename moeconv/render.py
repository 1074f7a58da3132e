"""Human views of a plan and of a running conversion (rich, on stderr or stdout)."""

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from moeconv.display import human_bytes, print_all, safe
from moeconv.keys import collapse_keys
from moeconv.plan import Plan
from moeconv.report import render_report


def render_plan(plan: Plan, console: Console) -> None:
    """The planned output: tensors (layer indices collapsed), shards, warnings, load report."""
    table = Table(title=f"planned output ({len(plan.tensors)} tensors, {human_bytes(plan.total_bytes)})", title_justify="left")
    for column in ("key", "dtype", "shape", "count", "bytes", "from"):
        table.add_column(column, justify="right" if column in ("count", "bytes") else "left")
    by_signature: dict[tuple, list[str]] = {}
    for tensor in plan.tensors.values():
        by_signature.setdefault((tensor.dtype, tensor.shape, tensor.ops), []).append(tensor.key)
    rows = []
    for (dtype, shape, chain), keys in by_signature.items():
        for pattern, members in collapse_keys(keys):
            size = sum(plan.tensors[k].nbytes for k in members)
            origin = " -> ".join(chain) if chain else "as is"
            rows.append((members[0], safe(pattern), dtype, str(list(shape)), f"x{len(members)}", human_bytes(size), safe(origin)))
    first_keys = {tensor.key: i for i, tensor in enumerate(plan.tensors.values())}
    for row in sorted(rows, key=lambda r: first_keys[r[0]]):
        table.add_row(*row[1:])
    shards = Table(title="shards", title_justify="left")
    for column in ("file", "tensors", "bytes", f"not {plan.align}-aligned"):
        shards.add_column(column)
    for layout in plan.shards:
        shards.add_row(layout.name, str(len(layout.order)), human_bytes(layout.size), str(len(layout.misaligned)))
    print_all(console, table, shards)
    if plan.companion_files:
        console.print(f"copied: config.json, {safe(', '.join(plan.companion_files))}", highlight=False)
    for warning in plan.warnings:  # keys and rule names: shown as they are, never read as markup
        console.print(f"[yellow]warning:[/] {safe(warning)}", highlight=False)
    render_report(plan.report, console)


@contextmanager
def progress_bar(console: Console, plan: Plan, enabled: bool):
    """A progress callback (shard, bytes) showing per-shard and total bytes with rate and ETA."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        total = progress.add_task("total", total=plan.total_bytes)
        per_shard = {
            s.name: progress.add_task(s.name, total=sum(t.nbytes for t in s.order), visible=len(plan.shards) > 1)
            for s in plan.shards
        }

        def advance(shard: str, count: int) -> None:
            progress.advance(per_shard[shard], count)
            progress.advance(total, count)

        yield advance
