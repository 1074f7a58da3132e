"""Hostile values: no header, config, recipe, option or folder can hang moeconv, crash it with a
traceback, or leak a file.

Every case runs the real `moeconv` command line in a child process capped at 30 s and 2 GiB of
address space above what it starts with (tests/hostile_child.py). A refusal is exit 1 with ONE
stderr line naming the file, key, rule or option; nothing in OUT looks complete (no report, index,
final-named shard or temp file); SRC is unchanged. Hostile values that are legal (a zero-byte
tensor claiming 2**62 rows, a key no rule can match in linear time) convert within the caps.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors_bytes as sb
import torch
from hostile_child import Result, run, start
from output_lines import error_line
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeconv.format import INDEX_NAME
from moeconv.output import JOURNAL_NAME, REPORT_NAME

DEEP = 100_000  # nesting levels: far past Python's recursion limit


# ---- helpers ---------------------------------------------------------------------------------------


def tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links not followed): name -> link target or content hash."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            found[name] = "-> " + os.readlink(path)
        elif path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[name] = "dir"
    return found


def complete_looking(out: Path) -> list[str]:
    """What in OUT looks complete or half-written (staged shards are hidden on purpose)."""
    if not out.exists():
        return []
    return sorted(
        p.name for p in out.iterdir() if p.name in (REPORT_NAME, INDEX_NAME) or p.name.endswith((".safetensors", ".tmp"))
    )


def refused(result: Result, *needles: str, out: Path | None = None) -> str:
    """Exit 1 within the caps, one stderr line containing every needle, no traceback; OUT clean."""
    assert result.code == 1, (result.code, result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout
    line = error_line(result.stderr)  # the plan and progress lines of a started run may come before it
    for needle in needles:
        assert needle in line, (needle, line[:2000])
    if out is not None:
        assert complete_looking(out) == []
        assert not out.exists() or not (out / JOURNAL_NAME).exists()
    return line


def succeeded(result: Result) -> None:
    assert result.code == 0, (result.code, result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout


def forge(folder: Path, tensors: dict, config: dict | None = None, name: str = "model.safetensors") -> Path:
    """A checkpoint folder with one forged file: key -> (dtype, shape, raw bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    sb.write(folder / name, *sb.entries(tensors))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def recipe(folder: Path, text: str, name: str = "recipe.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def mixtral(mixtral_dir, tmp_path) -> Path:
    return Path(shutil.copytree(mixtral_dir, tmp_path / "src"))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ---- hangs and runaway memory, from values alone --------------------------------------------------


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "convert"])
def test_a_trillion_experts_claimed_by_config_is_one_line(mixtral, tmp_path, dry_run):
    edit_config(mixtral, num_local_experts=10**12)
    before = tree(mixtral)
    out = tmp_path / "out"
    result = run(["convert", mixtral, out, "-p", "fuse-experts", *(["--dry-run"] if dry_run else [])], tmp_path)
    line = refused(result, "fuse-experts", "missing", "more", "1000000000000", out=out)
    assert len(line) < 1000
    assert tree(mixtral) == before


def test_a_zero_byte_tensor_claiming_2_62_rows_converts(tmp_path):
    src = forge(tmp_path / "src", {"empty": ("BF16", [2**62, 0], b""), "w": ("F32", [2, 2], bytes(16))})
    out = tmp_path / "out"
    succeeded(run(["convert", src, out, "-p", "fuse-experts"], tmp_path))
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.get_slice("empty").get_shape() == [2**62, 0]
    assert load_file(str(out / "model.safetensors"))["w"].shape == (2, 2)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", REPORT_NAME]
    result = run(["verify", out, "--against", src, "--sample", str(10**12)], tmp_path)
    succeeded(result)
    assert "2 tensors" in result.stdout


@pytest.mark.parametrize("count", [-3, 0])
def test_a_config_count_that_is_not_positive_is_one_line(mixtral, tmp_path, count):
    edit_config(mixtral, num_local_experts=count)
    refused(run(["convert", mixtral, tmp_path / "out", "-p", "fuse-experts"], tmp_path), f"num_local_experts = {count}")


