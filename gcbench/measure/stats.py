"""The statistics of timing: quartiles, intervals over rounds, and a rank test (numpy and scipy.stats).

Times (and ratios of times) come in rounds: each round is one process, whose samples share that
process's state (allocator, page faults, what else ran then). The rounds, not the samples, are the
independent units, so every estimate weights the rounds equally: the median of the rounds' medians.
Its 95% interval is the wider of two:

- a bootstrap over rounds and, within each drawn round, over its samples (criterion.rs resamples
  samples; resampling rounds too carries the process-to-process scatter into the interval);
- with two rounds or more, a Student t interval over the rounds' log medians: with few rounds a
  bootstrap cannot reach past the rounds it has seen, and the t interval says how little three
  values tell.

Two runs of one point are compared as asv does: a factor and a Mann-Whitney U test (scipy's normal
approximation with tie and continuity corrections). scipy.stats is imported when a quantile or a test
is first asked for, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0  # the bootstrap is seeded: the same samples always give the same interval (reports re-render identically)


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
    from scipy import stats

    return float(stats.t.ppf(1 - (1 - CONFIDENCE) / 2, df))


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


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> RankTest:
    """Two-sided Mann-Whitney U test, normal approximation with tie and continuity corrections
    (``scipy.stats.mannwhitneyu(a, b, method="asymptotic")``); samples that are all one value: p = 1."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("mann_whitney: both samples need values")
    from scipy import stats

    result = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=True)
    p = float(result.pvalue)
    return RankTest(float(result.statistic), 1.0 if math.isnan(p) else min(1.0, p))


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
