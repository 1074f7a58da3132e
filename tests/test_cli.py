"""The CLI as a person or a CI log sees it: tables that keep every key whole at 80 and 120 columns,
the plan before any data moves, progress (a bar in a terminal, timestamped lines elsewhere, nothing
with --quiet), --strict without transformers, escaped markup, --resume's messages, --version, --help."""

import fcntl
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import termios
import tomllib
from pathlib import Path

import pytest
from output_lines import error_line, table_keys
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.display import Column, KeyRow, human_bytes, key_table, key_tree, print_all, safe
from moeconv.errors import WriteError
from moeconv.inspect import group_rows, render
from moeconv.output import JOURNAL_NAME
from moeconv.plan import build_plan
from moeconv.recipe import load_preset, load_recipe, parse_recipe
from moeconv.render import plan_rows, render_plan
from moeconv.report import TRANSFORMERS_MISSING, check_load, render_report
from moeconv.source import Checkpoint
from moeconv.writer import ShardWriter

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-gpt-oss"
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Z0-9])")
DECIMAL_UNITS = re.compile(r"\d (kB|MB|GB|TB)\b")
PROGRESS_LINE = re.compile(r"^\d\d:\d\d:\d\d writing: ")


def run(*args, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def terminal(width: int) -> Console:
    """A console that believes it is a terminal `width` columns wide, without colours."""
    return Console(width=width, file=io.StringIO(), force_terminal=True, color_system=None, legacy_windows=False)


def example_plan():
    return build_plan(Checkpoint.open(EXAMPLE), [load_preset("gpt-oss-bf16")])


# ---- tables at 80 and 120 columns --------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 120])
def test_the_example_plan_keeps_every_key_whole(width):
    plan = example_plan()
    console = terminal(width)
    render_plan(plan, console, report=False)
    text = console.file.getvalue()
    assert max(map(len, text.splitlines())) <= width, text
    assert table_keys(text) == [row.key for row in plan_rows(plan)]
    assert "(1) dequantize-mxfp4(dtype=bf16) -> transpose(dim0=1, dim1=2)" in text  # the op chain, once, whole
    if width == 80:  # the shared prefix is a heading
        lines = [line.rstrip() for line in text.splitlines()]
        at = lines.index("model.layers.{0...1}.")
        assert lines[at + 1].startswith("  input_layernorm.weight ")


@pytest.mark.parametrize("width", [80, 120])
def test_inspect_keeps_every_key_whole(width):
    checkpoint = Checkpoint.open(EXAMPLE)
    console = terminal(width)
    render(checkpoint, console)
    text = console.file.getvalue()
    assert max(map(len, text.splitlines())) <= width, text
    assert table_keys(text) == [row.pattern for row in group_rows(checkpoint)]
    assert "(file N = model-{00001...00002}-of-00002.safetensors)" in text or "(count, file: not shown" in text


def test_the_load_report_table_keeps_every_key_whole_at_80_columns():
    plan = build_plan(Checkpoint.open(EXAMPLE), [])  # MXFP4 keys under a config that no longer says mxfp4
    config = {k: v for k, v in plan.config.items() if k != "quantization_config"}
    report = check_load(plan.planned(), config)
    assert report.unexpected and report.missing
    console = terminal(80)
    render_report(report, console)
    text = console.file.getvalue()
    assert max(map(len, text.splitlines())) <= 80, text
    keys = table_keys(text)
    assert (
        "model.layers.{0...1}.mlp.experts.gate_up_proj_blocks" in keys and "model.layers.{0...1}.mlp.experts.gate_up_proj" in keys
    )


def test_narrower_than_any_table_each_key_gets_its_own_line():
    rows = [
        KeyRow(f"model.layers.{{0...23}}.block_sparse_moe.experts.{{0...7}}.w{i}.weight", ("BF16", "[14336, 4096]"))
        for i in (1, 2, 3)
    ]
    console = terminal(40)
    print_all(console, *key_table(console, "t", [Column("dtype"), Column("shape")], rows))
    text = console.file.getvalue()
    for row in rows:  # on its own line, wrapped by the terminal if need be but never cut
        assert row.key in text.replace("\n", "") and "…" not in text


def test_key_tree_headings_rebuild_the_keys():
    patterns = [
        "lm_head.weight",
        "model.layers.{0...3}.mlp.experts.{0...7}.w1.weight",
        "model.layers.{0...3}.mlp.experts.{0...7}.w2.weight",
        "model.layers.{0...3}.input_layernorm.weight",
        "model.layers.{0,2}.self_attn.sinks",
    ]
    lines = key_tree(patterns)
    assert lines == [
        ("lm_head.weight", 0),
        ("model.layers.{0...3}.", None),
        ("  mlp.experts.{0...7}.", None),
        ("    w1.weight", 1),
        ("    w2.weight", 2),
        ("  input_layernorm.weight", 3),
        ("model.layers.{0,2}.self_attn.sinks", 4),
    ]


def test_off_a_terminal_rows_stay_whole_greppable_lines(tmp_path):
    result = run("convert", EXAMPLE, tmp_path / "out", "-p", "gpt-oss-bf16", "--dry-run")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("model.layers.{0...1}.mlp.experts.gate_up_proj "))
    assert "dequantize-mxfp4(dtype=bf16) -> transpose(dim0=1, dim1=2)" in line


