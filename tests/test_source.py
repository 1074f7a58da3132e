"""The reader: every lie a file can tell is caught with a one-line message naming file, key and problem."""

import json
import os
import struct
from pathlib import Path

import pytest
import safetensors_bytes as sb
import torch
from safetensors.torch import save_file

from moeconv.errors import CheckpointError
from moeconv.format import HEADER_CAP
from moeconv.source import Checkpoint, read_header


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def good(path: Path) -> Path:
    header, data = sb.entries({"a": ("F32", [2], f32(1, 2)), "b": ("U8", [3], b"xyz")})
    return sb.write(path, header, data)


def error_of(path) -> str:
    with pytest.raises(CheckpointError) as caught:
        Checkpoint.open(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- one file's header --------------------------------------------------------------------------


def test_good_header_absolute_offsets(tmp_path):
    path = good(tmp_path / "m.safetensors")
    tensors, metadata, data_start = read_header(path)
    raw = path.read_bytes()
    assert data_start == 8 + struct.unpack("<Q", raw[:8])[0]
    assert metadata == {}
    assert list(tensors) == ["a", "b"]
    a, b = tensors["a"], tensors["b"]
    assert (a.dtype, a.shape, a.file, a.nbytes) == ("F32", (2,), path.absolute(), 8)
    assert raw[a.begin : a.end] == f32(1, 2)
    assert raw[b.begin : b.end] == b"xyz"
    assert b.end == len(raw)


def test_metadata_and_padding_accepted(tmp_path):
    header, data = sb.entries({"a": ("U8", [1], b"z")}, metadata={"format": "pt"})
    path = sb.write(tmp_path / "m.safetensors", header, data, pad=13)
    tensors, metadata, data_start = read_header(path)
    assert metadata == {"format": "pt"}
    assert path.read_bytes()[tensors["a"].begin] == ord("z")


def test_file_shorter_than_8_bytes(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    message = error_of(path)
    assert str(path) in message and "3 bytes" in message and "shorter than" in message


def test_header_length_beyond_file(tmp_path):
    path = sb.write(tmp_path / "m.safetensors", {}, header_len=5000)
    message = error_of(path)
    assert str(path) in message and "5000" in message and "beyond the file size" in message


def test_header_length_over_cap_without_allocating(tmp_path):
    # 2^62 would be a MemoryError if the reader trusted it; the cap check comes first.
    for claimed in (HEADER_CAP + 1, 2**62):
        path = sb.write(tmp_path / "m.safetensors", "{}", header_len=claimed)
        message = error_of(path)
        assert str(path) in message and str(claimed) in message and "limit" in message


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, "a": {}}', "duplicate key"),
    ],
)
def test_header_not_json_object(tmp_path, raw, problem):
    path = sb.write(tmp_path / "m.safetensors", raw)
    message = error_of(path)
    assert str(path) in message and problem in message


@pytest.mark.parametrize(
    "entry",
    [
        [1, 2],
        {"dtype": "U8", "shape": [1]},
        {"shape": [1], "data_offsets": [0, 1]},
        {"dtype": "U8", "data_offsets": [0, 1]},
    ],
)
def test_entry_missing_fields(tmp_path, entry):
    path = sb.write(tmp_path / "m.safetensors", {"bad.key": entry}, b"z")
    message = error_of(path)
    assert str(path) in message and '"bad.key"' in message and "dtype, shape and data_offsets" in message


