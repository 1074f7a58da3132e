"""The command line: parse, call the library, render. Thin on purpose.

Every MoeconvError becomes one line on stderr and exit code 1 (MOECONV_DEBUG=1 shows the traceback);
usage errors are typer's exit code 2. Machine output (--json) is the only thing on stdout.
"""

import functools
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
from moeconv.display import visible
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
                stderr.print(f"error: {visible(error)}", markup=False, highlight=False)  # one line, whatever a key holds
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


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]


# ---- inspect ---------------------------------------------------------------------------------------
# (owned by the foundation work: reader + inspect rendering)


@command("inspect")
def inspect_command(
    path: Annotated[Path, typer.Argument(help="Checkpoint folder, .safetensors file or index.json.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Show every tensor of a checkpoint (key, dtype, shape, bytes, file, 16-byte alignment), from headers only."""
    import json

    from moeconv.inspect import inspect_json, render
    from moeconv.source import Checkpoint

    with Checkpoint.open(path) as checkpoint:
        if as_json:
            typer.echo(json.dumps(inspect_json(checkpoint), indent=2))
        else:
            render(checkpoint, stdout)


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
        raise OptionError(f"--max-shard-size {visible(text)!r} is not a size; use e.g. 5GB, 500MB or 2GiB") from None
    if not 1 <= size <= MAX_SHARD_SIZE:
        raise OptionError(f"--max-shard-size {visible(text)!r}: a shard size is from 1 byte to 1 PiB")
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
    src: Annotated[str, typer.Argument(help="Source checkpoint: a folder, a .safetensors file, or a hub repo id.")],
    out: Annotated[Path, typer.Argument(help="Output folder (created; must be empty unless --overwrite).")],
    preset: Annotated[
        list[str], typer.Option("--preset", "-p", help="Built-in preset (see `moeconv presets`); repeatable.")
    ] = [],
    recipe: Annotated[
        list[str], typer.Option("--recipe", "-r", help="Recipe TOML file, or preset:NAME; repeatable, applied after presets.")
    ] = [],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and report only: read headers, write nothing.")] = False,
    json_output: JsonOption = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 3 if the load report is not clean; rules that match nothing are errors.")
    ] = False,
    align: Annotated[
        int, typer.Option("--align", help="Start every tensor at a multiple of N bytes where the format allows.")
    ] = 16,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest shard, e.g. 5GB, 500MB, 2GiB.")] = "5GB",
    dtype: Annotated[str | None, typer.Option("--dtype", help="Write every floating-point tensor as bf16, fp16 or fp32.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the contents of a non-empty output folder.")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub repo ids: branch, tag or commit to convert (default: main).")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Hub repo ids: access token (default: HF_TOKEN or the stored login).")
    ] = None,
    low_disk: Annotated[
        bool,
        typer.Option(
            "--low-disk",
            help="Hub repo ids: fetch each shard when first needed and delete it from the huggingface_hub cache once converted.",
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run in OUT (same options, --checksum too): keep its finished shards whose checksum still matches, redo the rest.",
        ),
    ] = False,
    checksum: Annotated[
        Checksum,
        typer.Option(
            "--checksum",
            help="Hash of every output file in the report, for `moeconv verify` and --resume: xxh3-128 (fast integrity check against accidental change) or sha256 (slower; comparable to the hub's LFS oid).",
        ),
    ] = Checksum(checksums.DEFAULT),
) -> None:
    """Convert a checkpoint with ordered rules (presets and recipes) and write a load report.

    SRC is a local folder or file, or a hub repo id (org/name) read through huggingface_hub (its cache,
    HF_TOKEN, HF_HUB_OFFLINE); a local path that exists wins. A dry run of a repo id reads headers only."""
    from moeconv.dtypes import parse_user_dtype
    from moeconv.execute import execute
    from moeconv.hub import fetch_inputs, open_source
    from moeconv.plan import build_plan
    from moeconv.render import progress_bar, render_plan

    shard_bytes = parse_size(max_shard_size)
    run_dtype = parse_user_dtype(dtype) if dtype else None
    recipes = load_recipes(preset, recipe)
    if not recipes:
        raise typer.BadParameter("give at least one --preset or --recipe (see `moeconv presets`)")
    source = open_source(src, revision=revision, token=token, low_disk=low_disk)
    plan = build_plan(source, recipes, dtype=run_dtype, align=align, max_shard_size=shard_bytes, strict=strict)
    refused = strict and plan.report.checked and not plan.report.ok()
    if dry_run or refused:
        if json_output:
            stdout.print_json(data=plan.to_json())
        else:
            render_plan(plan, stdout)
        if refused:
            stderr.print("error: the load report is not clean (--strict); nothing was written", highlight=False)
            raise typer.Exit(3)
        return
    plan.start_report()  # computed while the data moves; written last
    fetch_inputs(plan, low_disk=low_disk)  # hub repo ids: download what the plan reads (no-op for local paths)
    with progress_bar(stderr, plan, enabled=stderr.is_terminal and not json_output) as progress:
        report = execute(
            plan, out, overwrite=overwrite, progress=progress, low_disk=low_disk, resume=resume, checksum=checksum.value
        )
    if json_output:
        stdout.print_json(data=report)
    else:
        render_plan(plan, stderr)
        stderr.print(f"wrote {out} ({len(plan.shards)} shard(s), report in {out / 'moeconv-report.json'})", highlight=False)


# ---- verify ----------------------------------------------------------------------------------------


@command("verify")
def verify_command(
    out: Annotated[Path, typer.Argument(help="A folder written by `moeconv convert`.", show_default=False)],
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            help="Also recompute every tensor from this source (folder, file or hub repo id) and compare bit for bit.",
        ),
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option(
            "--sample", help="With --against: compare N evenly spaced rows of axis 0 per tensor (e.g. N experts), not all."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Check OUT against its moeconv-report.json: every file's checksum (the report's algorithm), headers, dtypes, shapes, offsets, alignment."""
    from moeconv.errors import VerifyError
    from moeconv.verify import verify

    result = verify(out, against=against, sample=sample)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    if not result.ok:
        raise VerifyError(result.summary())
    if not as_json:
        stdout.print(result.summary(), highlight=False, markup=False)


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
    from moeconv.ops import OPS

    for _, op in sorted(OPS.items()):
        inverse = f"  (inverse: {op.inverse})" if op.inverse else ""
        stdout.print(f"{op.signature()}{inverse}\n    {op.doc}", highlight=False, markup=False)


# ---- entry point -----------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    app()
