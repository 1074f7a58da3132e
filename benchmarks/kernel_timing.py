"""The one timing rule of the kernel_*.py scripts: wall clock and this thread's CPU time of one call
(on a shared machine the wall clock also counts time the core spent on other processes)."""

import time


def timed(fn) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call of fn()."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu
