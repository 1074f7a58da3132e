"""What travels with the shards: the rewritten config.json and the small files a loader needs."""

import copy
import fnmatch
from collections.abc import Iterable
from pathlib import Path

from moeconv import dtypes
from moeconv.formats import output_quantization

# Root-level files copied next to the output shards: configs, tokenizer and chat template files.
COMPANION_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "LICENSE*", "USAGE_POLICY*")
# Never copied: weight indexes (we write our own), our own report, anything larger than this.
SKIPPED = {"config.json", "model.safetensors.index.json", "moeconv-report.json"}
MAX_COMPANION_BYTES = 64 * 2**20


def companion_files(root: Path, listing: dict[str, int | None] | None = None) -> list[str]:
    """Names of the small root-level files to copy (never from subfolders such as original/).

    `listing` (root-level name -> size) stands in for the folder when the source is remote."""
    if listing is None:
        listing = {path.name: path.stat().st_size for path in root.iterdir() if path.is_file()}
    names = []
    for name, size in sorted(listing.items()):
        if "/" in name or name in SKIPPED or name.endswith(".index.json"):
            continue
        if any(fnmatch.fnmatch(name, p) for p in COMPANION_PATTERNS) and (size or 0) <= MAX_COMPANION_BYTES:
            names.append(name)
    return names


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
    if dtype is not None or dequantized:
        written = dtypes.CONFIG_NAMES[dtype or "BF16"]
        out["dtype"] = written
        if "torch_dtype" in out:
            out["torch_dtype"] = written
    return out
