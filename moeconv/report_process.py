"""The load report computed beside a conversion, in a child process forked before torch is imported.

A conversion needs its load report only when it writes it, last; computing it means importing
transformers' modeling code, ~3-4 s of pure-Python CPU, and on two busy cores that was the last
thing a conversion waited for. So `convert` forks this child first thing: while the parent imports
torch and plans, the child imports torch and transformers on the other core (cold, before the
conversion's own I/O fills the disk queue), then waits for the planned keys and answers. On a
thread the import held the GIL the conversion's threads need (3x slower, the conversion stalled).

The child also keeps import hints (import_hint.py) so that, from the second run on, the files its
import reads are fetched while the disk is still quiet, and it keeps every report it computes
(report_cache): a later run asking the same question of the same code gets it back and drops its
import midway.

This module imports neither torch nor transformers (that is its point). Without fork (not Linux)
the report is computed in-process when the plan is submitted. Ctrl-C is the parent's to handle: the
child ignores it and `cancel()` kills it; a parent that dies closes the pipe and the child exits.
A child that dies without an answer is replaced by computing the report in the parent.
"""

from __future__ import annotations

import gc
import multiprocessing
import signal
import sys
import threading
from typing import TYPE_CHECKING

from moeconv import import_hint, report_cache

if TYPE_CHECKING:
    from moeconv.report import LoadReport, Planned


class BackgroundReport:
    """`check_load` in a child process forked now: create it before importing torch, `submit()` the
    plan's keys when known, and `result()` waits for the report (re-raising the child's error)."""

    def __init__(self):
        self._question: tuple[Planned, dict | None] | None = None
        self._report: LoadReport | None = None
        self._process = None
        if sys.platform != "linux":  # fork is only safe and cheap on Linux
            return
        context = multiprocessing.get_context("fork")
        questions, self._asker = context.Pipe(duplex=False)
        self._answers, answerer = context.Pipe(duplex=False)
        ends = (questions, answerer, self._asker, self._answers)
        self._process = context.Process(target=_child, args=ends, name="moeconv-load-report", daemon=True)
        self._process.start()
        questions.close()  # the child holds the only ends it uses: its death is EOF here
        answerer.close()

    @property
    def pending(self) -> bool:
        """A child process is (still) computing the report."""
        return self._process is not None and self._report is None

    def submit(self, planned: Planned, config: dict | None) -> None:
        """The question: the planned output (key -> dtype, shape) and the output's config.json."""
        self._question = (planned, config)
        if self._process is None:
            self._report = answer(planned, config)
            return
        try:
            self._asker.send(self._question)
        except OSError:  # the child is gone: result() computes it here
            pass

    def result(self) -> LoadReport:
        """The report (an error raised by check_load in the child is raised here)."""
        if self._report is None:
            if self._question is None:
                raise RuntimeError("BackgroundReport.result() before submit()")
            try:
                kind, value = self._answers.recv()
            except EOFError:
                kind, value = "report", answer(*self._question)
            self._finish()
            if kind == "error":
                raise value
            if kind == "recalled":
                from moeconv.report import LoadReport

                value = LoadReport.from_json(value, recalled=True)
            self._report = value
        return self._report

    def cancel(self) -> None:
        """Stop the child (the conversion failed or was interrupted); result() is not called after."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        self._finish()

    def _finish(self) -> None:
        if self._process is not None:
            self._process.join()
            self._asker.close()
            self._answers.close()
            self._process = None


def _check_load(planned: Planned, config: dict | None) -> LoadReport:
    from moeconv import report

    return report.check_load(planned, config)


def answer(planned: Planned, config: dict | None) -> LoadReport:
    """check_load's report, or the one an earlier run kept for the same question (see report_cache)."""
    from moeconv.report import LoadReport, check_load

    if (recalled := report_cache.lookup(planned, config)) is not None:
        return LoadReport.from_json(recalled, recalled=True)
    report = check_load(planned, config)
    report_cache.store(planned, config, report.to_json(), import_hint.loaded_files())
    return report


