"""moeconv: turn a Mixture-of-Experts checkpoint into the exact layout a backend wants.

    import moeconv

    plan = moeconv.plan_for("openai/gpt-oss-20b", presets=["gpt-oss-bf16"])  # headers only
    print(plan.report.missing, plan.report.unexpected)                        # before any data moves
    report = moeconv.convert(plan, "gpt-oss-20b-bf16")                        # the data, then the report

The stages (moeconv.source, .recipe, .plan, .stream, .execute, .output) are usable on their own;
these two functions are the short way through them. Nothing heavy is imported until they run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeconv.plan import Plan

__version__ = "0.1.0"


def plan_for(
    src: str | Path,
    *,
    presets: list[str] = (),
    recipes: list[str | Path] = (),
    dtype: str | None = None,
    align: int = 16,
    max_shard_size: int = 5 * 10**9,
    strict: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> Plan:
    """Plan a conversion of `src` (a folder, a .safetensors file, or a hub repo id) with built-in
    `presets` then recipe files, in order. Reads headers only; raises MoeconvError naming the problem."""
    from moeconv.hub import open_source
    from moeconv.plan import build_plan
    from moeconv.recipe import load_preset, load_recipe

    rules = [load_preset(name) for name in presets] + [load_recipe(path) for path in recipes]
    source = open_source(str(src), revision=revision, token=token)
    return build_plan(source, rules, dtype=dtype, align=align, max_shard_size=max_shard_size, strict=strict)


def convert(plan: Plan, out: str | Path, *, overwrite: bool = False, resume: bool = False) -> dict:
    """Write a planned conversion to `out` (downloading a hub repo's shards first); returns the
    report written to `out/moeconv-report.json`."""
    from moeconv.execute import execute
    from moeconv.hub import fetch_inputs

    plan.start_report()
    fetch_inputs(plan)
    return execute(plan, out, overwrite=overwrite, resume=resume)
