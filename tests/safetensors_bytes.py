"""Build raw safetensors bytes by hand, so tests can forge files that lie about themselves.

    header, data = entries({"a": ("F32", [2], b"\\0" * 8)})      # a valid header + buffer
    header["a"]["shape"] = [3]                                   # ... then break one claim
    write(tmp_path / "bad.safetensors", header, data)

Nothing here validates anything: that is the point.
"""

import json
import struct
from pathlib import Path

import torch

from moeconv.dtypes import to_safetensors


def build(header: dict | str | bytes, data: bytes = b"", *, header_len: int | None = None, pad: int = 0) -> bytes:
    """8-byte little-endian length + header + data. `header` may be a dict (dumped compactly),
    a str or raw bytes; `header_len` overrides the stored length (to lie); `pad` appends spaces."""
    if isinstance(header, dict):
        raw = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = bytes(header)
    raw += b" " * pad
    length = len(raw) if header_len is None else header_len
    return struct.pack("<Q", length) + raw + data


def entries(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None) -> tuple[dict, bytes]:
    """A consistent header dict and data buffer for (dtype, shape, raw bytes) per key, in order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data, position = b"", 0
    for key, (dtype, shape, raw) in tensors.items():
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + len(raw)]}
        data += raw
        position += len(raw)
    return header, data


def from_tensors(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> tuple[dict, bytes]:
    """entries() for real tensors (their raw bytes, any dtype)."""
    return entries(
        {
            key: (to_safetensors(t.dtype), list(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            for key, t in tensors.items()
        },
        metadata,
    )


def write(path: Path, header: dict | str | bytes, data: bytes = b"", **kwargs) -> Path:
    """build() into a file; returns the path."""
    path = Path(path)
    path.write_bytes(build(header, data, **kwargs))
    return path