@pytest.mark.parametrize("dtype", ["F4", "Q8", "f32", 7])
def test_unsupported_dtype(tmp_path, dtype):
    path = sb.write(tmp_path / "m.safetensors", {"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 1]}}, b"z")
    message = error_of(path)
    assert str(path) in message and '"w"' in message and "unsupported dtype" in message
    assert "supported: " in message and "BF16" in message and "U8" in message


@pytest.mark.parametrize("shape", [[-1], [2, 1.5], ["3"], [True], "3", None])
def test_bad_shape(tmp_path, shape):
    path = sb.write(tmp_path / "m.safetensors", {"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}, b"z")
    message = error_of(path)
    assert str(path) in message and '"w"' in message and "non-negative integers" in message


@pytest.mark.parametrize("offsets", [[1, 0], [0], [0, -1], "0,1", [0, 1.0]])
def test_bad_data_offsets(tmp_path, offsets):
    path = sb.write(tmp_path / "m.safetensors", {"w": {"dtype": "U8", "shape": [1], "data_offsets": offsets}}, b"z")
    message = error_of(path)
    assert str(path) in message and '"w"' in message and "data_offsets" in message


def test_shape_times_itemsize_mismatch(tmp_path):
    header, data = sb.entries({"w": ("F32", [2], f32(1, 2))})
    header["w"]["shape"] = [3]
    path = sb.write(tmp_path / "m.safetensors", header, data)
    message = error_of(path)
    assert str(path) in message and '"w"' in message and "12 bytes" in message and "span 8" in message


def test_hole_between_tensors(tmp_path):
    header = {
        "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]},
    }
    path = sb.write(tmp_path / "m.safetensors", header, b"12345")
    message = error_of(path)
    assert str(path) in message and '"b"' in message and "not contiguous" in message and "hole" in message


def test_overlapping_tensors(tmp_path):
    header = {
        "b": {"dtype": "U8", "shape": [3], "data_offsets": [1, 4]},
        "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
    }
    path = sb.write(tmp_path / "m.safetensors", header, b"1234")
    message = error_of(path)
    assert str(path) in message and '"b"' in message and "overlap" in message


def test_first_tensor_not_at_zero(tmp_path):
    path = sb.write(tmp_path / "m.safetensors", {"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"12")
    message = error_of(path)
    assert '"a"' in message and "hole" in message and "expected 0" in message


def test_truncated_data(tmp_path):
    header, data = sb.entries({"a": ("F32", [2], f32(1, 2))})
    path = sb.write(tmp_path / "m.safetensors", header, data[:-3])
    message = error_of(path)
    assert str(path) in message and "truncated" in message


def test_trailing_bytes(tmp_path):
    header, data = sb.entries({"a": ("F32", [2], f32(1, 2))})
    path = sb.write(tmp_path / "m.safetensors", header, data + b"junk")
    message = error_of(path)
    assert str(path) in message and "trailing bytes" in message


@pytest.mark.parametrize("metadata", [["format", "pt"], {"format": 1}, {"n": None}, "pt"])
def test_metadata_not_str_map(tmp_path, metadata):
    header, data = sb.entries({"a": ("U8", [1], b"z")}, metadata=metadata)
    path = sb.write(tmp_path / "m.safetensors", header, data)
    message = error_of(path)
    assert str(path) in message and "__metadata__" in message and "strings to strings" in message


def test_key_with_newline_stays_one_line(tmp_path):
    path = sb.write(tmp_path / "m.safetensors", {"evil\nkey": {"dtype": "X", "shape": [1], "data_offsets": [0, 1]}}, b"z")
    message = error_of(path)  # asserts one line
    assert '"evil\\nkey"' in message


def test_agrees_with_safetensors_on_valid_files(tmp_path):
    tensors = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, 2, 3], dtype=torch.bfloat16),
        "s": torch.tensor(7, dtype=torch.int64),
        "e": torch.zeros(0, 4, dtype=torch.uint8),
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with Checkpoint.open(tmp_path) as ckpt:
        assert list(ckpt.tensors) == ["b", "e", "s", "w"]
        raw = (tmp_path / "model.safetensors").read_bytes()
        for key, tensor in tensors.items():
            info = ckpt.tensors[key]
            assert info.shape == tuple(tensor.shape)
            assert raw[info.begin : info.end] == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
            assert torch.equal(ckpt.read(key), tensor)


# ---- reading ------------------------------------------------------------------------------------


def test_read_slices_equal_original(tmp_path):
    tensors = {
        "model.layers.0.w": torch.randn(7, 5).to(torch.bfloat16),
        "model.layers.1.w": torch.randint(0, 255, (9, 2, 16), dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path / "model.safetensors") as ckpt:
        for key in ("model.layers.0.w", "model.layers.1.w"):
            t = tensors[key]
            assert torch.equal(ckpt.read(key), t)
            for start, stop in [(0, 1), (2, 5), (3, None), (None, 4), (6, 7)]:
                assert torch.equal(ckpt.read(key, start, stop), t[start:stop])
        assert torch.equal(ckpt.read("scalar"), tensors["scalar"])
        with pytest.raises(CheckpointError, match="0-d"):
            ckpt.read("scalar", 0, 1)
        stacked = tensors["model.layers.1.w"]  # [9, 2, 16]: rows of one member
        for index in (0, 4, 8):
            for start, stop in [(0, 1), (1, 2), (None, None), (0, 2)]:
                got = ckpt.read("model.layers.1.w", start, stop, within=index)
                assert torch.equal(got, stacked[index, start:stop])
        with pytest.raises(CheckpointError, match=r"\[9, 2, 16\] has no row 9 to slice within"):
            ckpt.read("model.layers.1.w", 0, 1, within=9)
        with pytest.raises(CheckpointError, match='"nope"'):
            ckpt.read("nope")


def _rss_and_rchar() -> tuple[int, int]:
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    rchar = int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])
    return rss, rchar


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc")
def test_slice_does_not_read_whole_file(tmp_path):
    # A 256 MiB tensor in a sparse file: reading 2 rows (2 KiB) must neither read() the file
    # (rchar) nor touch every page of it (RSS: mapped file pages + any copy). Checked by hand to
    # fail for `load(path.read_bytes())` and for `get_tensor(key).clone()[a:b]`.
    rows, width = 256 * 1024, 1024
    header = {"big": {"dtype": "U8", "shape": [rows, width], "data_offsets": [0, rows * width]}}
    path = tmp_path / "model.safetensors"
    path.write_bytes(sb.build(header))
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size + rows * width)
        handle.seek(-width, 2)
        handle.write(b"\x07" * width)  # the last row, to check we really read from the file
    with Checkpoint.open(tmp_path) as ckpt:
        rss0, rchar0 = _rss_and_rchar()
        chunk = ckpt.read("big", rows - 2, rows)
        rss1, rchar1 = _rss_and_rchar()
    assert chunk.shape == (2, width)
    assert chunk[1].tolist() == [7] * width and chunk[0].tolist() == [0] * width
    assert rchar1 - rchar0 < 16 * 2**20
    assert rss1 - rss0 < 32 * 2**20


# ---- folders and indexes ------------------------------------------------------------------------


def _sharded(root: Path, *, layers: int = 4, files: int = 2) -> dict[str, torch.Tensor]:
    """`files` shards of per-layer tensors + index + config, written with safetensors itself."""
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.layers.{i}.w": torch.full((2, 3), float(i)) for i in range(layers)}
    names = [f"model-{n:05d}-of-{files:05d}.safetensors" for n in range(1, files + 1)]
    weight_map = {}
    for n, name in enumerate(names):
        part = {k: v for i, (k, v) in enumerate(tensors.items()) if i % files == n}
        save_file(part, root / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return tensors


def test_sharded_folder(tmp_path):
    tensors = _sharded(tmp_path / "ck", layers=12, files=3)
    with Checkpoint.open(tmp_path / "ck") as ckpt:
        assert ckpt.root == (tmp_path / "ck").absolute()
        assert [p.name for p in ckpt.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        assert list(ckpt.tensors) == [f"model.layers.{i}.w" for i in range(12)]  # natural order
        assert ckpt.config == {"model_type": "toy"}
        assert ckpt.tensors["model.layers.4.w"].file.name == "model-00002-of-00003.safetensors"
        for key, tensor in tensors.items():
            assert torch.equal(ckpt.read(key), tensor)


def test_index_file_path_opens_folder(tmp_path):
    _sharded(tmp_path)
    with Checkpoint.open(tmp_path / "model.safetensors.index.json") as ckpt:
        assert len(ckpt.tensors) == 4 and len(ckpt.files) == 2


def test_single_file_path_root_and_config(tmp_path):
    _sharded(tmp_path)
    with Checkpoint.open(tmp_path / "model-00002-of-00002.safetensors") as ckpt:
        assert ckpt.root == tmp_path.absolute()
        assert ckpt.config == {"model_type": "toy"}
        assert list(ckpt.tensors) == ["model.layers.1.w", "model.layers.3.w"]


def test_folder_without_index_reads_all_root_files_not_subfolders(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "two.safetensors")
    for sub in ("original", "metal"):
        (tmp_path / sub).mkdir()
        save_file({"junk": torch.ones(1)}, tmp_path / sub / "model.safetensors")
        (tmp_path / sub / "broken.safetensors").write_bytes(b"xx")  # would fail if read
    with Checkpoint.open(tmp_path) as ckpt:
        assert [p.name for p in ckpt.files] == ["one.safetensors", "two.safetensors"]
        assert list(ckpt.tensors) == ["a", "b"]
        assert ckpt.config is None


def test_gpt_oss_folder_never_reads_original_or_metal(gpt_oss_mxfp4_dir):
    assert (gpt_oss_mxfp4_dir / "original").is_dir()
    with Checkpoint.open(gpt_oss_mxfp4_dir) as ckpt:
        assert all(p.parent == ckpt.root for p in ckpt.files)
        assert all(info.file.parent == ckpt.root for info in ckpt.tensors.values())
        assert any(k.endswith("mlp.experts.down_proj_blocks") for k in ckpt.tensors)


def test_model_safetensors_wins_like_transformers(tmp_path):
    _sharded(tmp_path)
    save_file({"only": torch.zeros(1)}, tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as ckpt:
        assert list(ckpt.tensors) == ["only"]


def test_same_key_in_two_files_without_index(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "two.safetensors")
    message = error_of(tmp_path)
    assert str(tmp_path / "two.safetensors") in message and '"a"' in message and "one.safetensors" in message


def test_pickled_only_folder(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "pytorch_model.bin" in message and "pickled" in message
    assert "pickled" in error_of(tmp_path / "pytorch_model.bin")


def test_empty_folder(tmp_path):
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "no .safetensors" in message


def test_missing_path(tmp_path):
    assert "no such file or folder" in error_of(tmp_path / "nope")


def test_bad_config_json(tmp_path):
    good(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{oops")
    message = error_of(tmp_path)
    assert "config.json" in message and "not valid JSON" in message


@pytest.mark.parametrize(
    "text, problem", [("{oops", "not valid JSON"), ('{"metadata": {}}', 'no "weight_map"'), ("[]", 'no "weight_map"')]
)
def test_index_not_json_or_no_weight_map(tmp_path, text, problem):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    message = error_of(tmp_path)
    assert "model.safetensors.index.json" in message and problem in message


def _edit_index(root: Path, edit) -> None:
    path = root / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_names_missing_shard(tmp_path):
    _sharded(tmp_path)
    _edit_index(tmp_path, lambda wm: wm.update({"model.layers.0.w": "model-00009-of-00009.safetensors"}))
    message = error_of(tmp_path)
    assert "index.json" in message and '"model.layers.0.w"' in message
    assert "model-00009-of-00009.safetensors" in message and "missing" in message


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_path_outside_folder(tmp_path, shard):
    root = tmp_path / "ck"
    _sharded(root)
    save_file({"x": torch.zeros(1)}, tmp_path / "outside.safetensors")
    _edit_index(root, lambda wm: wm.update({"model.layers.0.w": shard}))
    message = error_of(root)
    assert "index.json" in message and shard in message and "outside the checkpoint folder" in message


def test_index_symlink_escaping_folder(tmp_path):
    root = tmp_path / "ck"
    _sharded(root)
    outside = tmp_path / "elsewhere.safetensors"
    (root / "model-00001-of-00002.safetensors").rename(outside)
    (root / "model-00001-of-00002.safetensors").symlink_to(outside)
    message = error_of(root)
    assert "model-00001-of-00002.safetensors" in message and "symlink" in message and "outside" in message


def test_hub_cache_symlinks_into_blobs_are_allowed(tmp_path):
    # huggingface_hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    tensors = _sharded(snapshot)
    (repo / "blobs").mkdir()
    for path in list(snapshot.iterdir()):
        blob = repo / "blobs" / f"hash-{path.name}"
        path.rename(blob)
        path.symlink_to(os.path.relpath(blob, snapshot))
    with Checkpoint.open(snapshot) as ckpt:
        assert torch.equal(ckpt.read("model.layers.2.w"), tensors["model.layers.2.w"])


def test_index_key_missing_from_shard(tmp_path):
    _sharded(tmp_path)
    _edit_index(tmp_path, lambda wm: wm.update({"model.layers.99.w": "model-00001-of-00002.safetensors"}))
    message = error_of(tmp_path)
    assert "model-00001-of-00002.safetensors" in message and '"model.layers.99.w"' in message and "lacks it" in message


def test_shard_key_not_in_index(tmp_path):
    _sharded(tmp_path)
    _edit_index(tmp_path, lambda wm: wm.pop("model.layers.3.w"))
    message = error_of(tmp_path)
    assert "model-00002-of-00002.safetensors" in message and '"model.layers.3.w"' in message
    assert "index does not map it" in message


def test_same_key_in_two_shards(tmp_path):
    _sharded(tmp_path)
    save_file(
        {"model.layers.0.w": torch.zeros(2, 3), "model.layers.1.w": torch.ones(2, 3)},
        tmp_path / "model-00002-of-00002.safetensors",
    )
    _edit_index(tmp_path, lambda wm: wm.pop("model.layers.3.w"))
    message = error_of(tmp_path)
    assert '"model.layers.1.w"' in message or '"model.layers.0.w"' in message
    assert "also in" in message and "one shard" in message


def test_error_names_bad_shard_in_sharded_folder(tmp_path):
    _sharded(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    message = error_of(tmp_path)
    assert str(shard) in message and "truncated" in message
