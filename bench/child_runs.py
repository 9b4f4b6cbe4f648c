"""What the benchmarks share: timing one child process, and the median-with-range they report."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def timed_run(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float, float]:
    """Launch epoch, wall seconds, CPU seconds (user + system, reaped children included) and peak RSS (GB) of
    one child process; its output in `log`."""
    launch, start = time.time(), time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child execs the command; its rusage is read back alone via wait4
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.execvpe(command[0], command, env)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(command)}\n{log.read_text(errors='replace')[-3000:]}")
    return launch, elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024**2


def median_range(values: list[float], digits: int = 2) -> str:
    """The median and the range of a benchmark's per-round values (these machines are noisy: ±40 %)."""
    return f"{statistics.median(values):.{digits}f} (range {min(values):.{digits}f}-{max(values):.{digits}f})"