def run_in_terminal(args: list[str], columns: int, cwd: Path) -> tuple[int, str]:
    """`python -m moeconv ARGS` on a pseudo-terminal `columns` wide, as a person runs it: the exit code
    and what the screen got, escape sequences removed (a redrawn line keeps its last state)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "TTY_INTERACTIVE")}
    env.update(PYTHONPATH=str(REPO), TERM="xterm-256color")
    proc = subprocess.Popen([sys.executable, "-m", "moeconv", *args], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    code = proc.wait(timeout=300)
    text = ANSI.sub("", data.decode("utf-8", "replace")).replace("\r\n", "\n")
    return code, "\n".join(line.split("\r")[-1] for line in text.split("\n"))


def test_convert_of_the_example_fits_an_80_column_terminal(tmp_path):
    code, screen = run_in_terminal(["convert", str(EXAMPLE), str(tmp_path / "out"), "-p", "gpt-oss-bf16"], 80, tmp_path)
    assert code == 0, screen
    assert max(map(len, screen.splitlines())) <= 80, screen
    assert table_keys(screen) == [row.key for row in plan_rows(example_plan())]
    assert "warning" not in screen  # the shipped example: every tensor can align
    bar = next(line for line in screen.splitlines() if line.startswith("writing ━"))
    assert re.search(r"━ 465\.3/465\.3 KiB [0-9.]+ [KMG]iB/s +0:00:00$", bar), bar
    assert not DECIMAL_UNITS.search(screen)
    order = [screen.index(s) for s in ("planned output", "writing 1 shard", "writing ━", "load report: clean", "wrote ")]
    assert order == sorted(order)

    code, screen = run_in_terminal(["verify", str(tmp_path / "out"), "--against", str(EXAMPLE)], 80, tmp_path)
    assert code == 0, screen
    bars = [line.split("━")[0].strip() for line in screen.splitlines() if "━" in line]  # a live bar is redrawn: every state
    phases = [bar for bar in dict.fromkeys(bars) if not re.fullmatch(r"file \d/3", bar)]  # (and the current file's bar)
    assert phases == ["checking xxh3-128", "comparing with the source"], screen
    assert max(map(len, screen.splitlines())) <= 80 and not DECIMAL_UNITS.search(screen)


def test_wide_shows_whole_keys_and_every_column_however_narrow_the_terminal():
    console = terminal(80)
    render(Checkpoint.open(EXAMPLE), console, wide=True)
    text = console.file.getvalue()
    assert "\nmodel.layers.{0...1}.mlp.experts.gate_up_proj_blocks  U8 " in text and "(file N = " in text
    assert "not shown at this width" not in text and max(map(len, text.splitlines())) > 80


# ---- progress off a terminal, --quiet, the plan first --------------------------------------------------


def test_off_a_terminal_progress_is_timestamped_lines_after_the_plan(mixtral_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOECONV_PROGRESS_SECONDS", "3600")  # so only the per-shard lines come
    result = run("convert", mixtral_dir, tmp_path / "out", "-p", "fuse-experts", "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    progress = [i for i, line in enumerate(lines) if PROGRESS_LINE.match(line)]
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(progress) == len(shards) >= 3
    for i, shard in zip(progress, shards):
        assert re.search(rf"\(\d+%\), [0-9.]+ [KMG]?i?B/s.*; {shard} done \([0-9.]+ (KiB|B)\)$", lines[i]), lines[i]
    assert lines[progress[-1]].split(": ", 1)[1].startswith(("52.", "5")) and "(100%)" in lines[progress[-1]]
    plan_at = lines.index(next(line for line in lines if line.startswith("planned output: ")))
    writing_at = lines.index(next(line for line in lines if line.startswith(f"writing {len(shards)} shards (")))
    assert plan_at < writing_at < progress[0]
    assert not DECIMAL_UNITS.search(result.stderr)


def test_progress_lines_come_every_interval_too(mixtral_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOECONV_PROGRESS_SECONDS", "0")
    monkeypatch.setenv("MOECONV_CHUNK_BYTES", "4096")
    result = run("convert", mixtral_dir, tmp_path / "out", "-p", "fuse-experts")
    assert result.exit_code == 0, result.output
    progress = [line for line in result.stderr.splitlines() if PROGRESS_LINE.match(line)]
    assert len(progress) > 5 and progress[-1].endswith("model.safetensors done (52.81 KiB)")


def test_quiet_prints_nothing_and_json_stays_clean(mixtral_dir, tmp_path):
    result = run("convert", mixtral_dir, tmp_path / "q", "-p", "fuse-experts", "--quiet")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    result = run("convert", mixtral_dir, tmp_path / "j", "-p", "fuse-experts", "--quiet", "--json")
    assert result.exit_code == 0 and result.stderr == "" and json.loads(result.stdout)["ok"]
    verified = run("verify", tmp_path / "q", "--against", mixtral_dir, "--quiet")
    assert verified.exit_code == 0 and verified.stdout == "" and verified.stderr == ""


def test_verify_shows_progress_of_hashing_and_comparing(mixtral_dir, tmp_path):
    assert run("convert", mixtral_dir, tmp_path / "out", "-p", "fuse-experts", "--quiet").exit_code == 0
    result = run("verify", tmp_path / "out", "--against", mixtral_dir)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert any(re.match(r"^\d\d:\d\d:\d\d checking xxh3-128: .*; model.safetensors done", line) for line in lines), lines
    assert any(re.match(r"^\d\d:\d\d:\d\d comparing with the source: .* \(100%\)", line) for line in lines), lines
    assert result.stdout.startswith(f"{tmp_path / 'out'}: ok: ")


def test_a_dry_run_says_nothing_was_written(tmp_path):
    result = run("convert", EXAMPLE, tmp_path / "out", "-p", "gpt-oss-bf16", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would write next to the shards: config.json (rewritten), generation_config.json" in result.stdout
    size = human_bytes(sum(shard.size for shard in example_plan().shards))
    last = result.stdout.rstrip().splitlines()[-1]
    assert last == f"dry run: nothing was written; 1 shard ({size}) would go to {tmp_path / 'out'}"
    assert "copied" not in result.stdout and not (tmp_path / "out").exists()


def test_the_shipped_example_converts_without_a_warning(tmp_path):
    result = run("convert", EXAMPLE, tmp_path / "out", "-p", "gpt-oss-bf16", "--dry-run", "--json", "--strict")
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)
    assert planned["warnings"] == [] and planned["ok"] and all(s["misaligned"] == [] for s in planned["shards"])


def test_renamed_keys_say_by_which_rule(mixtral_dir):
    plan = build_plan(Checkpoint.open(mixtral_dir), [load_recipe(REPO / "examples" / "recipes" / "rename.toml")])
    notes = {row.key: row.note for row in plan_rows(plan)}
    renamed = [note for key, note in notes.items() if ".attention." in key]
    assert renamed and all(note.startswith("renamed by '") for note in renamed)
    assert notes["lm_head.weight"] == ""  # as is


# ---- errors and messages -------------------------------------------------------------------------------


def test_strict_without_transformers_exits_1_with_the_install_command(mixtral_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` -> ImportError
    result = run("convert", mixtral_dir, tmp_path / "out", "-p", "fuse-experts", "--strict")
    assert result.exit_code == 1
    line = error_line(result.stderr)
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["transformers"]
    assert line == f"error: --strict needs the load report, but transformers is not installed: pip install '{extra[0]}'"
    assert line.endswith(TRANSFORMERS_MISSING.split(": ", 1)[1]) and not (tmp_path / "out").exists()
    shown = run("convert", mixtral_dir, tmp_path / "out", "-p", "fuse-experts", "--dry-run")
    assert shown.exit_code == 0 and f"load report: not checked - {TRANSFORMERS_MISSING}" in shown.stdout  # [brackets] kept


def test_user_text_is_never_read_as_markup_or_terminal_codes(tmp_path):
    import torch

    keys = ["layers.0.w[red]x[/red].weight", "layers.1.w[red]x[/red].weight", "evil\x1b[2J.weight"]
    save_file({k: torch.zeros(2) for k in keys}, tmp_path / "model.safetensors")
    result = run("inspect", tmp_path)
    assert result.exit_code == 0, result.output
    assert "layers.{0...1}.w[red]x[/red].weight" in result.stdout
    assert "evil\\x1b[2J.weight" in result.stdout and "\x1b" not in result.stdout
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nname = "[bold]ghost[/bold]"\nmatch = "nothing"\ndrop = true\n')
    result = run("convert", tmp_path, tmp_path / "out", "-r", recipe, "--dry-run")
    assert "warning: " in result.stdout and "rule '[bold]ghost[/bold]' matched no key" in result.stdout
    assert safe("a[b]\x07") == "a\\[b]\\x07"


def test_optional_and_model_typed_rules_are_silent_when_they_match_nothing(tmp_path):
    recipe = load_recipe(REPO / "examples" / "recipes" / "router-by-model-type.toml")  # mixtral / qwen rules only
    plan = build_plan(Checkpoint.open(EXAMPLE), [recipe], strict=True)
    assert plan.warnings == []
    optional = parse_recipe('[[rule]]\nname = "rotary"\noptional = true\nmatch = ".+inv_freq"\ndrop = true\n', "r.toml")
    assert build_plan(Checkpoint.open(EXAMPLE), [optional], strict=True).warnings == []
    result = run(
        "convert",
        EXAMPLE,
        tmp_path / "out",
        "-r",
        REPO / "examples" / "recipes" / "router-by-model-type.toml",
        "--dry-run",
        "--strict",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["warnings"] == []


def _fail_in_shard(monkeypatch, name_part: str):
    real = ShardWriter.write

    def write(self, key, data):
        if name_part in self.layout.name:
            raise WriteError(f"{self.final}: write failed: No space left on device")
        return real(self, key, data)

    monkeypatch.setattr(ShardWriter, "write", write)


def test_resume_says_what_it_kept_and_why_and_names_a_changed_option(mixtral_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _fail_in_shard(patch, "00003-of")
        assert run("convert", mixtral_dir, out, "-p", "fuse-experts", "--max-shard-size", "20KB").exit_code == 1
    journal = json.loads((out / JOURNAL_NAME).read_text())
    assert journal["options"]["max_shard_size"] == 20_000 and sorted(journal["shards"]) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
    ]

    refused = run("convert", mixtral_dir, out, "-p", "fuse-experts", "--max-shard-size", "30KB", "--resume")
    assert refused.exit_code == 1
    assert "other options (--max-shard-size 20000 then, 30000 now)" in error_line(refused.stderr)

    staged = out / ".model-00002-of-00003.safetensors.staged"
    staged.write_bytes(staged.read_bytes()[:-1] + bytes([staged.read_bytes()[-1] ^ 1]))
    result = run("convert", mixtral_dir, out, "-p", "fuse-experts", "--max-shard-size", "20KB", "--resume")
    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if line.startswith("resume: ")]
    assert said == [
        "resume: kept model-00001-of-00003.safetensors: finished before, its xxh3-128 still matches the journal",
        "resume: redoing model-00002-of-00003.safetensors: its xxh3-128 differs from the journal's (the file changed)",
        "resume: kept 1 of 3 shard(s); writing 2",
    ]


def test_version_and_flags_without_metavars():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == "moeconv 0.1.0"
    for command in ("convert", "inspect", "verify"):
        text = run(command, "--help", terminal_width=200).stdout
        ours = [line for line in text.splitlines() if "--help" not in line]  # typer's own --help shows <bool>
        assert not any("<bool>" in line for line in ours) and "--json" in text, text
    text = run("convert", "--help", terminal_width=200).stdout
    assert re.search(r"--dry-run\s+Plan and report only", text) and re.search(r"--max-shard-size\s+SIZE\s", text)


def test_make_tiny_gpt_oss_help_creates_no_folder(tmp_path):
    for flag, code in (("--help", 0), ("-h", 0), ("--bogus", 2)):
        proc = subprocess.run(
            [sys.executable, str(REPO / "examples" / "make_tiny_gpt_oss.py"), flag], cwd=tmp_path, capture_output=True, text=True
        )
        assert proc.returncode == code, proc.stderr
        assert "make_tiny_gpt_oss.py OUT_DIR" in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


SHADOWED = """
import sys
from importlib.machinery import PathFinder

