"""examples/: every recipe parses and does what its comment says on a fixture (dry run, --strict);
the prebake workflow runs, step by step, as CI would run it (against an offline hub cache holding the
tiny example, with pip and the hub upload replaced by local stand-ins)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.plan import build_plan
from moeconv.recipe import load_preset, load_recipe
from moeconv.source import Checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted((EXAMPLES / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_example_recipe_parses_with_comments(path):
    recipe = load_recipe(path)
    assert recipe.description and recipe.rules
    assert path.read_text().count("#") >= 2, "example recipes explain themselves"


def test_there_is_one_recipe_of_each_kind():
    rules = [rule for path in RECIPES for rule in load_recipe(path).rules]
    ops = {step.op for rule in rules for step in rule.steps}
    assert any(not rule.steps and not rule.drop for rule in rules)  # rename
    assert any(rule.drop for rule in rules)
    assert any(len(rule.inputs) > 1 and rule.group for rule in rules)  # multi-input + group/stack
    assert {"unstack", "split", "stack", "concat", "transpose", "deinterleave"} <= ops
    assert any(rule.model_types for rule in rules) and any(rule.optional for rule in rules)


def plan(source, *recipes, strict=True):
    loaded = [
        load_preset(r.removeprefix("preset:")) if r.startswith("preset:") else load_recipe(EXAMPLES / "recipes" / r)
        for r in recipes
    ]
    return build_plan(Checkpoint.open(source), loaded, strict=strict)


def shapes(p) -> dict[str, tuple]:
    return {k: t.shape for k, t in p.tensors.items()}


def test_rename_drop_and_router_recipes_on_per_expert_checkpoints(mixtral_dir, qwen3_moe_dir):
    for source in (mixtral_dir, qwen3_moe_dir):
        before = Checkpoint.open(source).tensors
        out = shapes(plan(source, "rename.toml", "drop.toml", "router-by-model-type.toml"))
        assert "lm_head.weight" not in out
        assert out["model.layers.0.attention.wq.weight"] == before["model.layers.0.self_attn.q_proj.weight"].shape
        assert not any(".self_attn.q_proj." in k for k in out)
        assert "model.layers.1.mlp.router.weight" in out and not any(k.endswith(".gate.weight") for k in out)
        assert len(out) == len(before) - 1


def test_fuse_up_first_then_unfuse_split_cascade(mixtral_dir):
    tensors = Checkpoint.open(mixtral_dir).tensors
    w1 = tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight"].shape  # [I, H]
    w2 = tensors["model.layers.0.block_sparse_moe.experts.0.w2.weight"].shape  # [H, I]
    fused = plan(mixtral_dir, "fuse-up-first.toml")
    gate_up = fused.tensors["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (4, 2 * w1[0], w1[1])
    assert gate_up.sources[:2] == (
        "model.layers.0.block_sparse_moe.experts.0.w3.weight",
        "model.layers.0.block_sparse_moe.experts.0.w1.weight",
    )  # up rows first
    split = shapes(plan(mixtral_dir, "fuse-up-first.toml", "unfuse-split.toml"))
    assert split["model.layers.0.mlp.experts.gate_proj"] == split["model.layers.0.mlp.experts.up_proj"] == (4, *w1)
    assert split["model.layers.0.mlp.experts.3.down_proj.weight"] == w2


def test_gpt_oss_cascade_on_the_preset_output(gpt_oss_mxfp4_dir):
    result = plan(gpt_oss_mxfp4_dir, "preset:gpt-oss-bf16", "gpt-oss-cascade-up-first.toml")
    base = plan(gpt_oss_mxfp4_dir, "preset:gpt-oss-bf16")
    key = "model.layers.0.mlp.experts"
    e, h, two_i = base.tensors[f"{key}.gate_up_proj"].shape  # [E, H, 2I]
    assert result.tensors[f"{key}.gate_up_proj"].shape == (e, two_i, h)
    assert result.tensors[f"{key}.gate_up_proj"].ops[-1].startswith("deinterleave")
    assert result.tensors[f"{key}.down_proj"].shape == tuple(base.tensors[f"{key}.down_proj"].shape[i] for i in (0, 2, 1))


def test_recipes_run_through_the_cli_dry_run(mixtral_dir, tmp_path):
    args = ["convert", str(mixtral_dir), str(tmp_path / "out"), "--dry-run", "--strict", "--json"]
    for name in ("rename.toml", "drop.toml", "fuse-up-first.toml", "router-by-model-type.toml"):
        args += ["--recipe", str(EXAMPLES / "recipes" / name)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (0, 3), result.output  # 3: the renamed keys are not transformers' (by design)
    assert not (tmp_path / "out").exists()


def test_prebake_workflow_is_valid_and_uses_existing_flags():
    workflow = yaml.safe_load((EXAMPLES / "github-actions-prebake.yml").read_text())
    steps = workflow["jobs"]["prebake"]["steps"]
    script = "\n".join(step.get("run", "") for step in steps)
    convert_help = CliRunner().invoke(app, ["convert", "--help"], terminal_width=200).output
    for flag in ("--strict", "--low-disk", "--revision", "--dry-run", "--json", "--preset"):
        assert flag in script and flag in convert_help, flag
    assert "moeconv inspect" in script and "torch==2.13.0" in script
    assert "hf upload" in script
    hf = shutil.which("hf")  # huggingface_hub's own CLI, installed with it
    assert hf, "huggingface_hub's `hf` command is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    usage = subprocess.run([hf, "upload", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert (
        usage.returncode == 0
        and "REPO_ID" in usage.stdout
        and "--repo-type" in usage.stdout
        and "--commit-message" in usage.stdout
    )


def _shims(bin_dir: Path, record: Path) -> None:
    """moeconv and python from this checkout; pip a no-op (the environment is installed); hf: `version`,
    and `upload` checked and recorded instead of sent."""
    repo = EXAMPLES.parent
    scripts = {
        "moeconv": f'exec "{sys.executable}" -m moeconv "$@"',
        "python": f'if [ "$1 $2" = "-m pip" ]; then echo "pip $*" >> "{record}"; exit 0; fi\nexec "{sys.executable}" "$@"',
        "hf": (
            f'case "$1" in version) echo "hf stand-in";;\n'
            f'upload) test -f "$3/moeconv-report.json" && test "$4" = . && echo "upload $*" >> "{record}";;\n'
            "*) exit 2;; esac"
        ),
    }
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nexport PYTHONPATH={repo}\n{body}\n")
        path.chmod(0o755)


def _expand(text: str, values: dict[str, str]) -> str:
    """GitHub's ${{ ... }} expressions, from `values` (an unknown one fails the test)."""
    return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: values[m[1]], text)