def test_unstacking_a_billion_rows_is_refused_at_plan_time(tmp_path):
    key = "model.layers.0.mlp.experts.down_proj"
    src = forge(tmp_path / "src", {key: ("BF16", [10**9, 0, 4], b"")}, {"model_type": "qwen3_moe"})
    out = tmp_path / "out"
    result = run(["convert", src, out, "-p", "unfuse-experts"], tmp_path)
    refused(result, "unstack", "1000000000", "4096", out=out)


def test_a_split_into_200000_sizes_is_refused_quickly(mixtral, tmp_path):
    sizes = ", ".join(["0"] * 200_000 + ["16"])
    rule = recipe(
        tmp_path,
        f"[[rule]]\nmatch = '(?P<p>.+)\\.w1\\.weight'\nops = [{{ op = 'split', dim = 0, sizes = [{sizes}] }}]\ntarget = '{{p}}.{{part}}'\n",
    )
    result = run(["convert", mixtral, tmp_path / "out", "-r", rule], tmp_path)
    line = refused(result, "split", "200001 sizes", "4096")
    assert len(line) < 1000 and result.seconds < 10


def test_a_split_into_4096_pieces_plans_and_converts_in_seconds(tmp_path):
    src = forge(tmp_path / "src", {"v": ("BF16", [4096, 1], bytes(2 * 4096))})
    sizes = ", ".join(["1"] * 4096)
    rule = recipe(
        tmp_path, f"[[rule]]\nmatch = 'v'\nops = [{{ op = 'split', dim = 0, sizes = [{sizes}] }}]\ntarget = 'v.{{part}}'\n"
    )
    out = tmp_path / "out"
    result = run(["convert", src, out, "-r", rule], tmp_path)
    succeeded(result)
    assert len(load_file(str(out / "model.safetensors"))) == 4096
    assert (out / REPORT_NAME).stat().st_size < 8 * 2**20  # each tensor's ops text does not carry all 4096 sizes


def test_a_config_claiming_200000_layers_gets_no_load_report_but_no_hang(mixtral, tmp_path):
    edit_config(mixtral, num_hidden_layers=200_000)
    result = run(["convert", mixtral, tmp_path / "out", "-p", "fuse-experts", "--dry-run"], tmp_path)
    succeeded(result)
    assert "not checked" in result.stdout and "num_hidden_layers = 200000" in result.stdout


def test_a_backtracking_regex_cannot_hang_convert_or_verify(tmp_path):
    key = "a" * 41  # (a+)+b against 41 a's: hours for a backtracking engine
    src = forge(tmp_path / "src", {key: ("F32", [1], bytes(4)), "aab": ("F32", [1], bytes(4))})
    rule = recipe(tmp_path, "[[rule]]\nmatch = '(a+)+b'\ntarget = 'matched'\n")
    out = tmp_path / "out"
    succeeded(run(["convert", src, out, "-r", rule], tmp_path))
    assert set(load_file(str(out / "model.safetensors"))) == {key, "matched"}
    result = run(["verify", out, "--against", src], tmp_path)
    succeeded(result)
    assert "equal to the source" in result.stdout


def test_a_regex_nested_5000_deep_is_one_line(mixtral, tmp_path):
    rule = recipe(tmp_path, "[[rule]]\nmatch = '" + "(" * 5000 + "a" + ")" * 5000 + "'\ntarget = 'x'\n")
    refused(run(["convert", mixtral, tmp_path / "out", "-r", rule], tmp_path), "recipe.toml", "match", "too deeply")


def test_a_lookahead_is_refused_in_one_line(mixtral, tmp_path):
    rule = recipe(tmp_path, "[[rule]]\nname = 'look'\nmatch = '(?=a)a+'\ntarget = 'x'\n")
    refused(run(["convert", mixtral, tmp_path / "out", "-r", rule], tmp_path), "rule 1 ('look')", "match", "linear time")


# ---- tracebacks instead of the one-line error -----------------------------------------------------


def deep_json() -> str:
    return '{"a": ' + "[" * DEEP + "]" * DEEP + "}"