ROOT = sys.argv[1]


class EditableFinder:  # what setuptools' editable install appends to sys.meta_path, after the path finder
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "moeconv" or fullname.count(".") == 1 and fullname.startswith("moeconv."):
            return PathFinder.find_spec(fullname, [ROOT] if fullname == "moeconv" else [ROOT + "/moeconv"])
        return None


sys.path[:] = [""] + [p for p in sys.path if p not in ("", ROOT) and "editable" not in p]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()] + [EditableFinder]
import moeconv
from moeconv.recipe import preset_names, preset_text

assert getattr(moeconv, "__file__", None) is None, "the clone's folder should shadow the package here"
print(" ".join(preset_names()))
print(preset_text("fuse-experts").splitlines()[0])
"""


def test_presets_load_when_a_clone_named_moeconv_shadows_the_package(tmp_path):
    (tmp_path / "moeconv").mkdir()  # the folder that holds a clone: ./moeconv has no __init__.py
    (tmp_path / "shadowed.py").write_text(SHADOWED)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "shadowed.py", str(REPO)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "fuse-experts" in proc.stdout.split() and "gpt-oss-bf16" in proc.stdout.split()
    first_line = (REPO / "moeconv" / "presets" / "fuse-experts.toml").read_text().splitlines()[0]
    assert proc.stdout.splitlines()[1] == first_line
    shutil.rmtree(tmp_path / "moeconv")
