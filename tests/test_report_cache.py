"""Load reports recalled from earlier runs (moeconv.report_cache): only while the question, the
answering code's files and where its modules come from are unchanged; damaged entries are misses."""

import gzip
import importlib
import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
from test_report import gpt_oss, meta_planned, mixtral  # noqa: E402

from moeconv import import_hint, report_cache, report_process  # noqa: E402
from moeconv.report import LoadReport, Mismatch, check_load  # noqa: E402
from moeconv.report_process import BackgroundReport  # noqa: E402

REPORT = LoadReport(True, None, "transformers 5 X", ["a.missing"], ["b.unexpected"],
                    [Mismatch("c", {"shape": [2], "dtype": "BF16"}, {"shape": [3], "dtype": "BF16"})], {"d": "boom"})
PLANNED = {"x.weight": ("BF16", (4, 8))}


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """The cache turned on, in a folder of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MOECONV_REPORT_CACHE")
    return tmp_path / "xdg" / "moeconv" / "load-reports"


def test_to_json_and_from_json_are_inverses():
    again = LoadReport.from_json(json.loads(json.dumps(REPORT.to_json())))
    assert again == REPORT and again.mismatched[0].expected == {"shape": [2], "dtype": "BF16"}


def test_an_entry_holds_while_its_question_files_and_modules_are_unchanged(cache, tmp_path):
    code = tmp_path / "modeling.py"
    code.write_text("x = 1\n")
    report_cache.store(PLANNED, {"model_type": "m"}, REPORT.to_json(), {str(code)})
    assert [p.name.endswith(".json.gz") for p in cache.iterdir()] == [True]
    assert report_cache.lookup(PLANNED, {"model_type": "m"}) == REPORT.to_json()
    assert report_cache.lookup({"x.weight": ("BF16", (4, 9))}, {"model_type": "m"}) is None  # another question
    assert report_cache.lookup({"x.weight": ("F32", (4, 8))}, {"model_type": "m"}) is None
    assert report_cache.lookup(PLANNED, {"model_type": "n"}) is None
    os.utime(code, ns=(code.stat().st_atime_ns, code.stat().st_mtime_ns + 1))  # edited (same size)
    assert report_cache.lookup(PLANNED, {"model_type": "m"}) is None
    report_cache.store(PLANNED, {"model_type": "m"}, REPORT.to_json(), {str(code)})
    assert report_cache.lookup(PLANNED, {"model_type": "m"}) == REPORT.to_json()
    code.unlink()  # uninstalled
    assert report_cache.lookup(PLANNED, {"model_type": "m"}) is None


def test_a_module_that_would_now_come_from_elsewhere_is_a_miss(cache, tmp_path, monkeypatch):
    modules = report_cache.current_modules()
    assert modules["json"][0] == json.__file__ and modules["moeconv"][1] == [os.path.dirname(report_cache.__file__)]
    first, shadow = tmp_path / "first", tmp_path / "shadow"
    for folder in (first, shadow):
        folder.mkdir()
        (folder / "moeconv_probe_module.py").write_text("")
    monkeypatch.syspath_prepend(str(first))
    modules = {"moeconv_probe_module": [str(first / "moeconv_probe_module.py"), []], "json": modules["json"]}
    report_cache.store(PLANNED, None, REPORT.to_json(), {json.__file__}, modules)
    assert report_cache.lookup(PLANNED, None) == REPORT.to_json()
    monkeypatch.syspath_prepend(str(shadow))  # the same name earlier on sys.path now wins
    importlib.invalidate_caches()
    assert report_cache.lookup(PLANNED, None) is None


def test_damaged_or_edited_entries_are_misses_never_errors(cache, tmp_path, monkeypatch):
    code = tmp_path / "modeling.py"
    code.write_text("x = 1\n")
    (tmp_path / "importable" / "moeconv_never_imported").mkdir(parents=True)
    (tmp_path / "importable" / "moeconv_never_imported" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "importable"))  # an edited entry must not import it
    importlib.invalidate_caches()
    report_cache.store(PLANNED, None, REPORT.to_json(), {str(code)})
    (entry,) = cache.iterdir()
    with gzip.open(entry, "rt") as file:
        good = json.load(file)
    edits = [
        lambda e: e["report"].update(missing="a.missing"),  # a string, not a list
        lambda e: e["report"].update(mismatched=[{"key": "c"}]),
        lambda e: e["report"].update(conversion_errors={"d": 1}),
        lambda e: e["report"].pop("consumer"),
        lambda e: e.update(files=[[str(code), "1"]]),
        lambda e: e.update(files=[]),
        lambda e: e.update(format=0),
        lambda e: e.update(modules={"moeconv_never_imported.sub": None}),  # finding a submodule imports its parent
    ]
    for edit in edits:
        edited = json.loads(json.dumps(good))
        edit(edited)
        with gzip.open(entry, "wt") as file:
            json.dump(edited, file)
        assert report_cache.lookup(PLANNED, None) is None, edited
    bomb = gzip.compress(json.dumps(good).encode() + b" " * (report_cache._MAX_ENTRY_BYTES + 1))  # valid JSON, too big
    for damage in (b"", b"\x1f\x8b garbage", gzip.compress(b"[1, 2]"), gzip.compress(b"{\"format\": 1"), bomb):
        entry.write_bytes(damage)
        assert report_cache.lookup(PLANNED, None) is None
    assert "moeconv_never_imported" not in sys.modules


def test_unchecked_reports_are_not_kept_and_the_cache_can_be_turned_off(cache, tmp_path, monkeypatch):
    code = tmp_path / "modeling.py"
    code.write_text("x = 1\n")
    report_cache.store(PLANNED, None, LoadReport(False, "transformers is not installed", None).to_json(), {str(code)})
    assert not cache.exists()  # an install must not be outlived by "not installed"
    monkeypatch.setenv("MOECONV_REPORT_CACHE", "0")
    report_cache.store(PLANNED, None, REPORT.to_json(), {str(code)})
    assert report_cache.cache_folder() is None and not cache.exists()
    monkeypatch.delenv("MOECONV_REPORT_CACHE")
    report_cache.store(PLANNED, None, REPORT.to_json(), {str(code)})
    monkeypatch.setenv("MOECONV_REPORT_CACHE", "0")
    assert report_cache.lookup(PLANNED, None) is None


def test_only_the_most_recent_entries_are_kept(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(report_cache, "KEEP_ENTRIES", 2)
    code = tmp_path / "modeling.py"
    code.write_text("x = 1\n")
    for n in range(3):
        report_cache.store({"k": ("BF16", (n,))}, None, REPORT.to_json(), {str(code)})
        os.utime(max(cache.iterdir(), key=lambda p: p.stat().st_mtime_ns), ns=(n * 10**9, n * 10**9))
        if n == 0:  # what a run killed while writing leaves: an old one goes, a recent one (a run writing now) stays
            (cache / ".old.json.gz.1.tmp").write_bytes(b"x")
            os.utime(cache / ".old.json.gz.1.tmp", (0, 0))
            (cache / ".new.json.gz.2.tmp").write_bytes(b"x")
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith(".tmp")) == [".new.json.gz.2.tmp"]
    assert len(list(cache.glob("*.json.gz"))) == 2
    assert report_cache.lookup({"k": ("BF16", (0,))}, None) is None
    assert report_cache.lookup({"k": ("BF16", (2,))}, None) == REPORT.to_json()


def test_an_in_process_report_is_recalled_the_second_time(cache):
    config = gpt_oss(quantized=True)
    planned = meta_planned(config)
    first = report_process.answer(planned, config)
    second = report_process.answer(planned, config)
    assert first == check_load(planned, config) == second and first.unexpected  # a report with findings
    assert (first.recalled, second.recalled) == (False, True)


@pytest.mark.skipif(sys.platform != "linux", reason="the report is computed in a child only on Linux")
def test_the_report_child_recalls_and_keeps_answers(cache):
    config = mixtral()
    planned = meta_planned(config)
    computed = BackgroundReport()
    computed.submit(planned, config)
    assert computed.result() == check_load(planned, config) and not computed.result().recalled
    assert len(list(cache.iterdir())) == 1  # kept by the child
    recalled = BackgroundReport()
    recalled.submit(planned, config)
    assert recalled.result() == check_load(planned, config) and recalled.result().recalled


@pytest.mark.skipif(sys.platform != "linux", reason="the report is computed in a child only on Linux")
def test_the_report_child_reads_its_hint_ahead_in_parallel_only_on_a_miss(cache, monkeypatch, tmp_path):
    """One file at a time as it starts; many at once once the question is known not to be recalled
    (a recalled run would pay for reading ahead what it never imports)."""
    calls = tmp_path / "read-ahead-calls.txt"

    def record(files, threads=1):  # runs in the forked child: the parent sees it through a file
        with open(calls, "a") as log:
            log.write(f"{threads}\n")

    monkeypatch.setattr(import_hint, "read_ahead", record)  # before the fork
    config = mixtral()
    planned = meta_planned(config)
    for expected in (["1", str(import_hint.PARALLEL)], ["1"]):  # computed (and kept), then recalled
        calls.write_text("")
        background = BackgroundReport()
        background.submit(planned, config)
        assert background.result().recalled == (expected == ["1"])
        assert calls.read_text().split() == expected


@pytest.mark.skipif(sys.platform != "linux", reason="the report is computed in a child only on Linux")
def test_a_recalled_report_does_not_wait_for_the_childs_import(cache, monkeypatch):
    """The child starts importing transformers at once; on a hit it answers and exits mid-import."""
    config = mixtral()
    planned = meta_planned(config)
    report_process.answer(planned, config)  # kept
    monkeypatch.setattr(report_process, "_import_consumer", lambda *hints: time.sleep(300))  # before the fork
    start = time.monotonic()
    background = BackgroundReport()
    child = background._process
    background.submit(planned, config)
    assert background.result().recalled and background.result() == check_load(planned, config)
    assert time.monotonic() - start < 60 and not child.is_alive()


@pytest.mark.skipif(sys.platform != "linux", reason="the report is computed in a child only on Linux")
def test_a_second_conversion_recalls_its_report(cache, tmp_path, tiny_gpt_oss_example_dir):
    """Real `moeconv convert` runs (fresh processes): same report file, and the second says it recalled it."""
    runs = []
    for n in range(2):
        out = tmp_path / f"out{n}"
        command = [sys.executable, "-m", "moeconv", "convert", str(tiny_gpt_oss_example_dir), str(out), "-p", "gpt-oss-bf16"]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        assert done.returncode == 0, done.stderr
        written = json.loads((out / "moeconv-report.json").read_text())
        runs.append((done.stderr, {key: written[key] for key in LoadReport(True, None, None).to_json()}))
    (first_log, first), (second_log, second) = runs
    assert first == second and first["ok"]
    assert "recalled" not in first_log and "(recalled from an earlier run: same planned output, same transformers code)" in " ".join(second_log.split())
