"""Load reports recalled from earlier runs, when nothing they depend on has changed.

Computing a load report means importing torch and transformers' modeling code: 5-7 s of CPU on
these 2-core machines, which a conversion's own threads then lack, and the whole wait of a dry run
(a dry run of a 2-layer gpt-oss-20b checkpoint: 4.0-4.3 s computed, 1.5 s recalled;
benchmarks/RESULTS.md). The
report is a pure function of the question (planned keys, dtypes and shapes; the output's
config.json) and of the code that answers it. So the first run keeps the answer, in the user's
cache folder, with a fingerprint of that code, and a later run with the same question recalls it
if the fingerprint still holds, without finishing (report child) or starting (dry run) the import
of transformers. The fingerprint is:

- size and mtime of every file the answering process had loaded (its modules' sources and
  bytecode, its shared libraries: transformers', torch's, moeconv's own report code...);
- where each of its top-level modules would be imported from now (`importlib.util.find_spec`): a
  changed sys.path, a package shadowing another, an uninstalled one;
- the interpreter (path and version).

Only checked reports are kept (one that says "transformers is not installed" must not outlive an
install). Entries are JSON, checked field by field when read: a damaged or edited entry is a miss,
never an error, and cannot run code. MOECONV_REPORT_CACHE=0 turns this off (nothing read or
written). This module imports neither torch nor transformers: the report child looks an answer up
without waiting for its own import of them.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

KEEP_ENTRIES = 64  # most recent entries kept (each ~90 KB: ~6,000 file stats, compressed)
_FORMAT = 1
_MAX_ENTRY_BYTES = 64 * 2**20


def user_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """moeconv's folder in the user's cache: under XDG_CACHE_HOME, else ~/.cache."""
    return Path(environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")) / "moeconv"


def cache_folder(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Where entries live (see user_cache) for a process with this environment, or None when turned off."""
    if environ.get("MOECONV_REPORT_CACHE") == "0":
        return None
    return user_cache(environ) / "load-reports"


def _entry_path(folder: Path, planned: dict, config: dict | None) -> Path:
    question = [sys.executable, sys.version, _FORMAT, sorted((k, d, list(s)) for k, (d, s) in planned.items()), config]
    digest = hashlib.sha256(json.dumps(question, sort_keys=True, default=str).encode()).hexdigest()
    return folder / f"{digest[:32]}.json.gz"


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _origin(name: str) -> list | None:
    """Where top-level module `name` is (or would be) imported from: [origin, search locations]."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):  # ValueError: a module whose __spec__ is None
        return None
    if spec is None or spec.name != name:  # e.g. a compiled submodule that also registers a bare name
        return None
    if not spec.has_location and not spec.submodule_search_locations:  # built in, or made from a string
        return None
    return [spec.origin, [str(location) for location in spec.submodule_search_locations or []]]


def current_modules() -> dict[str, list]:
    """This process's top-level modules and where they come from."""
    names = {name.partition(".")[0] for name, module in list(sys.modules.items()) if module is not None}
    found = {name: _origin(name) for name in sorted(names) if not name.startswith("__")}
    return {name: origin for name, origin in found.items() if origin is not None}


def lookup(planned: dict, config: dict | None) -> dict | None:
    """The report (LoadReport.to_json() form) an earlier run kept for this question, if its fingerprint
    still holds; else None."""
    folder = cache_folder()
    return None if folder is None else _read_if_holds(_entry_path(folder, planned, config))


def _read_if_holds(entry_path: Path) -> dict | None:
    try:
        with gzip.open(entry_path, "rb") as file:
            data = file.read(_MAX_ENTRY_BYTES + 1)  # an entry is ~1 MB unpacked; a planted gzip bomb is not read whole
        if len(data) > _MAX_ENTRY_BYTES:
            return None
        entry = json.loads(data)
        files, modules, report = entry["files"], entry["modules"], entry["report"]
        if entry["format"] != _FORMAT or not _is_report(report) or not files or not modules:
            return None
        if not all(isinstance(name, str) and name and "." not in name for name in modules):  # find_spec("a.b") imports a
            return None
        if any(_stat(loaded) != [size, mtime] for loaded, size, mtime in files):
            return None
        if any(_origin(name) != origin for name, origin in modules.items()):
            return None
    except (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):  # no entry, or a damaged one
        return None
    return report


def store(planned: dict, config: dict | None, report: dict, files: set[str], modules: dict[str, list] | None = None) -> None:
    """Keep `report` for this question, fingerprinted by `files` (those the answering process loaded)
    and `modules` (default: this process's). Unchecked reports are not kept. Never raises."""
    folder = cache_folder()
    if folder is None or not report.get("checked"):
        return
    stats = [[path, *stat] for path in sorted(files) if (stat := _stat(path)) is not None]
    entry = {"format": _FORMAT, "report": report, "modules": current_modules() if modules is None else modules, "files": stats}
    path = _entry_path(folder, planned, config)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with gzip.open(temp, "wt", encoding="utf-8", compresslevel=6) as file:
            json.dump(entry, file)
        os.replace(temp, path)
        _prune(folder)
    except (OSError, TypeError, ValueError):  # TypeError: something in the entry that is not JSON
        temp.unlink(missing_ok=True)


def _prune(folder: Path) -> None:
    """Keep the KEEP_ENTRIES newest entries; drop temp files over an hour old (a run killed mid-write)."""
    entries = sorted(folder.glob("*.json.gz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    hour_ago = time.time() - 3600
    for stale in entries[KEEP_ENTRIES:] + [t for t in folder.glob(".*.tmp") if t.stat().st_mtime < hour_ago]:
        stale.unlink(missing_ok=True)


def _is_report(report) -> bool:
    """The shape LoadReport.to_json() gives (so LoadReport.from_json cannot fail on it)."""
    strings = lambda items: isinstance(items, list) and all(isinstance(i, str) for i in items)  # noqa: E731
    optional = lambda value: value is None or isinstance(value, str)  # noqa: E731
    fields = {"checked", "reason", "consumer", "missing", "unexpected", "mismatched", "conversion_errors"}
    return (
        isinstance(report, dict)
        and fields <= report.keys()
        and isinstance(report["checked"], bool)
        and optional(report.get("reason"))
        and optional(report.get("consumer"))
        and strings(report.get("missing"))
        and strings(report.get("unexpected"))
        and isinstance(report.get("mismatched"), list)
        and all(isinstance(m, dict) and isinstance(m.get("key"), str) and isinstance(m.get("expected"), dict)
                and isinstance(m.get("actual"), dict) for m in report["mismatched"])
        and isinstance(report.get("conversion_errors"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in report["conversion_errors"].items())
    )
