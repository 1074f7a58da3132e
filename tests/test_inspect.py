"""`moeconv inspect`: the collapsed human table, exact --json, and one-line errors (exit 1)."""

import json
import struct
from pathlib import Path

import pytest
import safetensors_bytes as sb
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.keys import natural_key

LAYERS = 24


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def sharded(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """24 layers over 3 shards written by safetensors itself (8-byte padding: some tensors misaligned);
    layer 23's router has another shape, so its row must split off."""
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(LAYERS):
        tensors[f"model.layers.{i}.mlp.experts.down_proj_blocks"] = torch.randint(
            0, 256, (2, 4, 1, 16), generator=g, dtype=torch.uint8
        )
        rows = 3 if i == LAYERS - 1 else 2
        tensors[f"model.layers.{i}.mlp.router.weight"] = torch.randn(rows, 5, generator=g).to(torch.bfloat16)
        tensors[f"model.layers.{i}.mlp.router.bias"] = torch.randn(3, generator=g).to(torch.bfloat16)  # 6 B: misaligns
    tensors["model.embed_tokens.weight"] = torch.randn(8, 4, generator=g)
    weight_map = {}
    for n in range(3):
        name = f"model-{n + 1:05d}-of-00003.safetensors"
        part = {k: t for k, t in tensors.items() if (int(k.split(".")[2]) if "layers" in k else 0) % 3 == n}
        save_file(part, tmp_path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path, tensors


def file_offsets(root: Path) -> dict[str, tuple[str, int]]:
    """key -> (file name, absolute offset), straight from the bytes."""
    out = {}
    for path in sorted(root.glob("*.safetensors")):
        blob = path.read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        for key, entry in json.loads(blob[8 : 8 + n]).items():
            if key != "__metadata__":
                out[key] = (path.name, 8 + n + entry["data_offsets"][0])
    return out


def run(*args: str):
    return CliRunner().invoke(app, ["inspect", *args])


def row_of(output: str, pattern: str) -> str:
    lines = [line for line in output.splitlines() if line.split() and line.split()[0] == pattern]
    assert len(lines) == 1, (pattern, output)
    return lines[0]


def test_human_view_collapses_and_counts(sharded):
    root, tensors = sharded
    result = run(str(root))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    offsets = file_offsets(root)

    def aligned(keys):
        return sum(offsets[k][1] % 16 == 0 for k in keys)

    blocks = [f"model.layers.{i}.mlp.experts.down_proj_blocks" for i in range(LAYERS)]
    line = row_of(out, "model.layers.{0...23}.mlp.experts.down_proj_blocks")
    assert line.split()[1:7] == ["U8", "[2,", "4,", "1,", "16]", "x24"]
    assert "3.00 KiB" in line  # 24 x 128 B
    assert line.split()[-2] == "1...3"  # file numbers, explained under the table
    assert "\n(file N = model-{00001...00003}-of-00003.safetensors)\n" in out
    assert line.split()[-1] == f"{aligned(blocks)}/24"

    router = [f"model.layers.{i}.mlp.router.weight" for i in range(LAYERS - 1)]
    line = row_of(out, "model.layers.{0...22}.mlp.router.weight")
    assert line.split()[1:5] == ["BF16", "[2,", "5]", "x23"] and line.split()[-1] == f"{aligned(router)}/23"
    line = row_of(out, "model.layers.23.mlp.router.weight")
    assert line.split()[1:5] == ["BF16", "[3,", "5]", "x1"]

    bias = [f"model.layers.{i}.mlp.router.bias" for i in range(LAYERS)]
    assert 0 < aligned(bias) < 24  # the fixture really has misaligned tensors
    assert row_of(out, "model.layers.{0...23}.mlp.router.bias").split()[-1] == f"{aligned(bias)}/24"

    total = sum(len(raw(t)) for t in tensors.values())
    assert (
        f"total: {len(tensors)} tensors," in out
        and f"({total} bytes), 3 files, {aligned(tensors)}/{len(tensors)} 16-byte aligned" in out
    )
    u8 = sum(len(raw(t)) for t in tensors.values() if t.dtype == torch.uint8)
    assert row_of(out, "U8").split()[1] == str(LAYERS) and f"({u8})" in row_of(out, "U8")


def test_json_lists_every_tensor_with_absolute_offsets(sharded):
    root, tensors = sharded
    result = run(str(root), "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    report = json.loads(result.stdout)  # the whole stdout is one JSON object
    assert report["path"] == str(root.absolute())
    assert report["files"] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [t["key"] for t in report["tensors"]] == sorted(tensors, key=natural_key)
    offsets = file_offsets(root)
    blobs = {name: (root / name).read_bytes() for name in report["files"]}
    for entry in report["tensors"]:
        tensor = tensors[entry["key"]]
        assert (entry["file"], entry["offset"]) == offsets[entry["key"]]
        assert entry["dtype"] == {torch.uint8: "U8", torch.bfloat16: "BF16", torch.float32: "F32"}[tensor.dtype]
        assert entry["shape"] == list(tensor.shape)
        assert entry["nbytes"] == len(raw(tensor))
        assert blobs[entry["file"]][entry["offset"] : entry["offset"] + entry["nbytes"]] == raw(tensor)
        assert entry["aligned16"] == (entry["offset"] % 16 == 0)
    assert report["total_bytes"] == sum(len(raw(t)) for t in tensors.values())
    assert report["bytes_by_dtype"] == {
        "BF16": sum(len(raw(t)) for t in tensors.values() if t.dtype == torch.bfloat16),
        "F32": 128,
        "U8": 24 * 128,
    }


def test_single_file_json(tmp_path):
    save_file({"b": torch.ones(3, dtype=torch.bfloat16), "a": torch.zeros(2)}, tmp_path / "x.safetensors")
    report = json.loads(run(str(tmp_path / "x.safetensors"), "--json").stdout)
    assert report["files"] == ["x.safetensors"]
    assert [t["key"] for t in report["tensors"]] == ["a", "b"]


@pytest.mark.parametrize("as_json", [False, True])
def test_bad_file_is_one_line_exit_1(tmp_path, as_json):
    header, data = sb.entries({"w": ("F32", [2], b"\0" * 8)})
    header["w"]["shape"] = [3]
    path = sb.write(tmp_path / "model.safetensors", header, data)
    result = run(str(tmp_path), *(["--json"] if as_json else []))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(path) in lines[0] and '"w"' in lines[0]


def test_missing_path_exit_1(tmp_path):
    result = run(str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: no such file or folder"
