"""Run one `moeconv` command line in a child process with a time and memory cap (tests/test_hostile.py).

The children are forked from a multiprocessing forkserver that imported moeconv, torch and
transformers once (3-6 s a fresh interpreter would pay per case, on 2 busy cores). Each child caps its address space
at what it starts with plus `memory` bytes (RLIMIT_AS: an allocation past it fails, it cannot swap
the machine), sends its stdout and stderr to files, runs the real typer app as `python -m moeconv`
does, and exits with the app's exit code; 99 with the traceback on stderr for any exception the
app let through. The parent kills it at the deadline.

    result = run(["convert", src, out, "-p", "fuse-experts"], tmp_path)   # Result(code, stdout, stderr, seconds)

`kill_at` = (function name, n): SIGKILL the child itself when moeconv.output calls that function
(`atomic_write_bytes`, `os.replace`) for the n-th time, or when the report is awaited
(`report`, 1): a power cut at that exact point of the final steps.
"""

import multiprocessing
import os
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# Imported once in the forkserver: the CLI's modules, and what the load report of the tests' mixtral
# checkpoints imports (2-3 s per child otherwise).
PRELOAD = ["moeconv.cli", "moeconv.plan", "moeconv.execute", "moeconv.verify", "moeconv.hub", "moeconv.report"]
PRELOAD += ["transformers", "transformers.models.mixtral.modeling_mixtral"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD + [__name__])


@dataclass
class Result:
    code: int  # exit code; -9 when killed by SIGKILL
    stdout: str
    stderr: str
    seconds: float


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _kill_hook(kill_at: tuple[str, int]) -> None:
    """Patch moeconv.output so that the n-th call of the named step SIGKILLs this process."""
    import moeconv.output as output
    from moeconv.plan import Plan

    name, n = kill_at
    calls = {"count": 0}

    def die_on_nth(call):
        def wrapper(*args, **kwargs):
            if args and getattr(args[0], "name", None) == output.JOURNAL_NAME:
                return call(*args, **kwargs)  # journal writes happen all along: not a final step
            calls["count"] += 1
            if calls["count"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return call(*args, **kwargs)

        return wrapper

    if name == "report":
        real = Plan.report.fget
        Plan.report = property(die_on_nth(real))
    elif name == "os.replace":
        output.os = type(sys)("os_patched")
        output.os.__dict__.update(os.__dict__)
        output.os.replace = die_on_nth(os.replace)
    else:
        setattr(output, name, die_on_nth(getattr(output, name)))


def _child(argv: list[str], stdout: str, stderr: str, memory: int, env: dict, kill_at) -> None:
    os.setpgid(0, 0)  # its own process group: the parent ends it and its children together
    os.environ.update(env)
    if "HF_HUB_CACHE" in env:  # huggingface_hub read its constants at import, in the forkserver
        from huggingface_hub import constants

        constants.HF_HUB_CACHE = env["HF_HUB_CACHE"]
        constants.HF_HUB_OFFLINE = True
    limit = _address_space() + memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    if kill_at is not None:
        _kill_hook(kill_at)
    from moeconv.cli import app

    try:
        app(args=argv, prog_name="moeconv")
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Running:
    """A started child (`start`): `wait_for(condition)`, then `finish()` for its Result."""

    def __init__(self, argv: list, folder: Path, *, timeout: float, memory: int, env: dict | None, kill_at):
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.err = folder / "child.stdout", folder / "child.stderr"
        env = {"MOECONV_REPORT_CACHE": "0", "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(folder)), **(env or {})}
        args = ([str(a) for a in argv], str(self.out), str(self.err), memory, env, kill_at)
        self.process = _CONTEXT.Process(target=_child, args=args)
        self.timeout = timeout
        self.started = time.monotonic()
        self.process.start()

    def wait_for(self, condition, poll: float = 0.02) -> None:
        """Until condition() is true; AssertionError if the child ends or times out first."""
        while not condition():
            assert self.process.is_alive(), "the child ended before the condition held"
            assert time.monotonic() - self.started < self.timeout, "the condition never held"
            time.sleep(poll)

    def finish(self) -> Result:
        """Wait for the child (killed at the deadline: code None) and its Result."""
        self.process.join(max(0.0, self.timeout - (time.monotonic() - self.started)))
        seconds = time.monotonic() - self.started
        code = None if self.process.is_alive() else self.process.exitcode
        try:  # the child and whatever it started (the load report's process)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.join()
        return Result(code, self.out.read_text(errors="replace"), self.err.read_text(errors="replace"), seconds)


def start(argv: list, folder: Path, *, timeout: float = 30, memory: int = 2 * 2**30, env: dict | None = None, kill_at=None):
    """`moeconv ARGV` in a capped child, not waited for; its output files go to `folder`."""
    return Running(argv, folder, timeout=timeout, memory=memory, env=env, kill_at=kill_at)


def run(argv: list, folder: Path, **kwargs) -> Result:
    """`moeconv ARGV` in a capped child (see `start`): its Result; code None if it was still running
    at `timeout` seconds (then killed)."""
    return start(argv, folder, **kwargs).finish()