@pytest.mark.parametrize("where", ["header", "index", "config", "recipe", "report"])
def test_deeply_nested_json_and_toml_is_one_line(sharded, converted, tmp_path, where):
    out = tmp_path / "out"
    args = ["convert", sharded, out, "-p", "fuse-experts"]
    if where == "header":
        shard = sorted(sharded.glob("*.safetensors"))[0]
        sb.write(shard, deep_json())
        needle = shard.name
    elif where == "index":
        (sharded / INDEX_NAME).write_text(deep_json())
        needle = INDEX_NAME
    elif where == "config":
        (sharded / "config.json").write_text(deep_json())
        needle = "config.json"
    elif where == "recipe":
        args = ["convert", sharded, out, "-r", recipe(tmp_path, "a = " + "[" * DEEP + "]" * DEEP + "\n")]
        needle = "recipe.toml"
    else:
        (converted / REPORT_NAME).write_text(deep_json())
        refused(run(["verify", converted], tmp_path), REPORT_NAME)
        return
    before = tree(sharded)
    refused(run(args, tmp_path), needle, out=out)
    assert tree(sharded) == before


def test_a_key_with_a_5000_digit_number(tmp_path):
    digits = "9" * 5000
    key = f"model.layers.0.block_sparse_moe.experts.{digits}.w1.weight"
    src = forge(tmp_path / "src", {key: ("F32", [1], bytes(4)), f"layers.{digits}.x": ("F32", [1], bytes(4))})
    succeeded(run(["inspect", src], tmp_path))
    edit = {"model_type": "mixtral", "num_local_experts": 2}
    (src / "config.json").write_text(json.dumps(edit))
    rule = recipe(
        tmp_path,
        "[[rule]]\nname = 'stack'\nmatch = '(?P<p>.+)\\.experts\\.(?P<e>\\d+)\\.w1\\.weight'\n"
        "group = 'e'\nops = [{ op = 'stack', dim = 0 }]\ntarget = '{p}.w1'\n",
    )
    refused(run(["convert", src, tmp_path / "out", "-r", rule], tmp_path), "rule 'stack'", "must be a number")


def test_markup_and_control_characters_in_keys_and_rule_names_are_shown_escaped(tmp_path):
    keys = ["m.[/bad].w", "esc\x1b[31mred", "osc\x1b]0;title\x07", "nul\x00key", "new\nline", "[bold]x[/bold]"]
    src = forge(tmp_path / "src", {k: ("F32", [1], bytes(4)) for k in keys})
    rule = recipe(tmp_path, "[[rule]]\nname = 'oops [/x]'\nmatch = 'nothing'\ntarget = 'y'\n")
    out = tmp_path / "out"
    result = run(["convert", src, out, "-r", rule], tmp_path)
    succeeded(result)
    assert set(load_file(str(out / "model.safetensors"))) == set(keys)  # the keys themselves are kept as they are
    shown = result.stdout + result.stderr
    assert not any(c in shown for c in "\x1b\x00\x07"), repr(shown[:2000])
    assert "m.[/bad].w" in shown and "[bold]x[/bold]" in shown and "oops [/x]" in shown
    assert "esc\\x1b[31mred" in shown and "new\\nline" in shown and "nul\\x00key" in shown
    result = run(["convert", src, tmp_path / "dry", "-r", rule, "--dry-run"], tmp_path)
    succeeded(result)
    assert "m.[/bad].w" in result.stdout and "\x1b" not in result.stdout


@pytest.mark.parametrize("target", ["{k[999]}", "{k:d}", "{k:>99999999999}", "{k.__class__.__name__}", "{k!r}", "{}"])
def test_target_templates_take_a_group_name_only(mixtral, tmp_path, target):
    rule = recipe(tmp_path, f"[[rule]]\nname = 't'\nmatch = '(?P<k>.+)'\ntarget = '{target}'\n")
    refused(run(["convert", mixtral, tmp_path / "out", "-r", rule], tmp_path), "rule 1 ('t')", "target")


@pytest.mark.parametrize(("op", "group"), [("split", "part"), ("unstack", "index")])
def test_a_group_named_like_the_fan_out_variable_is_refused(mixtral, tmp_path, op, group):
    params = "dim = 0, parts = 2" if op == "split" else "dim = 0"
    rule = recipe(
        tmp_path,
        f"[[rule]]\nname = 'r'\nmatch = '(?P<{group}>.+)'\nops = [{{ op = '{op}', {params} }}]\ntarget = 'x{{{group}}}'\n",
    )
    refused(run(["convert", mixtral, tmp_path / "out", "-r", rule], tmp_path), "rule 1 ('r')", f"'{group}'")


