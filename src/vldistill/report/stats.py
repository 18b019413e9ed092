"""Statistics over training seeds: the mean of one recipe's per-seed scores with its sample std and Student-t
confidence interval, and the Welch interval of the difference of two recipes' means (their seeds trained
independently). One seed gives a mean and nothing else: no std, no interval, never a fake zero width."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy.stats import t as student_t

CONFIDENCE = 0.95

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
"""Verdicts of a difference: its interval lies above 0, below 0, or contains 0 (or there is no interval)."""


def t_quantile(confidence: float, df: float) -> float:
    """Two-sided critical value of Student's t: the ``(1 + confidence) / 2`` quantile with ``df`` degrees of freedom."""
    return float(student_t.ppf((1 + confidence) / 2, df))


@dataclass(frozen=True)
class Summary:
    """One model's score on one split, one value per seed (%): mean, sample std and the t interval of the mean."""

    values: tuple[float, ...]
    confidence: float = CONFIDENCE

    def __post_init__(self):
        if not self.values:
            raise ValueError("a summary needs at least one value")

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1 in the denominator); None for one value."""
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def half_width(self) -> float | None:
        """``t(df = n - 1) · std / √n``; None for one value."""
        if self.n < 2:
            return None
        return t_quantile(self.confidence, self.n - 1) * self.std / math.sqrt(self.n)

    @property
    def interval(self) -> tuple[float, float] | None:
        half = self.half_width
        return None if half is None else (self.mean - half, self.mean + half)


def summarize(values, confidence: float = CONFIDENCE) -> Summary:
    return Summary(tuple(float(v) for v in values), confidence)


@dataclass(frozen=True)
class Difference:
    """``a.mean - b.mean`` with Welch's interval: standard error √(s_a²/n_a + s_b²/n_b), degrees of freedom by
    Welch–Satterthwaite. No interval unless both sides have at least two seeds."""

    a: Summary
    b: Summary
    confidence: float = CONFIDENCE

    @property
    def value(self) -> float:
        return self.a.mean - self.b.mean

    @property
    def stderr(self) -> float | None:
        if self.a.n < 2 or self.b.n < 2:
            return None
        return math.sqrt(self.a.std ** 2 / self.a.n + self.b.std ** 2 / self.b.n)

    @property
    def df(self) -> float | None:
        """Welch–Satterthwaite degrees of freedom (``n_a + n_b - 2`` when both sides have zero spread, where the
        interval has zero width whatever its degrees of freedom)."""
        se = self.stderr
        if se is None:
            return None
        va, vb = self.a.std ** 2 / self.a.n, self.b.std ** 2 / self.b.n
        if va + vb == 0:
            return float(self.a.n + self.b.n - 2)
        return (va + vb) ** 2 / (va ** 2 / (self.a.n - 1) + vb ** 2 / (self.b.n - 1))

    @property
    def interval(self) -> tuple[float, float] | None:
        se = self.stderr
        if se is None:
            return None
        half = t_quantile(self.confidence, self.df) * se
        return self.value - half, self.value + half


def welch(a: Summary, b: Summary, confidence: float = CONFIDENCE) -> Difference:
    return Difference(a, b, confidence)


def verdict(interval: tuple[float, float] | None) -> str:
    """:data:`HOLDS` if the interval of ``better - worse`` lies above 0, :data:`FAILS` below 0, else (it contains 0,
    or there is none) :data:`INCONCLUSIVE`."""
    if interval is None:
        return INCONCLUSIVE
    low, high = interval
    if low > 0:
        return HOLDS
    if high < 0:
        return FAILS
    return INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    """A claim made of several comparisons: holds only if every one holds, does not hold if any does not, else
    inconclusive (an empty list or a missing comparison cannot make a claim hold)."""
    if FAILS in verdicts:
        return FAILS
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE


def format_summary(summary: Summary, decimals: int) -> str:
    """``mean ± std [low, high]`` (95% interval of the mean); one seed: ``mean (1 seed: no interval)``."""
    if summary.interval is None:
        return f"{summary.mean:.{decimals}f} (1 seed: no interval)"
    low, high = summary.interval
    return f"{summary.mean:.{decimals}f} ± {summary.std:.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"


def format_interval(interval: tuple[float, float] | None, decimals: int, signed: bool = False) -> str:
    if interval is None:
        return "none (a side has 1 seed)"
    sign = "+" if signed else ""
    return f"[{interval[0]:{sign}.{decimals}f}, {interval[1]:{sign}.{decimals}f}]"
