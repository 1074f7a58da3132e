"""Verify a converted folder: every file against moeconv-report.json, and optionally every tensor
against the source it was made from.

Without a source (`verify(out)`):
  - every file the report's `checksums` lists exists and has that checksum, with the algorithm the
    report names (xxh3-128 or sha256, see moeconv.checksum);
  - every shard's header passes the reader's validation (moeconv.source.read_header), and every
    tensor has the dtype, shape and absolute offset the report says, no more and no fewer keys;
  - every tensor the report does not list as misaligned starts at a multiple of the report's align.
With `against` (a source folder, file or hub repo id): the plan is rebuilt from the report's
`rebuild` section (recipe TOML texts and options, not files that may have changed since) and must
agree with the report tensor for tensor; then every output tensor is recomputed from the source, or
`sample` rows of its first axis (evenly spaced, first and last included: deterministic), and compared
bit for bit with the bytes in the shard. Value checking stops at the first differing tensor.

Problems are collected as one-line messages naming the file or key; the CLI prints them.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moeconv.checksum import ALGORITHMS, file_checksum
from moeconv.dtypes import USER_DTYPES
from moeconv.errors import CheckpointError, RecipeError, VerifyError
from moeconv.format import MAX_ALIGN
from moeconv.output import REPORT_NAME
from moeconv.source import allowed_target, read_header
from moeconv.stream import CHUNK_BYTES, Chunk, as_bytes, chunks, produce


@dataclass
class VerifyResult:
    out: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0  # files whose checksum was checked
    algorithm: str = ""  # of the report's checksums
    tensors: int = 0  # tensors whose header entry was checked
    compared: int = 0  # tensors whose values were compared with the source
    rows: int = 0  # rows of axis 0 compared

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "out": str(self.out),
            "problems": self.problems,
            "files": self.files,
            "algorithm": self.algorithm,
            "tensors": self.tensors,
            "compared": self.compared,
            "rows": self.rows,
        }

    def summary(self) -> str:
        """One line: the first few problems, or what was checked."""
        if self.problems:
            shown = "; ".join(self.problems[:3])
            more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
            return f"{self.out}: {len(self.problems)} problem(s): {shown}{more}"
        values = f", {self.compared} tensors ({self.rows} rows) equal to the source" if self.compared else ""
        return f"{self.out}: ok: {self.files} files match their {self.algorithm} checksum, {self.tensors} tensors match the report{values}"


def _load_report(out: Path) -> dict:
    path = out / REPORT_NAME
    if not out.is_dir():
        raise VerifyError(f"{out}: no such folder")
    if not path.is_file():
        raise VerifyError(f"{path}: missing; not a finished moeconv output (an interrupted run leaves none)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise VerifyError(f"{path}: not a readable JSON report ({error})") from None
    except RecursionError:
        raise VerifyError(f"{path}: not a moeconv report (JSON nested too deeply)") from None
    if not (
        isinstance(report, dict)
        and isinstance(report.get("checksums"), dict)
        and isinstance(report["checksums"].get("files"), dict)
        and isinstance(report.get("shards"), list)
        and isinstance(report.get("tensors"), list)
    ):
        if isinstance(report, dict) and "checksums" not in report and "sha256" in report:
            raise VerifyError(f"{path}: written by an older moeconv ('sha256', no 'checksums'); convert again to verify it")
        raise VerifyError(f"{path}: not a moeconv report (needs 'checksums' with 'files', 'shards' and 'tensors')")
    algorithm = report["checksums"].get("algorithm")
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise VerifyError(
            f"{path}: unknown checksum algorithm {json.dumps(algorithm)} (this moeconv knows {', '.join(ALGORITHMS)})"
        )
    _check_schema(path, report)
    return report


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain_name(value: object) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and "\x00" not in value and Path(value).name == value


def _need(path: Path, ok: bool, field_name: str, what: str) -> None:
    if not ok:
        raise VerifyError(f"{path}: {field_name} must be {what}; this is not the report moeconv wrote (edited since?)")


def _shard_entry(shard: object) -> bool:
    """{"name": file name, "size": bytes, "misaligned": [keys]}, as Plan.shards_json writes it."""
    if not (isinstance(shard, dict) and _plain_name(shard.get("name")) and _count(shard.get("size"))):
        return False
    misaligned = shard.get("misaligned", [])
    return isinstance(misaligned, list) and all(isinstance(key, str) for key in misaligned)


def _tensor_entry(entry: object) -> bool:
    """{"key", "shard", "dtype": str, "shape": [sizes], "offset": bytes}, as PlannedTensor.to_json writes it."""
    if not (isinstance(entry, dict) and all(isinstance(entry.get(f), str) for f in ("key", "shard", "dtype"))):
        return False
    shape = entry.get("shape")
    return _count(entry.get("offset")) and isinstance(shape, list) and all(_count(d) for d in shape)


def _check_schema(path: Path, report: dict) -> None:
    """Every field verify reads, checked before it is used: a report edited by hand is one line
    naming the field, never a traceback."""
    align = report.get("align", 1)
    _need(path, _count(align) and align >= 1 and not align & (align - 1), "'align'", "a power of two")
    for name, digest in report["checksums"]["files"].items():
        ok = _plain_name(name) and isinstance(digest, str)
        _need(path, ok, f"checksums.files[{json.dumps(name)}]", "a file name with a hex digest")
    for i, shard in enumerate(report["shards"]):
        _need(path, _shard_entry(shard), f"shards[{i}]", "an object with a file 'name', a 'size' and the 'misaligned' keys")
    for i, entry in enumerate(report["tensors"]):
        _need(path, _tensor_entry(entry), f"tensors[{i}]", "an object with 'key', 'shard', 'dtype', 'shape' and 'offset'")


def _check_rebuild(path: Path, rebuild: object) -> None:
    """The report's `rebuild` section, before --against re-plans from it."""
    if not isinstance(rebuild, dict) or not isinstance(rebuild.get("recipes"), list):
        raise VerifyError(
            f"{path}: no 'rebuild' section (recipes and options); --against needs a report from this moeconv version"
        )
    for i, recipe in enumerate(rebuild["recipes"]):
        ok = isinstance(recipe, dict) and isinstance(recipe.get("origin"), str) and isinstance(recipe.get("text"), str)
        _need(path, ok, f"rebuild.recipes[{i}]", "an object with the recipe's 'origin' and TOML 'text'")
    dtype = rebuild.get("dtype")
    _need(path, dtype is None or dtype in USER_DTYPES, "rebuild.dtype", f"null or one of {', '.join(USER_DTYPES)}")
    align = rebuild.get("align")
    ok = _count(align) and 8 <= align <= MAX_ALIGN and not align & (align - 1)
    _need(path, ok, "rebuild.align", f"a power of two from 8 to {MAX_ALIGN}")
    size = rebuild.get("max_shard_size")
    _need(path, _count(size) and 1 <= size <= 2**50, "rebuild.max_shard_size", "from 1 byte to 1 PiB")