def test_a_recipe_that_is_not_utf8(mixtral, tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[[rule]]\nname = 'caf\xe9'\nmatch = 'x'\ntarget = 'y'\n".encode("latin-1"))
    refused(run(["convert", mixtral, tmp_path / "out", "-r", path], tmp_path), "latin1.toml", "UTF-8")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-shard-size", "9" * 400),
        ("--max-shard-size", "0"),
        ("--max-shard-size", "1e400"),
        ("--max-shard-size", "nan"),
        ("--max-shard-size", "-5GB"),
        ("--align", "68719476736"),
        ("--align", "48"),
        ("--align", "0"),
        ("--align", "-16"),
    ],
)
def test_options_out_of_bounds_are_one_line(mixtral, tmp_path, option, value):
    out = tmp_path / "out"
    refused(run(["convert", mixtral, out, "-p", "fuse-experts", option, value], tmp_path), option, out=out)
    assert not out.exists()


@pytest.mark.parametrize("case", ["parent-is-a-file", "name-too-long", "immutable"])
def test_an_unusable_out_is_one_line(mixtral, tmp_path, case):
    if case == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif case == "name-too-long":
        out = tmp_path / ("o" * 300)
    else:
        out = tmp_path / "locked"
        out.mkdir()
        if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported here")
    try:
        refused(run(["convert", mixtral, out, "-p", "fuse-experts", "--overwrite"], tmp_path), out.name[:50])
    finally:
        if case == "immutable":
            subprocess.run(["chattr", "-i", str(out)], check=True)
    assert not os.path.exists(out) or list(out.iterdir()) == []


@pytest.fixture(scope="module")
def converted_once(tmp_path_factory, mixtral_dir) -> Path:
    folder = tmp_path_factory.mktemp("converted")
    succeeded(run(["convert", mixtral_dir, folder / "out", "-p", "fuse-experts"], folder))
    return folder / "out"


@pytest.fixture
def converted(converted_once, tmp_path) -> Path:
    """A writable copy of mixtral converted with fuse-experts."""
    return Path(shutil.copytree(converted_once, tmp_path / "converted"))


def edit_report(out: Path, change) -> None:
    report = json.loads((out / REPORT_NAME).read_text())
    change(report)
    (out / REPORT_NAME).write_text(json.dumps(report))


HAND_EDITS = {
    "align 0": lambda r: r.update(align=0),
    "align a string": lambda r: r.update(align="16"),
    "tensors are numbers": lambda r: r.update(tensors=[1, 2, 3]),
    "shards are numbers": lambda r: r.update(shards=[1]),
    "shard size a string": lambda r: r["shards"][0].update(size="big"),
    "checksum a number": lambda r: r["checksums"]["files"].update({"config.json": 5}),
    "tensor shape a string": lambda r: r["tensors"][0].update(shape="2x2"),
    "misaligned not a list": lambda r: r["shards"][0].update(misaligned=7),
    "rebuild recipe without text": lambda r: r["rebuild"]["recipes"][0].pop("text"),
    "rebuild align 0": lambda r: r["rebuild"].update(align=0),
    "rebuild max_shard_size huge": lambda r: r["rebuild"].update(max_shard_size=10**400),
    "rebuild dtype unknown": lambda r: r["rebuild"].update(dtype="fp8"),
    "rebuild recipes a dict": lambda r: r["rebuild"].update(recipes={"a": 1}),
}


@pytest.mark.parametrize("edit", HAND_EDITS)
def test_verify_of_a_hand_edited_report_is_one_line(converted, mixtral, tmp_path, edit):
    edit_report(converted, HAND_EDITS[edit])
    refused(run(["verify", converted, "--against", mixtral], tmp_path), REPORT_NAME)


