"""Checksums of output files: the report, the --resume journal and `moeconv verify` use them.

Two algorithms: `xxh3-128` (the default) and `sha256` (on request, e.g. to compare with the hub's
LFS oid). Hex digests; a hasher has hashlib's `update()` / `hexdigest()` interface.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import xxhash

# xxh3 by default: sha256 runs slower than the disk on CPUs without SHA extensions, and this is an integrity check against accidental change, not a signature.
DEFAULT = "xxh3-128"
ALGORITHMS = {"xxh3-128": xxhash.xxh3_128, "sha256": hashlib.sha256}  # name -> hasher constructor
READ_BYTES = 16 * 2**20


def new_hasher(algorithm: str = DEFAULT):
    """An empty incremental hasher for `algorithm` (a name in ALGORITHMS); ValueError otherwise."""
    try:
        return ALGORITHMS[algorithm]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown checksum algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}") from None


def file_checksum(path: str | Path, algorithm: str = DEFAULT, progress: Callable[[int], None] | None = None) -> str:
    """Hex digest of the file at `path` with `algorithm`, read in 16 MiB blocks (`progress(bytes)` after each)."""
    digest = new_hasher(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(READ_BYTES):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()