def _check_hashes(out: Path, report: dict, result: VerifyResult, progress=None) -> set[str]:
    """Checksum of every file the report lists; the names of the files that are missing."""
    algorithm = result.algorithm = report["checksums"]["algorithm"]
    missing = set()
    if progress:
        sizes = {n: (out / n).stat().st_size for n in report["checksums"]["files"] if Path(n).name == n and (out / n).is_file()}
        progress.phase(f"checking {algorithm}", sum(sizes.values()), sizes)
    for name, digest in report["checksums"]["files"].items():
        path = out / name
        if not path.is_file():
            result.problems.append(f"{path}: missing (the report lists it)")
            missing.add(name)
            continue
        if not allowed_target(path, out):  # never read through a link out of the folder (/proc/kcore: no end)
            result.problems.append(f"{path}: a symlink to {path.resolve()}, outside the folder; moeconv writes none")
            missing.add(name)
            continue
        got = file_checksum(path, algorithm, progress and (lambda n, name=name: progress.advance(n, name)))
        result.files += 1
        if got != digest:
            result.problems.append(
                f"{path}: {algorithm} {got[:16]}... differs from the report's {str(digest)[:16]}...; the file changed after conversion"
            )
    return missing


def _check_layout(out: Path, report: dict, result: VerifyResult, missing: set[str]) -> None:
    """Every shard's header vs the reader's rules and the report's tensors, offsets and alignment."""
    align = report.get("align", 1)
    by_shard: dict[str, dict[str, dict]] = {}
    for entry in report["tensors"]:
        by_shard.setdefault(entry.get("shard"), {})[entry.get("key")] = entry
    for shard in report["shards"]:
        name = shard["name"]
        if name in missing:
            continue
        path = out / name
        if not path.is_file():
            result.problems.append(f"{path}: missing (the report lists it)")
            continue
        try:
            tensors, _, _ = read_header(path)
        except CheckpointError as error:
            result.problems.append(str(error))
            continue
        if path.stat().st_size != shard.get("size"):
            result.problems.append(f"{path}: {path.stat().st_size} bytes, the report says {shard.get('size')}")
        expected = by_shard.get(name, {})
        for key in sorted(expected.keys() - tensors.keys()):
            result.problems.append(f"{path}: tensor '{key}' is missing (the report puts it here)")
        for key in sorted(tensors.keys() - expected.keys()):
            result.problems.append(f"{path}: tensor '{key}' is not in the report")
        misaligned = set(shard.get("misaligned", ()))
        for key, info in tensors.items():
            want = expected.get(key)
            if want is None:
                continue
            result.tensors += 1
            got = {"dtype": info.dtype, "shape": list(info.shape), "offset": info.begin}
            for what in ("dtype", "shape", "offset"):
                if got[what] != want.get(what):
                    result.problems.append(f"{path}: tensor '{key}': {what} {got[what]}, the report says {want.get(what)}")
            if key not in misaligned and info.begin % align:
                result.problems.append(
                    f"{path}: tensor '{key}' starts at byte {info.begin}, not {align}-byte aligned as the report says"
                )


