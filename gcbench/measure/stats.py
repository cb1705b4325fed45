"""The statistics of timing, on numpy alone: quartiles, intervals over rounds, and a rank test.

Times (and ratios of times) come in rounds: each round is one process, whose samples share that
process's state (allocator, page faults, what else ran then). The rounds, not the samples, are the
independent units, so every estimate weights the rounds equally: the median of the rounds' medians.
Its 95% interval is the wider of two:

- a bootstrap over rounds and, within each drawn round, over its samples (criterion.rs resamples
  samples; resampling rounds too carries the process-to-process scatter into the interval);
- with two rounds or more, a Student t interval over the rounds' log medians: with few rounds a
  bootstrap cannot reach past the rounds it has seen, and the t interval says how little three
  values tell.

Two runs of one point are compared as asv does: a factor and a Mann-Whitney U test (normal
approximation with tie and continuity corrections; scipy is not needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0  # the bootstrap is seeded: the same samples always give the same interval (reports re-render identically)

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median, third quartile (interpolated as ``statistics.quantiles(method="inclusive")``)."""
    q1, median, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q1), float(median), float(q3)


def spread(values: Sequence[float]) -> float:
    """Interquartile range over the median: what torch.utils.benchmark's adaptive_autorange stops on."""
    if len(values) < 2:
        return math.inf
    q1, median, q3 = quartiles(values)
    return (q3 - q1) / median if median > 0 else math.inf


def t_quantile(df: int) -> float:
    """Student's t at 97.5% (a two-sided 95% interval) for ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975  # Cornish-Fisher expansion: within 1e-4 of the exact value past 30 degrees of freedom
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Estimate:
    """A positive quantity (a step time, a ratio of step times) measured in rounds, with its 95% interval."""

    value: float
    low: float
    high: float
    rounds: int
    samples: int

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def round_medians(rounds: Sequence[Sequence[float]]) -> list[float]:
    return [float(np.median(r)) for r in rounds if len(r)]


def estimate(rounds: Sequence[Sequence[float]], *, resamples: int = RESAMPLES, seed: int = SEED) -> Estimate:
    """The median of the rounds' medians, with the wider of the bootstrap and the t interval (see the module)."""
    groups = [np.asarray(r, dtype=float) for r in rounds if len(r)]
    if not groups:
        raise ValueError("estimate: no samples")
    medians = np.array([np.median(g) for g in groups])
    value = float(np.median(medians))
    rng = np.random.default_rng(seed)
    # Each round's median under resampling of its samples: (rounds, resamples).
    resampled = np.stack([np.median(g[rng.integers(len(g), size=(resamples, len(g)))], axis=1) for g in groups])
    chosen = rng.integers(len(groups), size=(resamples, len(groups)))
    statistic = np.median(resampled[chosen, np.arange(resamples)[:, None]], axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = (float(x) for x in np.percentile(statistic, [tail, 100 - tail]))
    if len(groups) >= 2 and np.all(medians > 0):
        logs = np.log(medians)
        half = t_quantile(len(groups) - 1) * float(np.std(logs, ddof=1)) / math.sqrt(len(groups))
        centre = float(np.mean(logs))
        low, high = min(low, math.exp(centre - half)), max(high, math.exp(centre + half))
    return Estimate(value, min(low, value), max(high, value), len(groups), sum(len(g) for g in groups))


@dataclass(frozen=True)
class RankTest:
    """Mann-Whitney U of ``a`` against ``b``: ``p`` two-sided."""

    u: float
    p: float


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> RankTest:
    """Two-sided Mann-Whitney U test, normal approximation with tie and continuity corrections
    (what ``scipy.stats.mannwhitneyu(a, b, method="asymptotic")`` computes)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney: both samples need values")
    both = np.concatenate([x, y])
    ranks = _average_ranks(both)
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2
    u = max(u1, n1 * n2 - u1)
    n = n1 + n2
    _, counts = np.unique(both, return_counts=True)
    ties = float((counts**3 - counts).sum())
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return RankTest(u1, 1.0)
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return RankTest(u1, min(1.0, 2 * _normal_sf(z)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    ranks[order] = np.arange(1, len(values) + 1)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2
            start = end
    return ranks


FACTOR = 1.1  # asv compare's default: a change smaller than this is not reported
ALPHA = 0.01  # asv uses 0.002 with many samples; a few rounds of a few repeats need a coarser level


@dataclass(frozen=True)
class Comparison:
    """``b`` against ``a``: the factor of their medians and whether the difference is significant."""

    factor: float  # b's median over a's: above 1, b is slower
    p: float
    significant: bool

    @property
    def verdict(self) -> str:
        if not self.significant:
            return "same"
        return "slower" if self.factor > 1 else "faster"


def compare_samples(
    a: Sequence[float],
    b: Sequence[float],
    *,
    medians: tuple[float, float] | None = None,
    factor: float = FACTOR,
    alpha: float = ALPHA,
) -> Comparison:
    """asv's rule: significant when the medians differ by more than ``factor`` and the rank test on the
    samples says p < ``alpha``. ``medians``: the two estimates to compare (default: the samples' medians)."""
    median_a, median_b = medians if medians is not None else (float(np.median(a)), float(np.median(b)))
    ratio = median_b / median_a
    p = mann_whitney(a, b).p
    big = ratio > factor or ratio < 1 / factor
    return Comparison(ratio, p, big and p < alpha)
