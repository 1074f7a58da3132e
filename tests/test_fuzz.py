"""Property tests for the header parser and writer, and a deterministic fuzz run over mutated headers.

- Any header the writer produces, the reader reads back identically (keys, dtypes, shapes, offsets,
  metadata, bytes), and safetensors itself agrees.
- Flipping, inserting or deleting bytes in a valid file's length field or header gives either a
  successful parse or a CheckpointError: never another exception type, never a hang, never a large
  allocation (tracemalloc peak per case), and whatever the reader accepts safetensors opens too.
"""

import random
import time
import tracemalloc

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from moeconv import dtypes
from moeconv.errors import CheckpointError
from moeconv.format import TensorSpec, layout_shard
from moeconv.source import Checkpoint, read_header
from moeconv.writer import ShardWriter

DTYPES = sorted(dtypes.ITEMSIZE)
keys = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(
    lambda k: k != "__metadata__"
)
specs = st.dictionaries(
    keys,
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)),
    max_size=8,
)
metadata = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "format"), st.text(max_size=8), max_size=3)


def write_shard(path, tensors: dict[str, tuple[str, list[int]]], meta: dict, align: int, seed: int, chunk: int = 7):
    """layout_shard + ShardWriter with random bytes, written in `chunk`-byte pieces; (layout, bytes per key)."""
    layout = layout_shard(path.name, [TensorSpec(k, d, tuple(s)) for k, (d, s) in tensors.items()], align, meta)
    rng = random.Random(seed)
    payload = {spec.key: bytes(rng.randrange(256) for _ in range(spec.nbytes)) for spec in layout.order}
    with ShardWriter(path.parent, layout) as writer:
        for spec in layout.order:
            data = payload[spec.key]
            for start in range(0, len(data), chunk):
                writer.write(spec.key, data[start : start + chunk])
        writer.finish()
    return layout, payload


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=specs, meta=metadata, align=st.sampled_from([8, 16, 64]), seed=st.integers(0, 2**16))
@example(tensors={"\u00b9": ("BF16", [])}, meta={}, align=8, seed=0)  # str.isdigit() but not int()-able
@example(tensors={"a.\u0663": ("F32", [1]), "a.10": ("U8", [3]), "a.2": ("U8", [])}, meta={}, align=16, seed=1)
def test_what_the_writer_writes_the_reader_reads_back(tmp_path, tensors, meta, align, seed):
    path = tmp_path / "model.safetensors"
    layout, payload = write_shard(path, tensors, meta, align, seed)
    read, read_meta, data_start = read_header(path)
    raw = path.read_bytes()
    assert read_meta == {**meta, "format": "pt"}
    assert data_start == layout.data_start and data_start % align == 0
    assert set(read) == set(tensors)
    for key, (dtype, shape) in tensors.items():
        info = read[key]
        assert (info.dtype, list(info.shape), info.begin) == (dtype, shape, layout.offsets[key])
        assert raw[info.begin : info.end] == payload[key]
    with safe_open(str(path), "pt") as handle:  # the reference reader agrees
        assert set(handle.keys()) == set(tensors)
        assert handle.metadata() == {**meta, "format": "pt"}
    path.unlink()


TORCH_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.int8,
    torch.bool,
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=st.lists(st.tuples(st.sampled_from(TORCH_DTYPES), st.lists(st.integers(1, 6), min_size=1, max_size=3)), max_size=6),
    align=st.sampled_from([16, 64]),
    rows=st.integers(1, 4),
)
def test_writer_round_trip_with_row_chunks(tmp_path, shapes, align, rows):
    generator = torch.Generator().manual_seed(len(shapes) * 31 + rows)
    tensors = {}
    for i, (dtype, shape) in enumerate(shapes):
        raw = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8, generator=generator)
        tensors[f"t.{i}"] = raw.view(dtype).reshape(shape) if dtype != torch.bool else (raw % 2).bool().reshape(shape)
    layout = layout_shard(
        "model.safetensors", [TensorSpec(k, dtypes.to_safetensors(t.dtype), tuple(t.shape)) for k, t in tensors.items()], align
    )
    with ShardWriter(tmp_path, layout) as writer:
        for spec in layout.order:
            tensor = tensors[spec.key]
            for start in range(0, tensor.shape[0], rows):
                writer.write(spec.key, tensor[start : start + rows])
        writer.finish()
    back = load_file(str(tmp_path / "model.safetensors"))
    assert set(back) == set(tensors)
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key].view(torch.uint8), tensor.view(torch.uint8)), key
    import xxhash

    assert writer.checksum == xxhash.xxh3_128((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    (tmp_path / "model.safetensors").unlink()


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """Flip, insert or delete a few bytes within the length field and the header."""
    data = bytearray(raw)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        where = rng.randrange(0, min(header_end, len(data)))
        action = rng.choice(["flip", "flip", "set", "insert", "delete"])
        if action == "flip":
            data[where] ^= 1 << rng.randrange(8)
        elif action == "set":
            data[where] = rng.choice([0, 0xFF, ord("{"), ord("}"), ord('"'), ord(","), ord("9"), ord("-"), ord(" ")])
        elif action == "insert":
            data.insert(where, rng.randrange(256))
        else:
            del data[where]
    return bytes(data)


def test_mutated_headers_only_ever_give_checkpoint_error(tmp_path):
    source = tmp_path / "valid.safetensors"
    write_shard(
        source,
        {"model.a.weight": ("BF16", [3, 4]), "model.b": ("U8", [5]), "model.c.bias": ("F32", [2]), "s": ("I64", [])},
        {"note": "x"},
        16,
        seed=7,
    )
    valid = source.read_bytes()
    rng = random.Random(20240607)
    outcomes = {"ok": 0, "CheckpointError": 0}
    path = tmp_path / "model.safetensors"
    for case in range(400):
        raw = mutate(valid, rng)
        path.write_bytes(raw)
        tracemalloc.start()
        started = time.perf_counter()
        try:
            tensors, _, _ = read_header(path)
            Checkpoint.open(path).close()
        except CheckpointError as error:
            assert "\n" not in str(error) and str(path) in str(error), (case, str(error))
            outcomes["CheckpointError"] += 1
        else:
            outcomes["ok"] += 1
            with safe_open(str(path), "pt") as handle:  # never more lenient than the reference parser
                assert set(handle.keys()) == set(tensors), case
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert time.perf_counter() - started < 2, case
        assert peak < 4 * 2**20, (case, peak)
    assert outcomes["CheckpointError"] > 300 and outcomes["ok"] > 0, outcomes  # both outcomes really occur
