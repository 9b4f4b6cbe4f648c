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


def bootstrap_interval(values: list[float], level: float = 0.95, resamples: int = 4000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median (Efron & Tibshirani 1993, ch. 13): the median of `resamples`
    samples drawn with replacement from `values`; the (1 − level)/2 and (1 + level)/2 quantiles of those medians.
    Seeded: the same values give the same interval."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    medians = np.median(data[draws], axis=1)
    low, high = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


# Fewer pairs give no verdict: with n pairs the bootstrap interval of the median is about their range, and n
# pairs all on one side of a true median happen by chance with probability 2·0.5^n (sign test): 0.25 for 3,
# 0.0625 for 5, 0.031 for 6 -- six pairs are the fewest that can reach 95 %.
MIN_PAIRS = 6


def verdict(ratios: list[float], goal: float, at_least: bool) -> str:
    """'holds', 'fails' or 'undecided, run longer': a verdict only from at least `MIN_PAIRS` pairs and when the
    median's 95 % bootstrap interval lies wholly on one side of the goal (ratio ≥ goal when `at_least`, else
    ratio ≤ goal)."""
    if len(ratios) < MIN_PAIRS:
        return "undecided, run longer"
    low, high = bootstrap_interval(ratios)
    if at_least:
        return "holds" if low >= goal else "fails" if high < goal else "undecided, run longer"
    return "holds" if high <= goal else "fails" if low > goal else "undecided, run longer"


def ratio_line(name: str, ratios: list[float], goal: float | None = None, at_least: bool = True) -> str:
    """`name: median (95 % interval low-high, range min-max, n pairs)` and, with a goal, the verdict."""
    low, high = bootstrap_interval(ratios)
    line = (f"{name}: {statistics.median(ratios):.2f}x (95% interval {low:.2f}-{high:.2f}, range "
            f"{min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} pairs)")
    if goal is not None:
        line += f"; goal {'>=' if at_least else '<='} {goal:g}x: {verdict(ratios, goal, at_least)}"
    return line
