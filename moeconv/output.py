"""The output folder's life: refusing the wrong folder, staging, the journal, --resume, --overwrite,
and the final renames.

Finished shards wait under hidden staged names (`.model-00001-of-00003.safetensors.staged`),
recorded in a journal (`.moeconv-progress.json`: name, size, checksum, and a fingerprint of the
plan) until every shard is done; only then do they all get their final names, then the index,
config, small files and the report. So a failed or interrupted run never leaves a final-named
shard, and `--resume` keeps what was finished (shards whose bytes still hash to the journal).

The shards are fsynced together at the end, not each as it finishes, and the journal never: on
this kind of virtual disk every fsync flushed the disk's cache for 0.3-1.4 s with nothing else
moving. A process that dies keeps them all (the page cache outlives it); after a machine crash,
--resume re-hashes every shard the journal lists and redoes any that did not survive whole.
"""

import fcntl
import glob
import hashlib
import json
import os
from pathlib import Path

from moeconv.checksum import DEFAULT as DEFAULT_CHECKSUM
from moeconv.checksum import file_checksum, new_hasher
from moeconv.companions import is_companion, read_companion
from moeconv.errors import MoeconvError, WriteError
from moeconv.format import INDEX_NAME
from moeconv.plan import Plan
from moeconv.writer import atomic_write_bytes, fsync_dir, fsync_file, index_bytes

REPORT_NAME = "moeconv-report.json"
JOURNAL_NAME = ".moeconv-progress.json"  # an unfinished run: its finished shards, for --resume


def staged_name(name: str) -> str:
    """Where a finished shard waits until every shard is done: hidden, and no loader's `*.safetensors`."""
    return f".{name}.staged"


