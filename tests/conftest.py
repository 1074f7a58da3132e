"""Shared fixtures: tiny checkpoints built once per session (see tests/checkpoints.py).

Every fixture returns a Path to a checkpoint folder. Session-scoped folders are shared by all tests:
treat them as READ-ONLY (copy with shutil.copytree into tmp_path before changing anything).

    qwen3_moe_dir, mixtral_dir, olmoe_dir   per-expert hub layout, bf16, single file
    per_expert_dir                          parametrized over the three above (test id = model_type)
    sharded_mixtral_dir                     per-expert mixtral, save_pretrained(max_shard_size="20KB"): 3 shards + index
    gpt_oss_mxfp4_dir                       gpt-oss hub MXFP4 layout, 2 shards + index, original/ + metal/ junk
    tiny_gpt_oss_example_dir                the committed examples/tiny-gpt-oss (hub-style config.json)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import checkpoints as ck  # tests/ is on sys.path (pytest's rootdir conftest insertion)
import pytest

_built: dict[str, Path] = {}


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The load report child writes its import hint under XDG_CACHE_HOME: a temp folder, not ~/.cache.
    Load reports are not recalled from earlier runs (tests that patch transformers must get fresh
    ones); the tests of that cache turn it on."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        patch.setenv("MOECONV_REPORT_CACHE", "0")
        yield


def _once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    if name not in _built:
        _built[name] = build(tmp_path_factory.mktemp(name) / "ckpt")
    return _built[name]


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory) -> Path:
    return _once(tmp_path_factory, "qwen3_moe", lambda d: ck.build_per_expert("qwen3_moe", d))


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory) -> Path:
    return _once(tmp_path_factory, "mixtral", lambda d: ck.build_per_expert("mixtral", d))


@pytest.fixture(scope="session")
def olmoe_dir(tmp_path_factory) -> Path:
    return _once(tmp_path_factory, "olmoe", lambda d: ck.build_per_expert("olmoe", d))


@pytest.fixture(scope="session", params=ck.PER_EXPERT_FAMILIES)
def per_expert_dir(request, tmp_path_factory) -> Path:
    model_type = request.param
    return _once(tmp_path_factory, model_type, lambda d: ck.build_per_expert(model_type, d))


@pytest.fixture(scope="session")
def sharded_mixtral_dir(tmp_path_factory) -> Path:
    return _once(tmp_path_factory, "mixtral_sharded", lambda d: ck.build_per_expert("mixtral", d, max_shard_size="20KB"))


@pytest.fixture(scope="session")
def gpt_oss_mxfp4_dir(tmp_path_factory) -> Path:
    return _once(tmp_path_factory, "gpt_oss_mxfp4", lambda d: ck.build_gpt_oss_mxfp4(d))


@pytest.fixture(scope="session")
def tiny_gpt_oss_example_dir() -> Path:
    if not (ck.EXAMPLE_DIR / "config.json").exists():
        pytest.fail(f"{ck.EXAMPLE_DIR} is missing: run python examples/make_tiny_gpt_oss.py {ck.EXAMPLE_DIR}")
    return ck.EXAMPLE_DIR


# tests/test_ray.py runs on a real Ray instance, only inside a loopback-only network namespace (Ray
# binds the machine's interface address otherwise): test_distributed.py's wrapper starts it there.
if os.environ.get("MOECONV_RAY_NETNS") != "1":
    collect_ignore = ["test_ray.py"]


@pytest.fixture
def sharded(sharded_mixtral_dir, tmp_path) -> Path:
    """A writable copy of the 3-shard per-expert mixtral (index + shards), for tests that forge files."""
    return Path(shutil.copytree(sharded_mixtral_dir, tmp_path / "src"))
