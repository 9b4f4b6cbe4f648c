"""Golden-section search: maximize an expensive unimodal function of one variable on an interval.

Used to tune the guidance scale λ: each evaluation of the objective generates and scores a batch of
images, so the number of evaluations is what counts.

Golden-section search (Kiefer 1953, "Sequential minimax search for a maximum", Proc. AMS 4:502-506)
keeps a bracket [a, b] that contains the maximum and two interior points placed at the golden ratio
φ = (√5 − 1)/2 ≈ 0.618 of the bracket from either end. Comparing f at the two interior points discards
the part of the bracket beyond the worse one; the better one becomes an interior point of the new
bracket at exactly the golden position, so every iteration after the first two evaluations costs exactly
one new evaluation and shrinks the bracket by the factor φ. After n ≥ 2 evaluations the bracket width is
(hi − lo)·φ^(n−1): on [−10, 10] a tolerance of 0.05 takes 14 evaluations.

The search assumes f is unimodal on [lo, hi]. A noisy objective is not unimodal, but with common random
numbers — the same seeds (initial latents and sampler noise) at every λ — the objective is a
deterministic function of λ, and comparisons between two values of λ are not confused by sampling noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["GOLDEN_RATIO", "SearchResult", "golden_section_evaluations", "golden_section_search"]

GOLDEN_RATIO = (math.sqrt(5.0) - 1.0) / 2.0
"""φ = (√5 − 1)/2 ≈ 0.618: the factor by which each evaluation shrinks the bracket."""


@dataclass(frozen=True)
class SearchResult:
    """Outcome of `golden_section_search`.

    `x` is the best evaluated point (the first one on ties) and `value` is f there; `history` lists every
    evaluation `(x, f(x))` in the order made; `bracket` is the final bracket, which contains the maximum of
    a unimodal f (and `x`).
    """

    x: float
    value: float
    history: list[tuple[float, float]] = field(default_factory=list)
    bracket: tuple[float, float] = (math.nan, math.nan)

    @property
    def evaluations(self) -> int:
        """How many times f was called (= len(history))."""
        return len(self.history)


def _rank(value: float) -> float:
    """Comparison key: NaN counts as worse than any number."""
    return -math.inf if math.isnan(value) else value


def _check_arguments(lo: float, hi: float, tol: float, max_evals) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"golden_section_search needs finite bounds, got lo={lo}, hi={hi}")
    if not lo < hi:
        raise ValueError(f"golden_section_search needs lo < hi, got lo={lo}, hi={hi}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"golden_section_search needs a finite tol > 0, got {tol}")
    if max_evals is not None:
        if isinstance(max_evals, bool) or not isinstance(max_evals, int):
            raise ValueError(f"max_evals must be an integer or None, got {max_evals!r}")
        if max_evals < 2:
            raise ValueError(f"max_evals must be at least 2, got {max_evals}")


def golden_section_evaluations(lo: float, hi: float, tol: float = 0.05, max_evals: int | None = None) -> int:
    """How many evaluations `golden_section_search` makes on [lo, hi]: the smallest n ≥ 2 with
    (hi − lo)·φ^(n−1) ≤ tol, and at most `max_evals` (fewer only when floating point cannot separate the
    points any further, far below any useful tolerance). Whatever f is: the search stops by this count."""
    lo, hi, tol = float(lo), float(hi), float(tol)
    _check_arguments(lo, hi, tol, max_evals)
    count = 2
    while (hi - lo) * GOLDEN_RATIO ** (count - 1) > tol and (max_evals is None or count < max_evals):
        count += 1
    return count


def golden_section_search(
    f: Callable[[float], float],
    lo: float,
    hi: float,
    tol: float = 0.05,
    max_evals: int | None = None,
    *,
    on_evaluation: Callable[[float, float], None] | None = None,
) -> SearchResult:
    """Maximize a unimodal `f` on [`lo`, `hi`] by golden-section search (Kiefer 1953).

    The first two evaluations are at the golden points lo + (1 − φ)(hi − lo) and lo + φ(hi − lo)
    (φ = (√5 − 1)/2); each later iteration reuses the surviving interior point and makes exactly one new
    evaluation, shrinking the bracket by the factor φ ≈ 0.618. The search stops when the bracket is at most
    `tol` wide, when `max_evals` evaluations have been made, or when the bracket can no longer shrink in
    floating point: after `golden_section_evaluations(lo, hi, tol, max_evals)` evaluations (the bracket after n
    of them is (hi − lo)·φ^(n−1) wide). On [−10, 10] with tol 0.05 that is 14 evaluations.

    With common random numbers (the same seeds at every λ) a sampled objective such as an image-quality
    score is a deterministic function of λ, which is what the comparisons need.

    Args:
        f: the objective, called with Python floats; may be expensive (each call is made once per point).
            A NaN result counts as worse than any number.
        lo, hi: the interval, lo < hi (both finite).
        tol: stop once the bracket is at most this wide (> 0). For a unimodal f the returned `x` is then
            within `tol` of the maximizer.
        max_evals: the most evaluations to make (≥ 2); None for no limit other than `tol`.
        on_evaluation: called as `on_evaluation(x, f(x))` after each evaluation (e.g. a progress bar).

    Returns:
        A `SearchResult` whose `x` is the best evaluated point (the first one on ties).

    Raises:
        ValueError: lo ≥ hi, a non-finite bound, tol ≤ 0, or max_evals < 2.
    """
    lo, hi, tol = float(lo), float(hi), float(tol)
    planned = golden_section_evaluations(lo, hi, tol, max_evals)  # checks the arguments
    history: list[tuple[float, float]] = []

    def evaluate(x: float) -> float:
        value = float(f(float(x)))
        history.append((float(x), value))
        if on_evaluation is not None:
            on_evaluation(float(x), value)
        return value

    a, b = lo, hi
    c, d = b - GOLDEN_RATIO * (b - a), a + GOLDEN_RATIO * (b - a)
    fc, fd = evaluate(c), evaluate(d)
    while True:
        # Keep the part of the bracket around the better interior point (ties: keep the left part).
        if _rank(fc) >= _rank(fd):
            b, d, fd = d, c, fc
            new_x = b - GOLDEN_RATIO * (b - a)
            replace_left = True
        else:
            a, c, fc = c, d, fd
            new_x = a + GOLDEN_RATIO * (b - a)
            replace_left = False
        if len(history) >= planned:  # the bracket is now (hi − lo)·φ^(n−1) ≤ tol wide, or the budget is spent
            break
        if replace_left:
            if not a < new_x < d:  # floating point cannot separate the points any further
                break
            c, fc = new_x, evaluate(new_x)
        else:
            if not c < new_x < b:
                break
            d, fd = new_x, evaluate(new_x)

    best_x, best_value = history[0]
    for x, value in history[1:]:
        if _rank(value) > _rank(best_value):
            best_x, best_value = x, value
    return SearchResult(x=best_x, value=best_value, history=history, bracket=(a, b))