def plan_fingerprint(plan: Plan, checksum: str = DEFAULT_CHECKSUM) -> str:
    """What a journal must match for --resume: every output tensor and shard layout, the recipes'
    TOML, the options (with the checksum algorithm), and the source's header layout (its data is
    not re-read)."""
    basis = {
        "tensors": plan.tensors_json(),
        "shards": plan.shards_json(),
        "recipes": [r.text for r in plan.recipes],
        "options": {**{k: v for k, v in plan.rebuild().items() if k != "recipes"}, "checksum": checksum},
        "source": [[k, i.dtype, list(i.shape), i.file.name, i.begin, i.end] for k, i in plan.source.tensors.items()],
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


# The options a journal records next to its fingerprint, and the command-line spelling of each.
OPTION_FLAGS = {
    "source": "SRC",
    "recipes": "--preset/--recipe",
    "dtype": "--dtype",
    "align": "--align",
    "max_shard_size": "--max-shard-size",
    "checksum": "--checksum",
}


def run_options(plan: Plan, checksum: str) -> dict:
    """The options of a run, as the journal records them (to name the one a --resume changed)."""
    rebuild = plan.rebuild()
    return {
        "source": plan.source.origin,
        "recipes": [r.origin for r in plan.recipes],
        **{k: rebuild[k] for k in ("dtype", "align", "max_shard_size")},
        "checksum": checksum,
    }


def _changed_options(recorded, options: dict) -> str:
    """'--max-shard-size 1000000 then, 5000000000 now' for every option that differs ('' if none)."""
    if not isinstance(recorded, dict):
        return ""
    changed = [
        f"{flag} {json.dumps(recorded.get(name))} then, {json.dumps(options.get(name))} now"
        for name, flag in OPTION_FLAGS.items()
        if recorded.get(name) != options.get(name)
    ]
    return "; ".join(changed)


def _leftovers(out: Path) -> list[Path]:
    """Temp files of unfinished writes and staged shards of an unfinished run."""
    return [*out.glob(".*.tmp"), *out.glob(".*.staged")]


class Output:
    """One conversion's output folder.

    output = Output(out_dir, plan, overwrite=..., resume=..., checksum=...)
    kept = output.open()                       # {shard name: {"size", "checksum"}} kept by --resume
    writes each other shard to output.staged(layout.name), then output.record(name, manifest)
    report = output.finalize()                 # or output.abandon(error) on failure
    """

    def __init__(
        self, out_dir: str | Path, plan: Plan, *, overwrite: bool = False, resume: bool = False, checksum: str = DEFAULT_CHECKSUM
    ):
        self.dir = Path(out_dir)
        self.plan = plan
        self.overwrite, self.resume, self.checksum = overwrite, resume, checksum
        self.fingerprint = plan_fingerprint(plan, checksum)
        self.options = run_options(plan, checksum)
        self.finished: dict[str, dict] = {}
        self.notes: list[str] = []  # what --resume kept or redid, and why
        self._lock: int | None = None  # descriptor of the locked folder while the run owns it

    def open(self) -> dict[str, dict]:
        """Lock the folder for this run, make it ready (refusals, --overwrite, --resume) and start
        the journal. Any OS error on the folder is one WriteError line."""
        ready = False
        try:
            self._lock = _claim(self.dir, self.plan.source.root)
            self.finished = _prepare(
                self.dir,
                self.overwrite,
                resume=self.resume,
                fingerprint=self.fingerprint,
                checksum=self.checksum,
                options=self.options,
                notes=self.notes,
            )
            ready = True  # from here on the folder's contents are this run's
            self._write_journal()
        except BaseException as error:
            failure = _one_line(error, self.dir)
            if ready:
                self.abandon(failure)
            else:  # refused: what is there (another run's journal included) stays as it was
                self._unlock()
            if failure is error:
                raise
            raise failure from None
        if self.resume and self.notes:
            todo = len(self.plan.shards) - len(self.finished)
            self.notes.append(f"kept {len(self.finished)} of {len(self.plan.shards)} shard(s); writing {todo}")
        return dict(self.finished)

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def staged(self, name: str) -> Path:
        return self.dir / staged_name(name)

    def record(self, name: str, manifest: dict) -> None:
        """A shard is written (manifest: {"size", "checksum"}): journal it."""
        self.finished[name] = {"size": manifest["size"], "checksum": manifest["checksum"]}
        self._write_journal()

    def _write_journal(self) -> None:
        data = {"fingerprint": self.fingerprint, "options": self.options, "algorithm": self.checksum, "shards": self.finished}
        atomic_write_bytes(self.dir / JOURNAL_NAME, (json.dumps(data, indent=2) + "\n").encode(), sync=False)

    def finalize(self, extra: dict | None = None) -> dict:
        """Every shard written: the report is computed first (waiting for the load report if it is
        still being computed; `extra`: more report fields) while nothing has its final name; then
        the small files, config.json and the report are written, the shards get their final names
        and, last, the one file that makes the folder loadable: the index (several shards) or the
        single shard. transformers loads nothing without it, so a folder killed at any point before
        looks incomplete, and --resume still finds the journal. Returns the report."""
        plan, out = self.plan, self.dir
        names = [layout.name for layout in plan.shards]
        index = index_bytes(plan.shards)
        renamed: list[str] = []
        try:
            for name in names:  # durable before any of them gets its final name
                fsync_file(self.staged(name))
            small = {name: read_companion(plan.source.root, name) for name in plan.companion_files}
            if plan.config is not None:
                small["config.json"] = (json.dumps(plan.config, indent=2) + "\n").encode()
            hashes = {name: self.finished[name]["checksum"] for name in names}  # hashed while written
            hashes.update({name: self._digest(data) for name, data in small.items()})
            if index is not None:
                hashes[INDEX_NAME] = self._digest(index)
            report = {**plan.to_json(), "rebuild": plan.rebuild(), "checksums": {"algorithm": self.checksum, "files": hashes}}
            report.update(extra or {})
            for name, data in small.items():
                atomic_write_bytes(out / name, data)
            atomic_write_bytes(out / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
            for name in names:
                os.replace(self.staged(name), out / name)
                renamed.append(name)
            if index is not None:
                atomic_write_bytes(out / INDEX_NAME, index)
            fsync_dir(out)
        except BaseException as error:
            for name in (INDEX_NAME, REPORT_NAME):
                (out / name).unlink(missing_ok=True)
            for name in renamed:  # back out of sight: the journal still lists them for --resume
                os.replace(out / name, self.staged(name))
            failure = _one_line(error, out)
            self.abandon(failure)
            if failure is error:
                raise
            raise failure from None
        (out / JOURNAL_NAME).unlink(missing_ok=True)
        self._unlock()
        return report

    def _digest(self, data: bytes) -> str:
        hasher = new_hasher(self.checksum)
        hasher.update(data)
        return hasher.hexdigest()

    def remove_temp_files(self) -> None:
        """Delete the temp files of this run's writes that never completed (a writer interrupted
        before it could, or a process killed while writing: a Ray worker whose task was retried)."""
        ours = [staged_name(layout.name) for layout in self.plan.shards] + [JOURNAL_NAME, INDEX_NAME, "config.json", REPORT_NAME]
        for name in ours + list(self.plan.companion_files):
            for temp in self.dir.glob(f".{glob.escape(name)}.*.tmp"):
                temp.unlink(missing_ok=True)

    def abandon(self, error: BaseException) -> None:
        """After a failure: with no finished shard there is nothing to resume, so the journal goes
        too; otherwise say how to continue. The unfinished shard's temp file is gone already, except
        when Ctrl-C lands as a temp file is created, before any code owns it: any temp file of this
        run is removed here."""
        self.remove_temp_files()
        if not self.finished:
            (self.dir / JOURNAL_NAME).unlink(missing_ok=True)
        self._unlock()
        if isinstance(error, MoeconvError) and self.finished:
            error.args = (
                f"{error}; {len(self.finished)} finished shard(s) kept out of sight in {self.dir}: rerun with --resume to continue",
            )


def _one_line(error: BaseException, out: Path) -> BaseException:
    """An OS error on the output folder as the one-line WriteError; any other error as it is."""
    if not isinstance(error, OSError):
        return error
    return WriteError(f"{error.filename or out}: {error.strerror or error}")


def _claim(out_dir: Path, source_root: Path) -> int:
    """Refuse an output folder that is the source or inside it, or not a folder; create it; lock it
    for this run (flock on the folder itself: no lock file to leave behind, and the kernel releases
    it whenever the process ends, kill -9 included). Returns the locked descriptor."""
    out = out_dir.resolve()
    src = source_root.resolve()
    if out == src or src in out.parents:
        raise WriteError(f"{out_dir}: output folder is the source folder or inside it; choose another folder")
    if out.exists() and not out.is_dir():
        raise WriteError(f"{out_dir}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(f"{out_dir}: cannot create the output folder: {error.strerror or error}") from None
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WriteError(f"{out_dir}: another moeconv run is writing this folder; wait for it to end or stop it first") from None
    return fd


def _prepare(
    out_dir: Path,
    overwrite: bool,
    *,
    resume: bool = False,
    fingerprint: str | None = None,
    checksum: str = DEFAULT_CHECKSUM,
    options: dict | None = None,
    notes: list[str] | None = None,
) -> dict[str, dict]:
    """Refuse an output folder that is not empty (unless overwrite or resume).

    Returns the kept shards. With `overwrite`, the old report and index are deleted first (so a
    half-replaced folder never looks complete), then the old shards and leftovers.

    With `resume` and a progress journal there, the shards it lists are kept when their bytes still
    hash to what it recorded: {shard name: {"size", "checksum"}} of the kept ones. A journal
    written with another `checksum` algorithm is refused (started over with `overwrite`).
    """
    out = out_dir.resolve()  # created, checked against the source and locked by _claim
    journal = out / JOURNAL_NAME
    if any(out.iterdir()):
        if resume and journal.is_file():
            kept = _resume(out_dir, fingerprint, overwrite, checksum, options or {}, notes if notes is not None else [])
            if kept is not None:
                return kept
        elif not overwrite:
            if journal.is_file():
                raise WriteError(
                    f"{out_dir}: holds an unfinished conversion ({JOURNAL_NAME}); pass --resume to continue it"
                    " (same source, recipes and options) or --overwrite to start over"
                )
            if resume:
                raise WriteError(f"{out_dir}: nothing to resume (no {JOURNAL_NAME}); pass --overwrite to replace its contents")
            raise WriteError(f"{out_dir}: output folder is not empty; pass --overwrite to replace its contents")
        _clear_previous(out)
    return {}


def _clear_previous(out: Path) -> None:
    """--overwrite: delete what a previous conversion wrote there (the files its report lists, any
    checkpoint shard, index, journal, config and known companion, leftovers); the report and index
    first, so a half-replaced folder never looks complete. Anything else stays; a folder where a
    file of ours would be is refused, never deleted."""
    try:
        listed = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))["checksums"]["files"]
        listed = [name for name in listed if isinstance(name, str) and Path(name).name == name]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        listed = []
    names = [
        REPORT_NAME,
        INDEX_NAME,
        JOURNAL_NAME,
        "config.json",
        *listed,
        *(p.name for p in out.iterdir() if is_companion(p.name)),
    ]
    paths = [out / name for name in dict.fromkeys(names)] + [*out.glob("*.safetensors"), *_leftovers(out)]
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            raise WriteError(f"{path}: a folder where the output writes files; moeconv deletes no folder: move it away")
    try:
        for path in paths:
            path.unlink(missing_ok=True)
    except OSError as error:
        raise WriteError(f"{error.filename}: cannot delete this file of the replaced output: {error.strerror or error}") from None


def _resume(
    out_dir: Path, fingerprint: str | None, overwrite: bool, checksum: str, options: dict, notes: list[str]
) -> dict[str, dict] | None:
    """Check the journal against the plan and checksum algorithm; keep each journaled shard whose
    file still hashes right, delete everything else an unfinished run left. None: start over
    (--overwrite, journal unusable). `notes` receives one line per journaled shard: kept or redone, and why."""
    out = out_dir.resolve()
    try:
        journal = json.loads((out / JOURNAL_NAME).read_text(encoding="utf-8"))
        shards = journal["shards"]
        assert isinstance(shards, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError, RecursionError):
        if overwrite:
            return None
        raise WriteError(f"{out_dir}: {JOURNAL_NAME} is unreadable; pass --overwrite to start over") from None
    recorded = journal.get("algorithm")
    if recorded != checksum:  # its hashes cannot vouch for the shards under another algorithm
        if overwrite:
            return None
        if not isinstance(recorded, str):
            raise WriteError(
                f"{out_dir}: {JOURNAL_NAME} records no checksum algorithm (another moeconv version); pass --overwrite to start over"
            )
        raise WriteError(
            f"{out_dir}: the unfinished conversion there checksummed its shards with {recorded}, not {checksum};"
            f" rerun with --checksum {recorded} to resume it, or pass --overwrite to start over"
        )
    if journal.get("fingerprint") != fingerprint:
        if overwrite:
            return None
        changed = _changed_options(journal.get("options"), options)
        if changed:
            raise WriteError(
                f"{out_dir}: the unfinished conversion there was planned with other options ({changed});"
                " rerun with the same ones, or pass --overwrite to start over"
            )
        raise WriteError(
            f"{out_dir}: the unfinished conversion there was planned from another source, recipes or options;"
            " rerun with the same ones, or pass --overwrite to start over"
        )
    for name in (REPORT_NAME, INDEX_NAME):  # a run killed while renaming its shards into place
        (out / name).unlink(missing_ok=True)
    for path in out.glob(".*.tmp"):
        path.unlink()
    kept: dict[str, dict] = {}
    for name, entry in shards.items():
        if not isinstance(name, str) or Path(name).name != name or not isinstance(entry, dict):
            continue
        staged, final = out / staged_name(name), out / name
        found = staged if staged.is_file() else final if final.is_file() else None
        if found is None:
            notes.append(f"redoing {name}: its file is gone")
        elif found.stat().st_size != entry.get("size"):
            notes.append(f"redoing {name}: {found.stat().st_size} bytes, the journal says {entry.get('size')}")
        elif file_checksum(found, checksum) != entry.get("checksum"):
            notes.append(f"redoing {name}: its {checksum} differs from the journal's (the file changed)")
        else:
            if found == final:
                os.replace(final, staged)
            kept[name] = {"size": entry["size"], "checksum": entry["checksum"]}
            notes.append(f"kept {name}: finished before, its {checksum} still matches the journal")
    for path in out.glob(".*.staged"):
        if path.name.removeprefix(".").removesuffix(".staged") not in kept:
            path.unlink()
    for path in out.glob("*.safetensors"):
        path.unlink()
    return kept
