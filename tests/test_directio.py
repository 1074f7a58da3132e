"""Direct I/O: the bytes are the same whether the disk moves them straight to our buffers (O_DIRECT)
or the page cache does (a filesystem that refuses O_DIRECT), for reads and writes at any offset."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors_bytes import entries, write

from moeconv import directio
from moeconv.errors import CheckpointError
from moeconv.source import Checkpoint


@pytest.fixture
def mode(request, monkeypatch):
    """direct=False: behave as on a filesystem without O_DIRECT (tmpfs, macOS)."""
    if not request.param:
        monkeypatch.setattr(directio, "O_DIRECT", 0)
    return request.param


def _appended(path, pieces, tensors: bool) -> bytes:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        sink = directio.Appender(fd)
        for piece in pieces:
            if tensors:
                flat = torch.frombuffer(bytearray(piece), dtype=torch.uint8) if piece else torch.empty(0, dtype=torch.uint8)
                sink.append(memoryview(piece), flat)
            else:
                sink.append(memoryview(piece))
        sink.finish()
        assert sink.size == sum(len(p) for p in pieces)
    finally:
        os.close(fd)
    return path.read_bytes()


@pytest.mark.parametrize("mode", [True, False], indirect=True, ids=["o_direct", "refused"])
@pytest.mark.parametrize("tensors", [True, False], ids=["torch-copy", "bytes"])
def test_appender_writes_exactly_the_bytes_across_stage_boundaries(tmp_path, monkeypatch, mode, tensors):
    monkeypatch.setattr(directio, "STAGE_BYTES", 3 * directio.ALIGN)
    monkeypatch.setattr(directio, "COPY_WITH_TORCH", 1)
    generator = torch.Generator().manual_seed(0)
    sizes = [0, 1, 7, 4096, 12288, 12289, 5000, 3 * 4096 - 1, 100_003, 2]
    pieces = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator).numpy().tobytes() for n in sizes]
    assert _appended(tmp_path / "out.bin", pieces, tensors) == b"".join(pieces)  # no padding left, nothing lost


@pytest.mark.parametrize("mode", [True, False], indirect=True, ids=["o_direct", "refused"])
def test_appender_of_whole_blocks_and_of_nothing(tmp_path, mode):
    block = bytes(range(256)) * 16 * 8  # 32 KiB: the end falls on a block boundary, no tail to trim
    assert _appended(tmp_path / "a.bin", [block, block], tensors=False) == block * 2
    assert _appended(tmp_path / "b.bin", [], tensors=False) == b""


@pytest.mark.parametrize("mode", [True, False], indirect=True, ids=["o_direct", "refused"])
def test_big_reads_at_every_kind_of_offset_equal_safetensors(tmp_path, monkeypatch, mode):
    """Reads big enough to go direct, from tensors that start mid-block and one that ends the file
    mid-block (the direct read comes back short at the end of the file)."""
    monkeypatch.setattr(directio, "DIRECT_BYTES", 1)
    generator = torch.Generator().manual_seed(1)
    tensors = {
        "a.small": torch.randint(0, 256, (3,), dtype=torch.uint8, generator=generator),
        "b.bf16": torch.randn(1000, 37, generator=generator).to(torch.bfloat16),  # starts at an odd block offset
        "c.f32": torch.randn(513, 9, generator=generator),
        "d.last": torch.randn(777, generator=generator).to(torch.float16),  # ends the file mid-block
    }
    save_file(tensors, tmp_path / "model.safetensors")
    expected = load_file(tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as checkpoint:
        for key, tensor in expected.items():
            assert torch.equal(checkpoint.read(key), tensor), key
            rows = tensor.shape[0]
            assert torch.equal(checkpoint.read(key, rows // 3, rows - 1), tensor[rows // 3 : rows - 1]), key
        b = expected["b.bf16"]
        assert torch.equal(checkpoint.read("b.bf16", 5, 6), b[5:6])  # 74 bytes in the middle of a block


def test_a_tensor_at_an_odd_byte_offset_is_read_right(tmp_path, monkeypatch):
    """A (legal but odd) F32 tensor starting at an odd offset cannot be viewed in place: it is copied."""
    monkeypatch.setattr(directio, "DIRECT_BYTES", 1)
    values = torch.arange(5000, dtype=torch.float32)
    header, data = entries({"pad": ("U8", [3], b"abc"), "odd": ("F32", [5000], values.numpy().tobytes())})
    write(tmp_path / "model.safetensors", header, data, pad=1)
    with Checkpoint.open(tmp_path) as checkpoint:
        assert checkpoint.tensors["odd"].begin % 4 != 0
        assert torch.equal(checkpoint.read("odd"), values)


@pytest.mark.parametrize("mode", [True, False], indirect=True, ids=["o_direct", "refused"])
def test_a_truncated_file_is_an_error_on_the_direct_path_too(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(directio, "DIRECT_BYTES", 1)
    save_file({"s": torch.ones(1), "w": torch.ones(3000, 10)}, tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as checkpoint:
        checkpoint.read("s")  # opened (and checked by safetensors) before the file shrinks under us
        path = tmp_path / "model.safetensors"
        os.truncate(path, path.stat().st_size - 5000)
        with pytest.raises(CheckpointError, match="ends beyond the end of the file"):
            checkpoint.read("w")


def test_a_conversion_writes_the_same_bytes_with_and_without_o_direct(gpt_oss_mxfp4_dir, tmp_path, monkeypatch):
    """Every read big or small, every shard through the staging buffer: the files equal those
    written where O_DIRECT is refused (the page cache does it all)."""
    from moeconv.execute import execute
    from moeconv.plan import build_plan
    from moeconv.recipe import load_preset

    monkeypatch.setattr(directio, "DIRECT_BYTES", 1)
    monkeypatch.setattr(directio, "STAGE_BYTES", 2 * directio.ALIGN)
    for name, o_direct in (("direct", directio.O_DIRECT), ("buffered", 0)):
        monkeypatch.setattr(directio, "O_DIRECT", o_direct)
        plan = build_plan(Checkpoint.open(gpt_oss_mxfp4_dir), [load_preset("gpt-oss-bf16")])
        execute(plan, tmp_path / name, chunk_bytes=5000)
    names = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "buffered").iterdir()) and any(n.endswith(".safetensors") for n in names)
    for name in names:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes(), name
