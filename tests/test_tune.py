"""Tests for boothkit.tune: golden-section search agrees with scipy and makes one evaluation per iteration."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import minimize_scalar

from boothkit.tune import SearchResult, golden_section_search
from boothkit.tune.golden import GOLDEN_RATIO

UNIMODAL = {
    "quadratic at 2.3": (lambda x: -(x - 2.3) ** 2, -10.0, 10.0),
    "-|x - pi|": (lambda x: -abs(x - math.pi), -10.0, 10.0),
    "shifted gaussian bump": (lambda x: 3.0 * math.exp(-((x + 4.2) ** 2) / (2 * 0.7**2)), -10.0, 10.0),
    "asymmetric peak": (lambda x: x * math.exp(-x), 0.0, 8.0),
    "peak at upper boundary": (lambda x: math.log1p(x), 0.0, 7.5),
    "peak at lower boundary": (lambda x: -x * x, 0.0, 3.0),
    "guidance-scale-like plateau": (lambda x: math.tanh(x - 1.0) - 0.05 * x, 0.0, 15.0),
}


def _scipy_argmax(f, lo: float, hi: float) -> float:
    result = minimize_scalar(lambda x: -f(x), bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return float(result.x)


@pytest.mark.parametrize("name", sorted(UNIMODAL))
@pytest.mark.parametrize("tol", [0.05, 0.01])
def test_agrees_with_scipy(name: str, tol: float) -> None:
    f, lo, hi = UNIMODAL[name]
    ours = golden_section_search(f, lo, hi, tol=tol)
    assert abs(ours.x - _scipy_argmax(f, lo, hi)) <= tol
    assert ours.value == f(ours.x)
    assert ours.bracket[0] <= ours.x <= ours.bracket[1]
    assert ours.bracket[1] - ours.bracket[0] <= tol


def test_agrees_with_scipy_golden_method() -> None:
    f, lo, hi = UNIMODAL["quadratic at 2.3"]
    scipy_x = minimize_scalar(lambda x: -f(x), bracket=(lo, 0.0, hi), method="golden", tol=1e-8).x
    assert abs(golden_section_search(f, lo, hi, tol=0.05).x - scipy_x) <= 0.05


def test_evaluation_count_on_minus_ten_ten() -> None:
    calls: list[float] = []

    def f(x: float) -> float:
        calls.append(x)
        return -(x - 2.3) ** 2

    result = golden_section_search(f, -10, 10, tol=0.05)
    assert len(calls) == result.evaluations == len(result.history) == 14  # 20 * phi**13 = 0.038 <= 0.05
    assert result.evaluations <= 16
    # The bound: after n evaluations the bracket is (hi - lo) * phi**(n - 1) wide.
    assert math.isclose(result.bracket[1] - result.bracket[0], 20 * GOLDEN_RATIO**13, rel_tol=1e-9)


@pytest.mark.parametrize("name", sorted(UNIMODAL))
def test_one_new_evaluation_per_iteration_inside_the_bracket(name: str) -> None:
    """Each evaluation after the first two lies strictly inside the bracket implied by the earlier ones,
    and each shrinks that bracket by phi: the interior point is reused, never re-evaluated."""
    f, lo, hi = UNIMODAL[name]
    result = golden_section_search(f, lo, hi, tol=1e-3)
    xs = [x for x, _ in result.history]
    assert len(set(xs)) == len(xs)  # nothing evaluated twice
    assert all(isinstance(x, float) for x in xs)
    assert all(lo < x < hi for x in xs)
    widths = []
    for n in range(2, len(result.history)):
        seen = result.history[:n]
        best = max(range(n), key=lambda i: (seen[i][1], -i))  # first maximum
        points = sorted(x for x, _ in seen)
        position = points.index(seen[best][0])
        left = points[position - 1] if position > 0 else lo
        right = points[position + 1] if position + 1 < len(points) else hi
        assert left < result.history[n][0] < right
        widths.append(right - left)
    for before, after in zip(widths, widths[1:]):
        assert math.isclose(after, before * GOLDEN_RATIO, rel_tol=1e-6)


def test_returns_the_best_evaluated_point_first_on_ties() -> None:
    result = golden_section_search(lambda x: 1.0, -1.0, 1.0, tol=0.1)
    assert (result.x, result.value) == result.history[0]
    result = golden_section_search(lambda x: -(x - 0.3) ** 2, -1.0, 1.0, tol=0.1)
    assert result.value == max(value for _, value in result.history)
    assert (result.x, result.value) in result.history


def test_max_evals_is_honoured() -> None:
    calls = []
    result = golden_section_search(lambda x: calls.append(x) or -abs(x), -10, 10, tol=1e-9, max_evals=5)
    assert len(calls) == result.evaluations == 5
    result = golden_section_search(lambda x: -abs(x), -10, 10, max_evals=2)
    assert result.evaluations == 2
    # A budget larger than needed changes nothing.
    assert golden_section_search(lambda x: -abs(x), -10, 10, max_evals=100).evaluations == 14


def test_on_evaluation_callback_sees_every_evaluation() -> None:
    seen: list[tuple[float, float]] = []
    result = golden_section_search(lambda x: -(x - 1) ** 2, 0, 4, on_evaluation=lambda x, v: seen.append((x, v)))
    assert seen == result.history


def test_nan_counts_as_worst() -> None:
    result = golden_section_search(lambda x: math.nan if x < 0 else -(x - 2.0) ** 2, -10, 10, tol=0.05)
    assert abs(result.x - 2.0) <= 0.05


def test_stops_when_floating_point_cannot_shrink_the_bracket() -> None:
    result = golden_section_search(lambda x: -(x - 1e6) ** 2, 1e6 - 1, 1e6 + 1, tol=1e-30)
    assert result.evaluations < 100
    assert abs(result.x - 1e6) < 1e-6


def test_result_is_frozen() -> None:
    result = golden_section_search(lambda x: -x * x, -1, 1)
    assert isinstance(result, SearchResult)
    with pytest.raises(AttributeError):
        result.x = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lo=1.0, hi=1.0),
        dict(lo=2.0, hi=1.0),
        dict(lo=-math.inf, hi=1.0),
        dict(lo=0.0, hi=math.nan),
        dict(lo=0.0, hi=1.0, tol=0.0),
        dict(lo=0.0, hi=1.0, tol=-0.1),
        dict(lo=0.0, hi=1.0, tol=math.nan),
        dict(lo=0.0, hi=1.0, max_evals=1),
        dict(lo=0.0, hi=1.0, max_evals=0),
        dict(lo=0.0, hi=1.0, max_evals=2.5),
    ],
)
def test_bad_arguments_raise(kwargs) -> None:
    calls = []
    with pytest.raises(ValueError):
        golden_section_search(lambda x: calls.append(x) or 0.0, **kwargs)
    assert calls == []  # nothing expensive ran