def test_verify_reads_no_file_through_a_link_out_of_the_folder(converted, tmp_path):
    (converted / "generation_config.json").unlink()
    (converted / "generation_config.json").symlink_to("/proc/self/status")
    line = refused(run(["verify", converted], tmp_path), "generation_config.json", "outside the folder")
    assert "/status, outside" in line


def test_a_hub_snapshot_whose_index_weight_map_is_a_list(sharded, tmp_path):
    from test_hub import add_snapshot

    index = json.loads((sharded / INDEX_NAME).read_text())
    index["weight_map"] = list(index["weight_map"].items())
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    cache = tmp_path / "hf-home" / "hub"
    add_snapshot(cache, "acme/list-index", "c" * 40, sharded, refs=("main",))
    env = {"HF_HOME": str(cache.parent), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = tmp_path / "out"
    refused(run(["convert", "acme/list-index", out, "-p", "fuse-experts"], tmp_path, env=env), INDEX_NAME, "weight_map", out=out)


# ---- broken promises and leaks -------------------------------------------------------------------


def loadable(out: Path) -> bool:
    """Does transformers load the folder (the real consumer decides what looks complete)?"""
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(out)
    except (OSError, ValueError):  # no weights file; no config.json
        return False
    return True


@pytest.mark.parametrize("fixture", ["mixtral", "sharded"])
def test_kill_9_at_any_final_step_leaves_nothing_loadable_and_resumes(request, tmp_path, fixture):
    """SIGKILL while the report is awaited, and at each file the final steps write or rename: never
    a folder transformers loads or verify accepts; --resume then finishes it byte for byte."""
    from moeconv.verify import verify

    src = request.getfixturevalue(fixture)
    reference = tmp_path / "reference"
    succeeded(run(["convert", src, reference, "-p", "fuse-experts"], tmp_path))
    shards = len(list(reference.glob("*.safetensors")))
    writes = len(list(reference.glob("*.json")))  # companions, config.json, the report, the index
    points = [("report", 1), *(("atomic_write_bytes", n) for n in range(1, writes + 1))]
    points += [("os.replace", n) for n in range(1, shards + 1)]
    for point in points:
        out = tmp_path / f"out-{point[0]}-{point[1]}"
        result = run(["convert", src, out, "-p", "fuse-experts"], tmp_path, kill_at=point)
        assert result.code == -9, (point, result.code, result.stderr[-2000:])
        assert not loadable(out), point
        assert REPORT_NAME not in os.listdir(out) or not verify(out).ok, point
        succeeded(run(["convert", src, out, "-p", "fuse-experts", "--resume"], tmp_path))
        assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in reference.iterdir()}
    assert loadable(reference)


