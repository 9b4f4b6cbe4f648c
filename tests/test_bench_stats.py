"""bench/child_runs.py's uncertainty (issue 16): the median ratio's bootstrap interval and the verdict it
allows — one only when the interval excludes the goal's other side."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from child_runs import bootstrap_interval, ratio_line, verdict  # noqa: E402


def test_identical_ratios_have_a_point_interval():
    assert bootstrap_interval([1.3] * 7) == (1.3, 1.3)


def test_the_interval_agrees_with_scipys_percentile_bootstrap_of_the_median():
    from scipy.stats import bootstrap

    values = list(np.random.default_rng(3).normal(1.8, 0.3, size=25))
    ours = bootstrap_interval(values, resamples=20000)
    theirs = bootstrap((np.asarray(values),), np.median, n_resamples=20000, method="percentile",
                       random_state=np.random.default_rng(1), confidence_level=0.95).confidence_interval
    assert ours[0] == pytest.approx(theirs.low, abs=0.03) and ours[1] == pytest.approx(theirs.high, abs=0.03)
    assert ours[0] <= float(np.median(values)) <= ours[1]


@pytest.mark.parametrize("ratios,goal,at_least,expected", [
    ([2.3, 2.4, 2.2, 2.5, 2.35, 2.45, 2.3], 2.0, True, "holds"),
    ([1.5, 1.6, 1.55, 1.62, 1.58, 1.57, 1.6], 2.0, True, "fails"),
    ([1.6, 2.5, 1.9, 2.2, 1.7, 2.4, 2.0], 2.0, True, "undecided, run longer"),
    ([0.98, 1.01, 0.99, 1.0, 1.02, 0.97, 1.0], 1.05, False, "holds"),
    ([1.2, 1.25, 1.22, 1.18, 1.21, 1.3, 1.24], 1.05, False, "fails"),
    ([0.8, 1.3, 1.0, 1.2, 0.9, 1.25, 1.05], 1.05, False, "undecided, run longer"),
])
def test_a_verdict_only_when_the_interval_excludes_the_other_side(ratios, goal, at_least, expected):
    assert verdict(ratios, goal, at_least) == expected


def test_the_line_prints_the_median_its_interval_and_the_verdict():
    line = ratio_line("speed ratio", [2.3, 2.4, 2.2, 2.5, 2.35, 2.4], goal=2.0)
    assert line.startswith("speed ratio: 2.38x (95% interval ") and line.endswith("goal >= 2x: holds")


def test_too_few_pairs_give_no_verdict_however_clear_they_look():
    """Five pairs all above the goal happen by chance 6 % of the time (sign test): no verdict below six."""
    assert verdict([2.3, 2.4, 2.2, 2.5, 2.35], 2.0, True) == "undecided, run longer"
    assert verdict([2.3, 2.4, 2.2, 2.5, 2.35, 2.4], 2.0, True) == "holds"
    assert verdict([1.2, 1.25, 1.22, 1.18, 1.21], 1.05, False) == "undecided, run longer"