# -- the import hint (import_hint.py) ------------------------------------------------------------------
# Importing transformers' modeling code (torch itself is imported already) reads ~5,300 files:
# modules (its own, torch's compiler stack, scipy's, sympy's), libraries, and the source of every
# model transformers has (~1,700 files it reads, not imports, to list their exports). From a cold
# cache, during a conversion, those reads queue behind the conversion's own: measured 5-6 s of
# block-I/O wait for 3.5-3.9 s of CPU, and the conversion then waited 3-4 s for its report. So the
# child records the files its import loaded or opened, and the next run's child reads them all
# ahead as it starts, while the disk is still quiet.
HINT = "report"


def _import_consumer(hint: list[str], torch_hint: list[str]) -> None:
    """Import what check_load runs, and rewrite the import hints if that read other files than they list."""
    started = set(sys.modules)
    import torch  # noqa: F401 - first, so that what its own import reads stays out of the hint

    # torch's own import has its hint (execute.py): when the conversion needs no torch (fuse-experts
    # copies bytes), this child is the only one to learn it, and the only one to read it ahead.
    import_hint.learn(import_hint.TORCH, import_hint.imported_since(started), torch_hint)

    from moeconv import report

    # What `import torch` read stays out of this hint; its own lists module files only. torch's
    # libraries, hinted as well (libtorch_cpu.so alone is 434 MB), made the parent's first write
    # no sooner (5 cold pairs, medians 2.94 s with them, 2.98 s without) and the run end later
    # (8.96 s against 8.62 s).
    before, opened = import_hint.loaded_files(), import_hint.OpenedFiles()
    try:
        report.import_consumer()
    except Exception:  # noqa: BLE001 - check_load says what is missing, in its own words
        pass
    finally:
        opened.recording = False
    if (needed := sorted(set(import_hint.on_disk(import_hint.loaded_files() | opened.files)) - before)) != hint:
        import_hint.write(HINT, needed)


def _child(questions, answerer, *parents_ends) -> None:
    for end in parents_ends:  # forked copies: with them open, the parent's exit would not be EOF here
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.disable()  # imports make few cycles; collecting passes over their thousands of new objects (gc: ~4 % of a run's samples)
    # The import starts now, on a thread: the question comes only once the parent has imported torch
    # and planned, seconds in which this core would idle (timed to the first written byte, 4 pairs:
    # the parent's start is no later for it). When the question's kept report still holds, the
    # import is dropped midway and costs the conversion nothing more. The hinted files (what the
    # import reads beyond torch's own import) are read ahead.
    hint, torch_hint = import_hint.read(HINT), import_hint.read(import_hint.TORCH)
    import_hint.read_ahead(torch_hint + hint)
    importer = threading.Thread(target=_import_consumer, args=(hint, torch_hint), daemon=True)
    importer.start()
    try:
        question = questions.recv()
    except EOFError:  # the parent stopped before planning
        return
    if (recalled := report_cache.lookup(*question)) is not None:
        answerer.send(("recalled", recalled))
        return  # an import still running on its thread is dropped with the process
    # A miss: the import is what the conversion will wait for, and the conversion's copies are about
    # to fill the disk queue, so the rest of the hint is read ahead many files at once (fuse-experts,
    # report computed, 8 pairs: 9.78 -> 7.47 s). Not before the question: a run whose report is
    # recalled would pay for it (2-layer gpt-oss, recalled: slower in 8 of 8 pairs, +0.1 s median).
    import_hint.read_ahead(torch_hint + hint, import_hint.PARALLEL)
    importer.join()
    gc.enable()
    try:
        outcome = ("report", _check_load(*question))
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which raises it
        outcome = ("error", error)
    try:
        answerer.send(outcome)
    except Exception as error:  # an exception that does not pickle: its text does
        answerer.send(("error", RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]} ({error})")))
    if outcome[0] == "report":
        report_cache.store(*question, outcome[1].to_json(), import_hint.loaded_files())
