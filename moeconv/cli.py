"""The command line: parse, call the library, render. Thin on purpose.

Every MoeconvError becomes one line on stderr and exit code 1 (MOECONV_DEBUG=1 shows the traceback);
usage errors are typer's exit code 2. Machine output (--json) is the only thing on stdout.
"""

import functools
import importlib.metadata
import json
import os
import signal
import threading
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moeconv import checksum as checksums
from moeconv.display import printable, safe
from moeconv.errors import MoeconvError, OptionError

app = typer.Typer(
    name="moeconv",
    help="Convert Mixture-of-Experts checkpoints into the layout a backend wants, before it is loaded.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)
# In a terminal, long lines wrap at word boundaries; elsewhere (logs, pipes) they stay one greppable line.
stdout.soft_wrap, stderr.soft_wrap = not stdout.is_terminal, not stderr.is_terminal


def command(name: str | None = None, *, on: typer.Typer | None = None, **kwargs) -> Callable:
    """`app.command()` (or `on.command()`) plus the one error funnel: MoeconvError -> one line on
    stderr, exit code 1. Commands import the library inside their body: torch takes a second to
    import and `--help` should not wait for it."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(*args, **kw):
            previous = _raise_on_sigterm()
            try:
                return fn(*args, **kw)
            except MoeconvError as error:
                if os.environ.get("MOECONV_DEBUG") == "1":
                    raise
                stderr.print(f"error: {printable(str(error))}", markup=False, highlight=False)
                raise typer.Exit(1) from None
            except (KeyboardInterrupt, Terminated) as stop:
                # The with/finally blocks on the way up removed the file being written (see execute).
                signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
                stderr.print(
                    f"error: interrupted by {signal.Signals(signum).name}; the file being written was removed (convert: rerun with --resume to continue)",
                    highlight=False,
                )
                raise typer.Exit(128 + signum) from None
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)

        return (on or app).command(name, **kwargs)(guarded)

    return decorate


class Terminated(BaseException):
    """Raised by the SIGTERM handler, so cleanup runs as for Ctrl-C (KeyboardInterrupt); exit 143."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_on_sigterm():
    """Make SIGTERM raise Terminated in the main thread; the previous handler (None: not installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated(signum)

    return signal.signal(signal.SIGTERM, handler)


def _show_version(value: bool) -> None:
    if value:
        import moeconv

        # getattr: run from a folder holding a clone named moeconv, the package can be a namespace one
        version = getattr(moeconv, "__version__", None) or importlib.metadata.version("moeconv")
        stdout.print(f"moeconv {version}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", metavar="", is_eager=True, callback=_show_version, help="Print the version and exit."),
    ] = False,
) -> None:
    pass


def Flag(name: str, help: str, *short: str):  # noqa: N802  (reads as a type in signatures)
    """A boolean flag: no metavar in --help (the flag alone turns it on)."""
    return typer.Option(name, *short, metavar="", help=help)


JsonOption = Annotated[bool, Flag("--json", "Print one JSON object on stdout and nothing else (diagnostics stay on stderr).")]
WideOption = Annotated[bool, Flag("--wide", "Tables with every key and column in full, however wide the lines get.")]
QuietOption = Annotated[bool, Flag("--quiet", "Print nothing but warnings and errors (for scripts).", "-q")]
RevisionOption = Annotated[
    str | None, typer.Option("--revision", metavar="REV", help="Hub repo ids: branch, tag or commit (default: main).")
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", metavar="TOKEN", help="Hub repo ids: access token (default: HF_TOKEN or the stored login)."),
]


def _progress_mode(quiet: bool) -> str:
    """How progress is shown on stderr: a rich bar in a terminal, plain timestamped lines elsewhere."""
    return "off" if quiet else "bar" if stderr.is_terminal else "lines"


# ---- inspect ---------------------------------------------------------------------------------------
# (owned by the foundation work: reader + inspect rendering)


@command("inspect")
def inspect_command(
    src: Annotated[
        str,
        typer.Argument(
            metavar="CKPT", help="Checkpoint folder, .safetensors file, index.json, or hub repo id.", show_default=False
        ),
    ],
    as_json: JsonOption = False,
    wide: WideOption = False,
    revision: RevisionOption = None,
    token: TokenOption = None,
) -> None:
    """Show every tensor of a checkpoint (key, dtype, shape, bytes, file, 16-byte alignment), from headers only.

    A hub repo id is read from its headers alone (ranged requests), as a dry run does."""
    from moeconv.hub import open_source
    from moeconv.inspect import inspect_json, render

    with open_source(src, revision=revision, token=token) as checkpoint:
        if as_json:
            typer.echo(json.dumps(inspect_json(checkpoint), indent=2))
        else:
            render(checkpoint, stdout, wide=wide)


# ---- convert ---------------------------------------------------------------------------------------


MAX_SHARD_SIZE = 2**50  # 1 PiB


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1000' -> 1000 (as transformers reads max_shard_size);
    OptionError (one line) for anything else or outside 1 byte .. 1 PiB."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    number = text.strip().upper().rstrip()
    unit = number.lstrip("0123456789. ")
    digits = number[: len(number) - len(unit)]
    try:
        if len(digits) > 20:  # float() of a 400-digit number is inf, and int(inf) raises
            raise ValueError(digits)
        size = int(float(digits) * units[unit.strip()])
    except (ValueError, KeyError, OverflowError):
        raise OptionError(f"--max-shard-size {printable(text)!r} is not a size; use e.g. 5GB, 500MB or 2GiB") from None
    if not 1 <= size <= MAX_SHARD_SIZE:
        raise OptionError(f"--max-shard-size {printable(text)!r}: a shard size is from 1 byte to 1 PiB")
    return size


# --checksum choices, straight from moeconv.checksum (hashlib + xxhash: milliseconds to import)
Checksum = Enum("Checksum", {name: name for name in checksums.ALGORITHMS}, type=str)


def load_recipes(presets: list[str], recipes: list[str]) -> list:
    """Presets first, then recipe files, each in the order given; `--recipe preset:NAME` interleaves."""
    from moeconv.recipe import load_preset, load_recipe

    loaded = [load_preset(name) for name in presets]
    for item in recipes:
        loaded.append(load_preset(item.removeprefix("preset:")) if item.startswith("preset:") else load_recipe(item))
    return loaded


@command("convert")
def convert_command(
    src: Annotated[
        str, typer.Argument(metavar="SRC", help="Source checkpoint: a folder, a .safetensors file, or a hub repo id (org/name).")
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder (created; must be empty unless --overwrite).")],
    preset: Annotated[
        list[str], typer.Option("--preset", "-p", metavar="NAME", help="Built-in preset (see `moeconv presets`); repeatable.")
    ] = [],
    recipe: Annotated[
        list[str],
        typer.Option(
            "--recipe", "-r", metavar="FILE", help="Recipe TOML file, or preset:NAME; repeatable, applied after presets."
        ),
    ] = [],
    dry_run: Annotated[bool, Flag("--dry-run", "Plan and report only: read headers, write nothing.")] = False,
    json_output: JsonOption = False,
    strict: Annotated[
        bool, Flag("--strict", "Exit 3 before writing if the load report is not clean; rules that match nothing are errors.")
    ] = False,
    align: Annotated[
        int, typer.Option("--align", metavar="N", help="Start every tensor at a multiple of N bytes where the format allows.")
    ] = 16,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", metavar="SIZE", help="Largest shard, e.g. 5GB, 500MB, 2GiB.")
    ] = "5GB",
    dtype: Annotated[
        str | None, typer.Option("--dtype", metavar="DTYPE", help="Write every floating-point tensor as bf16, fp16 or fp32.")
    ] = None,
    overwrite: Annotated[bool, Flag("--overwrite", "Replace the contents of a non-empty output folder.")] = False,
    revision: RevisionOption = None,
    token: TokenOption = None,
    low_disk: Annotated[
        bool,
        Flag(
            "--low-disk",
            "Hub repo ids: fetch each shard when first needed and delete it from the huggingface_hub cache once converted.",
        ),
    ] = False,
    resume: Annotated[
        bool,
        Flag(
            "--resume",
            "Continue an interrupted run in OUT (same options, --checksum too): keep its finished shards whose checksum still matches, redo the rest.",
        ),
    ] = False,
    checksum: Annotated[
        Checksum,
        typer.Option(
            "--checksum",
            help="Hash of every output file in the report, for `moeconv verify` and --resume: xxh3-128 (fast integrity check against accidental change) or sha256 (slower; comparable to the hub's LFS oid).",
        ),
    ] = Checksum(checksums.DEFAULT),
    quiet: QuietOption = False,
    wide: WideOption = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Write the shards with Ray tasks on a cluster: ray://host:10001, auto, or local (a Ray instance on this machine). OUT, and a local SRC, must be at the same paths on every node. Needs moeconv[ray].",
        ),
    ] = None,
) -> None:
    """Convert a checkpoint with ordered rules (presets and recipes) and write a load report.

    SRC is a local folder or file, or a hub repo id (org/name) read through huggingface_hub (HF_TOKEN, HF_HUB_OFFLINE).
    A path (starting with ., / or ~, with more than one /, or whose first folder exists here) is always local.
    A dry run of a repo id reads headers only.

    Prints the plan before any data moves, then progress (a bar in a terminal, timestamped lines in logs), then the load report."""
    from moeconv.dtypes import parse_user_dtype
    from moeconv.hub import open_source
    from moeconv.plan import build_plan
    from moeconv.render import render_plan

    shard_bytes = parse_size(max_shard_size)
    run_dtype = parse_user_dtype(dtype) if dtype else None
    recipes = load_recipes(preset, recipe)
    if not recipes:
        raise typer.BadParameter("give at least one --preset or --recipe (see `moeconv presets`)")
    source = open_source(src, revision=revision, token=token, low_disk=low_disk)
    plan = build_plan(source, recipes, dtype=run_dtype, align=align, max_shard_size=shard_bytes, strict=strict)
    refusal = _strict_refusal(plan) if strict else None
    if dry_run or refusal:
        from moeconv.distributed import partition, render_tasks  # the partition alone: Ray is not started

        tasks = partition(plan) if ray is not None else None
        if json_output:
            data = plan.to_json()
            if tasks is not None:
                data["ray_tasks"] = [task.to_json() for task in tasks]
            stdout.print_json(data=data)
        elif not quiet:
            render_plan(plan, stdout, wide=wide, dry_run=True)
            if tasks is not None:
                render_tasks(tasks, stdout, wide=wide)
        if refusal:
            stderr.print(f"error: {refusal} (--strict); nothing was written", highlight=False)
            raise typer.Exit(3)
        if quiet:
            _print_warnings(plan)
        elif not json_output:
            stdout.print(f"dry run: nothing was written; {_shards_summary(plan)} would go to {safe(str(out))}", highlight=False)
        return
    _run(
        plan,
        out,
        overwrite=overwrite,
        resume=resume,
        low_disk=low_disk,
        checksum=checksum.value,
        json_output=json_output,
        quiet=quiet,
        wide=wide,
        ray=ray,
        token=token,
    )


def _strict_refusal(plan) -> str | None:
    """--strict: why the plan must not be written (exit 3), or None. Without transformers there is no
    load report to trust: an error (exit 1) naming the install command."""
    from moeconv.report import TRANSFORMERS_MISSING

    report = plan.report
    if report.ok():
        return None
    if report.reason == TRANSFORMERS_MISSING:
        raise MoeconvError(f"--strict needs the load report, but {TRANSFORMERS_MISSING}")
    if not report.checked:
        return f"the load report could not be checked ({report.reason})"
    return "the load report is not clean"


def _shards_summary(plan) -> str:
    from moeconv.display import human_bytes

    return f"{len(plan.shards)} shard{'s' if len(plan.shards) != 1 else ''} ({human_bytes(sum(s.size for s in plan.shards))})"


def _print_warnings(plan) -> None:
    for warning in plan.warnings:
        stderr.print(f"[yellow]warning:[/] {safe(warning)}", highlight=False)


def _run(plan, out: Path, *, overwrite, resume, low_disk, checksum, json_output, quiet, wide, ray, token) -> None:
    """Write the plan: once OUT is accepted, the plan table, then progress while the data moves, then
    the load report."""
    from moeconv.execute import execute
    from moeconv.hub import fetch_inputs
    from moeconv.render import Meter, render_plan
    from moeconv.report import render_report

    human = not (json_output or quiet)
    plan.start_report()  # computed while the data moves; written last

    def started(notes: list[str]) -> None:
        if human:
            render_plan(plan, stderr, report=False, wide=wide)
        elif quiet:
            _print_warnings(plan)
        for note in notes if not quiet else ():
            stderr.print(f"resume: {safe(note)}", highlight=False)
        if human:
            stderr.print(f"writing {_shards_summary(plan)} to {safe(str(out))}", highlight=False)
        if ray is None:  # with --ray, each task downloads what it reads on its own node
            fetch_inputs(plan, low_disk=low_disk)  # hub repo ids: download what the plan reads (no-op for local paths)
        shards = {layout.name: sum(spec.nbytes for spec in layout.order) for layout in plan.shards}
        meter.phase("writing", plan.total_bytes, shards, noun="shard")

    with Meter(stderr, _progress_mode(quiet)) as meter:
        options = dict(overwrite=overwrite, started=started, low_disk=low_disk, resume=resume, checksum=checksum)

        def progress(shard: str, nbytes: int) -> None:
            meter.advance(nbytes, shard)

        if ray is None:
            report = execute(plan, out, progress=progress, **options)
        else:
            from moeconv.distributed import run

            report = run(plan, out, address=ray, token=token, progress=progress, **options)
    if json_output:
        stdout.print_json(data=report)
    if human:
        render_report(plan.report, stderr, wide=wide)
        report_path = safe(str(out / "moeconv-report.json"))
        stderr.print(f"wrote {safe(str(out))}: {_shards_summary(plan)}, report in {report_path}", highlight=False)


# ---- verify ----------------------------------------------------------------------------------------


@command("verify")
def verify_command(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="A folder written by `moeconv convert`.", show_default=False)],
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            metavar="SRC",
            help="Also recompute every tensor from this source (folder, file or hub repo id) and compare bit for bit.",
        ),
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option(
            "--sample",
            metavar="N",
            help="With --against: compare N evenly spaced rows of axis 0 per tensor (e.g. N experts), not all.",
        ),
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Check OUT against its moeconv-report.json: every file's checksum (the report's algorithm), headers, dtypes, shapes, offsets, alignment.

    Progress goes to stderr (a bar in a terminal, timestamped lines in logs) unless --quiet."""
    from moeconv.errors import VerifyError
    from moeconv.render import Meter
    from moeconv.verify import verify

    with Meter(stderr, _progress_mode(quiet)) as meter:
        result = verify(out, against=against, sample=sample, progress=meter)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    if not result.ok:
        raise VerifyError(result.summary())
    if not (as_json or quiet):
        stdout.print(printable(result.summary()), highlight=False, markup=False)


# ---- presets ---------------------------------------------------------------------------------------

presets_app = typer.Typer(help="List the built-in presets, or print one to copy and edit.", invoke_without_command=True)
app.add_typer(presets_app, name="presets")


@presets_app.callback()
def presets_list(ctx: typer.Context) -> None:
    """List the built-in presets with a one-line description."""
    from moeconv.recipe import load_preset, preset_names

    if ctx.invoked_subcommand is not None:
        return
    for name in preset_names():
        stdout.print(f"{name:32} {load_preset(name).description}", highlight=False, markup=False)


@command("show", on=presets_app)
def presets_show(name: Annotated[str, typer.Argument(help="Preset name.")]) -> None:
    """Print a preset's TOML to copy and edit."""
    from moeconv.recipe import preset_text

    print(preset_text(name), end="")


# ---- ops -------------------------------------------------------------------------------------------


@command("ops")
def ops_command() -> None:
    """List the ops recipes can use: parameters, inverse, what each does."""
    import moeconv.formats  # noqa: F401  (the formats register their ops)
    from moeconv.ops import OPS

    for _, op in sorted(OPS.items()):
        inverse = f"  (inverse: {op.inverse})" if op.inverse else ""
        stdout.print(f"{op.signature()}{inverse}\n    {op.doc}", highlight=False, markup=False)


# ---- entry point -----------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    app()