def test_prebake_workflow_runs_as_written(tmp_path, tiny_gpt_oss_example_dir):
    from test_hub import add_snapshot

    workflow = yaml.safe_load((EXAMPLES / "github-actions-prebake.yml").read_text())
    job = workflow["jobs"]["prebake"]
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    inputs = workflow[True]["workflow_dispatch"]["inputs"]  # YAML 1.1 reads the key `on` as true
    values = {
        "github.workspace": str(workspace),
        "secrets.HF_TOKEN": "",
        "inputs.source": "acme/tiny-gpt-oss",
        "inputs.revision": inputs["revision"]["default"],
        "inputs.preset": inputs["preset"]["default"],
        "inputs.target": "acme/tiny-gpt-oss-bf16",
    }
    record = tmp_path / "record.txt"
    _shims(tmp_path / "bin", record)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update({k: _expand(str(v), values) for k, v in job["env"].items()})
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    add_snapshot(Path(env["HF_HOME"]) / "hub", "acme/tiny-gpt-oss", "c" * 40, tiny_gpt_oss_example_dir, refs=("main",))

    ran = []
    for step in job["steps"]:
        if "run" not in step:
            continue
        script = _expand(step["run"], values)
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
            cwd=workspace,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"step {step['name']!r} failed:\n{proc.stdout}\n{proc.stderr}"
        ran.append((step["name"], proc.stdout))
    assert len(ran) == 5
    out = workspace / "out"
    report = json.loads((out / "moeconv-report.json").read_text())
    assert report["ok"] and report["low_disk"] and report["source"] == "acme/tiny-gpt-oss@" + "c" * 12
    assert json.loads((workspace / "convert.json").read_text())["checksums"] == report["checksums"]
    assert ran[3][1].splitlines()[-1].startswith(f"{len(report['tensors'])} tensors, ")  # the check step's summary
    uploads = [line for line in record.read_text().splitlines() if line.startswith("upload ")]
    assert uploads == [
        f"upload upload acme/tiny-gpt-oss-bf16 {out} . --repo-type model --commit-message moeconv gpt-oss-bf16 of acme/tiny-gpt-oss@main"
    ]
    assert "torch==2.13.0" in record.read_text()