def test_companions_are_known_regular_files_inside_src(mixtral, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (mixtral / "LICENSE").symlink_to(secret)
    (mixtral / "tokenizer.json").symlink_to("/etc/passwd")
    (mixtral / "real-vocab.json").write_text("{}")
    (mixtral / "vocab.json").symlink_to("real-vocab.json")  # inside SRC: fine
    (mixtral / "passwords.txt").write_text("hunter2")
    (mixtral / "aws-credentials.json").write_text("{}")
    (mixtral / "merges.txt").mkdir()
    out = tmp_path / "out"
    succeeded(run(["convert", mixtral, out, "-p", "fuse-experts"], tmp_path))
    names = {p.name for p in out.iterdir()}
    assert "vocab.json" in names and (out / "vocab.json").read_text() == "{}"
    assert not names & {"LICENSE", "tokenizer.json", "passwords.txt", "aws-credentials.json", "real-vocab.json", "merges.txt"}
    assert all(not p.is_symlink() for p in out.iterdir())


def test_a_single_file_src_copies_only_known_names(mixtral, tmp_path):
    (mixtral / "passwords.txt").write_text("hunter2")
    (mixtral / "aws-credentials.json").write_text("{}")
    (mixtral / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "out"
    succeeded(run(["convert", mixtral / "model.safetensors", out, "-p", "fuse-experts"], tmp_path))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert not names & {"passwords.txt", "aws-credentials.json"}


def test_a_lone_shard_linking_out_of_src_is_refused(mixtral, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(mixtral / "model.safetensors", elsewhere / "model.safetensors")
    (mixtral / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    out = tmp_path / "out"
    refused(run(["convert", mixtral, out, "-p", "fuse-experts"], tmp_path), "model.safetensors", "outside", out=out)


def test_an_index_into_a_subfolder_is_refused(sharded, tmp_path):
    index = json.loads((sharded / INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (sharded / "original").mkdir()
    shutil.copy(sharded / first, sharded / "original" / first)
    index["weight_map"] = {k: (f"original/{v}" if v == first else v) for k, v in index["weight_map"].items()}
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    out = tmp_path / "out"
    refused(run(["convert", sharded, out, "-p", "fuse-experts"], tmp_path), INDEX_NAME, f"original/{first}", out=out)


def test_overwrite_replaces_what_moeconv_wrote_and_nothing_else(mixtral, tmp_path):
    out = tmp_path / "out"
    (mixtral / "tokenizer.json").write_text('{"old": true}')
    succeeded(run(["convert", mixtral, out, "-p", "fuse-experts"], tmp_path))
    (out / "notes.md").write_text("mine")
    (mixtral / "tokenizer.json").unlink()
    succeeded(run(["convert", mixtral, out, "-p", "fuse-experts", "--overwrite"], tmp_path))
    names = {p.name for p in out.iterdir()}
    assert "tokenizer.json" not in names and "notes.md" in names
    assert json.loads((out / REPORT_NAME).read_text())["checksums"]["files"].keys() == names - {"notes.md", REPORT_NAME}
    succeeded(run(["verify", out], tmp_path))


def test_overwrite_deletes_no_directory(mixtral, tmp_path):
    out = tmp_path / "out"
    (out / "weights.safetensors").mkdir(parents=True)
    (out / "weights.safetensors" / "precious").write_text("keep me")
    refused(run(["convert", mixtral, out, "-p", "fuse-experts", "--overwrite"], tmp_path), "weights.safetensors", "folder")
    assert (out / "weights.safetensors" / "precious").read_text() == "keep me"


CAST = "[[rule]]\nname = 'to bf16'\nmatch = 'ids'\nops = [{{ op = 'cast', dtype = 'bf16'{extra} }}]\ntarget = 'ids'\n"


def test_a_lossy_integer_cast_is_refused_unless_asked_for(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file({"ids": torch.tensor([1, 16777217, -3], dtype=torch.int32)}, str(src / "model.safetensors"))
    out = tmp_path / "out"
    result = run(["convert", src, out, "-r", recipe(tmp_path, CAST.format(extra=""))], tmp_path)
    refused(result, "'to bf16'", "ids", "16777217 becomes 16777216", "lossy = true")
    assert complete_looking(out) == []
    succeeded(run(["convert", src, out, "-r", recipe(tmp_path, CAST.format(extra=", lossy = true")), "--overwrite"], tmp_path))
    assert load_file(str(out / "model.safetensors"))["ids"].tolist() == [1, 16777216, -3]


def test_an_exact_integer_cast_needs_no_permission(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file({"ids": torch.tensor([1, 255, -3, 0], dtype=torch.int32)}, str(src / "model.safetensors"))
    out = tmp_path / "out"
    succeeded(run(["convert", src, out, "-r", recipe(tmp_path, CAST.format(extra=""))], tmp_path))
    back = load_file(str(out / "model.safetensors"))["ids"]
    assert back.dtype == torch.bfloat16 and back.tolist() == [1, 255, -3, 0]


@pytest.mark.parametrize("second", ["--overwrite", "--resume"])
def test_a_second_run_on_a_busy_out_is_refused_and_the_first_finishes(sharded, tmp_path, second):
    out = tmp_path / "out"
    slow = {"MOECONV_CHUNK_DELAY": "0.05", "MOECONV_CHUNK_BYTES": "4096"}
    first = start(["convert", sharded, out, "-p", "fuse-experts"], tmp_path / "first", env=slow)
    try:
        first.wait_for(lambda: (out / JOURNAL_NAME).exists())
        result = run(["convert", sharded, out, "-p", "fuse-experts", second], tmp_path / "second")
        refused(result, str(out), "another")
    finally:
        done = first.finish()
    succeeded(done)
    succeeded(run(["verify", out], tmp_path))
