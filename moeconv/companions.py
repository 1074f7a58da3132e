"""What travels with the shards: the rewritten config.json and the small files a loader needs."""

import copy
import fnmatch
from collections.abc import Iterable
from pathlib import Path

from moeconv import dtypes
from moeconv.errors import WriteError
from moeconv.formats import output_quantization
from moeconv.source import allowed_target

# Root-level files copied next to the output shards, by name only (a folder may hold anything else:
# credentials, notes): generation and tokenizer configs, vocabularies, chat templates, licenses.
KNOWN_FILES = {
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE", "USAGE_POLICY",
}  # fmt: skip
KNOWN_PATTERNS = ("*.tiktoken",)
MAX_COMPANION_BYTES = 64 * 2**20


def is_companion(name: str) -> bool:
    return name in KNOWN_FILES or any(fnmatch.fnmatch(name, p) for p in KNOWN_PATTERNS)


def companion_files(root: Path, listing: dict[str, int | None] | None = None) -> list[str]:
    """Names of the small root-level files to copy: known names only, regular files whose data is
    inside the source folder (a link out of it is never followed; never from subfolders such as
    original/). `listing` (root-level name -> size) stands in for the folder when the source is remote."""
    if listing is None:
        listing = {
            path.name: path.stat().st_size
            for path in root.iterdir()
            if is_companion(path.name) and path.is_file() and allowed_target(path, root)
        }
    return [name for name, size in sorted(listing.items()) if is_companion(name) and (size or 0) <= MAX_COMPANION_BYTES]


def read_companion(root: Path, name: str) -> bytes:
    """The bytes of a companion file chosen at plan time, checked again as it is read: still a
    regular file inside the source folder, still at most MAX_COMPANION_BYTES (a file swapped or
    grown since is refused, not copied)."""
    path = root / name
    if not (path.is_file() and allowed_target(path, root)):
        raise WriteError(f"{path}: no longer a regular file inside the source folder; refusing to copy it")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_COMPANION_BYTES + 1)
    except OSError as error:
        raise WriteError(f"{path}: cannot read it: {error.strerror or error}") from None
    if len(data) > MAX_COMPANION_BYTES:
        raise WriteError(f"{path}: grew past {MAX_COMPANION_BYTES} bytes since it was planned; refusing to copy it")
    return data


def output_config(config: dict | None, tensors: Iterable, dtype: str | None) -> dict | None:
    """config.json for the output: quantization_config dropped once no output tensor carries its
    format (moeconv.formats), and the dtype field set to what was written (`dtype`: --dtype as a
    safetensors name; bf16 after a dequantization without --dtype)."""
    if config is None:
        return None
    out = copy.deepcopy(config)
    quantization = output_quantization(out, [(t.key, t.dtype) for t in tensors])
    dequantized = quantization is None and "quantization_config" in out
    if dequantized:
        del out["quantization_config"]
    elif quantization is not None:
        out["quantization_config"] = quantization
    if dtype is not None or dequantized:
        written = dtypes.CONFIG_NAMES[dtype or "BF16"]
        out["dtype"] = written
        if "torch_dtype" in out:
            out["torch_dtype"] = written
    return out
