"""Import hints: the files an import read last time, read ahead as the next run starts.

A cold import reads its files one at a time, each read waiting for the disk; during a conversion
those small reads queue behind the conversion's own big ones. So what an import read is recorded
in the user's cache folder (one list per interpreter and per import), and the next run asks the
kernel to read the whole list at once (posix_fadvise WILLNEED), from a thread, before the import
asks for each file. Two imports keep hints: torch's (learnt and read ahead by the converting
process, execute, and by the load report's child, report_process, whichever imports it) and the
child's import of transformers' modeling code on top of it.

A hint only: a stale or missing list costs time, never correctness. Lists are plain text, one
absolute path per line; odd entries (gone, a FIFO, a device) are skipped.
MOECONV_IMPORT_HINT=0 turns them all off (nothing read or written).
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from moeconv import report_cache

PARALLEL = 32  # threads of a prefetch that must not wait behind a conversion's reads (see prefetch)
TORCH = "torch"  # what `import torch` read: learnt by whichever process imports it (execute, report_process)


def hint_path(name: str) -> Path | None:
    """Where this interpreter's hint for the import `name` lives (XDG_CACHE_HOME or ~/.cache), or
    None when turned off."""
    if os.environ.get("MOECONV_IMPORT_HINT") == "0":
        return None
    key = hashlib.sha256(f"{sys.executable}\0{sys.version}".encode()).hexdigest()[:16]
    return report_cache.user_cache() / f"{name}-imports-{key}.txt"


def read(name: str) -> list[str]:
    path = hint_path(name)
    try:
        return path.read_text(encoding="utf-8").splitlines() if path else []
    except (OSError, UnicodeDecodeError):
        return []


def write(name: str, files: list[str]) -> None:
    path = hint_path(name)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text("".join(f"{f}\n" for f in files), encoding="utf-8")
        os.replace(temp, path)
    except OSError:
        pass


def learn(name: str, files: list[str], hint: list[str]) -> None:
    """Add to hint `name` (as read: `hint`) the `files` it lacks, keeping its entries still on
    disk; write nothing when it lacks none. Two processes that each learn their own view of one
    import (the converting process and the load report's child both import torch) then agree
    after one run instead of rewriting each other's list every run."""
    known = set(hint)
    if missing := [f for f in files if f not in known]:
        write(name, on_disk(hint) + missing)


def loaded_files() -> set[str]:
    """The files this process has imported (compiled modules) or mapped (extensions and their libraries)."""
    files = set(module_files(list(sys.modules)))
    try:
        with open("/proc/self/maps") as maps:
            files.update(fields[5].strip() for line in maps if len(fields := line.split(None, 5)) == 6)
    except OSError:
        pass
    return {f for f in files if f.startswith("/")}


def imported_since(before: set[str]) -> list[str]:
    """The files (on disk, in import order) of the modules imported since `before` = set(sys.modules)."""
    return on_disk(module_files([name for name in list(sys.modules) if name not in before]))


def module_files(names: Iterable[str]) -> list[str]:
    """The files of the modules `names` that are loaded, in that order: compiled code and source
    (the import reads the source's mtime), or the extension. No libraries they map."""
    files = {}
    for name in names:
        module = sys.modules.get(name)
        for file in (getattr(module, "__cached__", None), getattr(module, "__file__", None)):
            if isinstance(file, str) and file.startswith("/"):
                files[file] = None
    return list(files)


class OpenedFiles:
    """The files this process opens while `recording` (an audit hook: reads of files that are not
    imported, such as transformers' scan of every model's source, show up nowhere else)."""

    def __init__(self):
        self.files: set[str] = set()
        self.recording = True
        sys.addaudithook(self._record)  # cannot be removed: once stopped, one comparison per event

    def _record(self, event: str, args: tuple) -> None:
        if self.recording and event == "open" and isinstance(args[0], str):
            self.files.add(args[0])


def on_disk(files: Iterable[str]) -> list[str]:
    """The absolute paths among `files` that are regular files now (in their order), without the
    kernel's (/proc, /sys, /dev). Not the ones gone since: transformers' import probes the temp
    folder with a file of a random name, which would make every run's list differ and be written again."""
    return [f for f in files if f.startswith("/") and not f.startswith(("/proc/", "/sys/", "/dev/")) and os.path.isfile(f)]


def read_ahead(files: list[str], threads: int = 1) -> None:
    """`prefetch(files, threads)` on a thread of its own (nothing when the list is empty)."""
    if files:
        threading.Thread(target=lambda: prefetch(files, threads), name="moeconv-prefetch", daemon=True).start()


def prefetch(files: list[str], threads: int = 1) -> None:
    """Bring `files` into the page cache: their folders' listings now (the import system lists
    folders), their contents in the background (missing files are skipped). `threads`: how many
    folders and files to work on at once (see PARALLEL)."""
    folders = list(dict.fromkeys(os.path.dirname(file) for file in files))
    # Listing a folder and opening a file wait for metadata reads, one at a time per thread, and
    # behind a conversion's big reads each waits its turn: 1,328 folders took 6.0 s listed one at a
    # time beside an O_DIRECT copy (0.17 s on a quiet disk) and 0.6-0.9 s listed 32-64 at once.
    for step, items in ((_list_folder, folders), (_read_ahead_file, files)):  # every folder before any file
        first, *rest = _dealt(items, threads) or [[]]
        # Daemon threads, not an executor: a process that exits meanwhile must not wait for them.
        helpers = [threading.Thread(target=_each, args=(step, part), daemon=True) for part in rest]
        for helper in helpers:
            helper.start()
        _each(step, first)
        for helper in helpers:
            helper.join()


def _each(step: Callable[[str], None], items: list[str]) -> None:
    for item in items:
        step(item)


def _dealt(items: list[str], hands: int) -> list[list[str]]:
    """`items` dealt round-robin into `hands` parts: each part in the items' order, so the first
    ones (the first an import needs) go first in every thread."""
    return [items[k::hands] for k in range(min(hands, len(items)))]


def _list_folder(folder: str) -> None:
    try:
        os.listdir(folder)
    except OSError:
        pass


def _read_ahead_file(file: str) -> None:
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO in the list must not hang us
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # not a device an edited hint names
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