def _rebuild_plan(path: Path, report: dict, against: str):
    from moeconv.dtypes import parse_user_dtype
    from moeconv.hub import fetch_inputs, open_source
    from moeconv.plan import build_plan
    from moeconv.recipe import parse_recipe

    rebuild = report.get("rebuild")
    _check_rebuild(path, rebuild)
    try:
        recipes = [parse_recipe(r["text"], r["origin"]) for r in rebuild["recipes"]]
    except RecipeError as error:
        raise VerifyError(f"{path}: rebuild recipe {error}") from None
    dtype = parse_user_dtype(rebuild["dtype"]) if rebuild.get("dtype") else None
    source = open_source(against)
    plan = build_plan(source, recipes, dtype=dtype, align=rebuild["align"], max_shard_size=rebuild["max_shard_size"])
    fetch_inputs(plan)
    return plan


def _check_plan(plan, report: dict, result: VerifyResult) -> bool:
    """The rebuilt plan must describe the same tensors at the same places as the report."""
    reported = {entry.get("key"): entry for entry in report["tensors"]}
    before = len(result.problems)
    for key in sorted(reported.keys() - plan.tensors.keys()):
        result.problems.append(f"tensor '{key}': in the report, but the source and recipes do not produce it")
    for key in sorted(plan.tensors.keys() - reported.keys()):
        result.problems.append(f"tensor '{key}': the source and recipes produce it, but the report lacks it")
    for key, tensor in plan.tensors.items():
        want = reported.get(key)
        if want is None:
            continue
        planned = {"dtype": tensor.dtype, "shape": list(tensor.shape), "shard": tensor.shard, "offset": tensor.offset}
        for what, value in planned.items():
            if value != want.get(what):
                result.problems.append(
                    f"tensor '{key}': the source and recipes give {what} {value}, the report says {want.get(what)}"
                )
                break
    return len(result.problems) == before


def sample_rows(length: int, count: int) -> list[int]:
    """`count` row indices of 0..length-1, evenly spaced with the first and last included."""
    if count >= length:
        return list(range(length))
    if count <= 1:
        return [0]
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


def _compared_bytes(plan, skip: set[str], sample: int | None) -> int:
    """How many bytes _check_values compares (for progress)."""
    total = 0
    for tensor in plan.tensors.values():
        if tensor.shard in skip:
            continue
        if sample is not None and tensor.nbytes:  # rows of a zero-byte tensor are not bounded by bytes
            total += tensor.nbytes // tensor.shape[0] * len(sample_rows(tensor.shape[0], sample))
        else:
            total += tensor.nbytes
    return total


def _check_values(
    out: Path, plan, result: VerifyResult, skip: set[str], sample: int | None, chunk_bytes: int, progress=None
) -> None:
    """Recompute every output tensor (or sampled rows) and compare bytes; stop at the first difference."""
    if progress:
        progress.phase("comparing with the source", _compared_bytes(plan, skip, sample))
    handles: dict[str, int] = {}
    try:
        for key, tensor in plan.tensors.items():
            if tensor.shard in skip:
                continue
            if tensor.shard not in handles:
                handles[tensor.shard] = os.open(out / tensor.shard, os.O_RDONLY)
            fd = handles[tensor.shard]
            if not tensor.shape or not tensor.nbytes:  # a zero-byte tensor may claim 2**62 rows: one empty read
                ranges = [None]
            elif sample is not None:
                ranges = [Chunk(r, r + 1) for r in sample_rows(tensor.shape[0], sample)]
            else:
                ranges = list(chunks(tensor, chunk_bytes))
            row_bytes = tensor.nbytes // tensor.shape[0] if tensor.shape and tensor.shape[0] else 0
            for rows in ranges:
                expected = as_bytes(produce(tensor, rows))
                start = tensor.offset + (rows.byte_offset(tensor.shape, tensor.nbytes) if rows else 0)
                actual = os.pread(fd, len(expected), start)
                if actual != expected:
                    at = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
                    row = (start - tensor.offset + at) // row_bytes if row_bytes else 0
                    result.problems.append(
                        f"{out / tensor.shard}: tensor '{key}' differs from what the source and recipes give"
                        f" (row {row} of axis 0, file byte {start + at})"
                    )
                    tensor.node.release()
                    return
                if progress:
                    progress.advance(len(expected))
                if rows is None or rows.inner is None or rows.inner[1] == tensor.shape[1]:  # a row is done
                    result.rows += (rows.stop - rows.start) if rows else 1
            tensor.node.release()
            result.compared += 1
    finally:
        for fd in handles.values():
            os.close(fd)


def verify(
    out: str | Path, against: str | None = None, sample: int | None = None, chunk_bytes: int = CHUNK_BYTES, progress=None
) -> VerifyResult:
    """Check `out` against its report (and against the source `against`); see the module doc.
    `progress`: an object with `phase(label, total_bytes, parts=None)` and `advance(nbytes, part=None)`
    (moeconv.render.Meter), told about the bytes hashed and compared."""
    if sample is not None and sample < 1:
        raise VerifyError(f"--sample must be at least 1, got {sample}")
    out = Path(out)
    report = _load_report(out)
    result = VerifyResult(out)
    missing = _check_hashes(out, report, result, progress)
    _check_layout(out, report, result, missing)
    if against is not None:
        plan = _rebuild_plan(out / REPORT_NAME, report, against)
        if _check_plan(plan, report, result):
            skip = {name for name in {t.shard for t in plan.tensors.values()} if not (out / name).is_file()}
            _check_values(out, plan, result, skip, sample, chunk_bytes, progress)
        plan.source.close()
    return result
