"""Times you can trust: the statistics (against scipy where it is installed), the timer that stops when
times settle and alternates its candidates, the noise flags, and rounds merged on reading.

The checks that bite: a bootstrap over samples alone misses the truth when processes differ (the
rounds are what make the interval honest), a difference of 5% is not called significant, and every
noise flag stays quiet on clean samples.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcbench.measure import timing
from gcbench.measure.noise import noise_reasons
from gcbench.measure.stats import compare_samples, estimate, mann_whitney, quartiles, spread, t_quantile
from gcbench.measure.timing import RepeatPolicy, time_adaptive, time_in_turns
from gcbench.results import Environment, Point, Record, current, merge_rounds, paired_result, time_result

CPU = torch.device("cpu")


# Statistics ------------------------------------------------------------------------------------------


@given(st.lists(st.floats(0.001, 10.0), min_size=2, max_size=40))
def test_quartiles_are_statistics_inclusive_quantiles(values: list[float]) -> None:
    q1, median, q3 = quartiles(values)
    expected = statistics.quantiles(values, n=4, method="inclusive")
    assert q1 == pytest.approx(expected[0]) and q3 == pytest.approx(expected[2])
    assert median == pytest.approx(statistics.median(values))
    assert spread(values) == pytest.approx((q3 - q1) / median)


def test_t_quantiles_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats", reason="needs the test extra: pip install 'gcbench[test]'")
    for df in (1, 2, 3, 5, 10, 29, 30, 31, 40, 60, 200):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), rel=2e-4), df


samples = st.lists(st.integers(1, 12).map(lambda x: x / 4), min_size=1, max_size=25)  # small values: many ties


@given(samples, samples)
def test_mann_whitney_is_scipy_s_asymptotic_test(a: list[float], b: list[float]) -> None:
    stats = pytest.importorskip("scipy.stats", reason="needs the test extra: pip install 'gcbench[test]'")
    ours = mann_whitney(a, b)
    if len(set(a + b)) == 1:  # every value tied: no information (scipy returns nan)
        assert ours.p == 1.0
        return
    theirs = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=True)
    assert ours.u == pytest.approx(theirs.statistic) and ours.p == pytest.approx(theirs.pvalue, abs=1e-12)


def test_a_factor_alone_or_a_test_alone_is_not_a_significant_difference() -> None:
    rng = np.random.default_rng(1)
    base = list(1.0 + 0.01 * rng.standard_normal(30))
    slower = [x * 1.5 for x in base]
    assert compare_samples(base, slower).verdict == "slower" and compare_samples(slower, base).verdict == "faster"
    # 5% slower, every time: the test is sure, but the change is under the factor.
    five = compare_samples(base, [x * 1.05 for x in base])
    assert five.p < 1e-6 and five.verdict == "same"
    # 50% slower on two samples each: over the factor, but two samples cannot make p < 0.01.
    few = compare_samples(base[:2], slower[:2])
    assert few.factor == pytest.approx(1.5, rel=0.05) and few.verdict == "same"


def test_the_estimate_is_the_median_of_round_medians_with_a_deterministic_interval() -> None:
    rounds = [[1.0, 1.1, 0.9, 1.0], [1.2, 1.3, 1.25], [1.05, 1.0, 1.1, 1.05, 1.02]]
    result = estimate(rounds)
    assert result.value == pytest.approx(statistics.median([1.0, 1.25, 1.05]))
    assert result.low <= result.value <= result.high and (result.rounds, result.samples) == (3, 12)
    assert estimate(rounds) == result  # seeded: a report renders the same twice
    one = estimate([[2.0, 2.1, 1.9, 2.0, 2.05]])
    assert one.value == 2.0 and 1.9 <= one.low <= one.high <= 2.1


def _samples_only_interval(rounds: list[np.ndarray], rng: np.random.Generator) -> tuple[float, float]:
    """What a timer that ignores rounds would say: a bootstrap of the median over all samples pooled."""
    pooled = np.concatenate(rounds)
    medians = np.median(pooled[rng.integers(len(pooled), size=(2000, len(pooled)))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def test_rounds_make_the_interval_honest_where_samples_alone_are_not() -> None:
    """Each process adds its own offset (its allocator, its pages): 3 rounds of 8 samples, 200 times.
    The interval over rounds covers the true median about 95% of the time; one over samples alone,
    which takes a process's offset for a fact, far less."""
    rng = np.random.default_rng(7)
    truth, ours, naive = 1.0, 0, 0
    trials = 200
    for _ in range(trials):
        rounds = [
            truth * math.exp(0.05 * rng.standard_normal()) * (1 + 0.01 * rng.standard_normal(8)) for _ in range(3)
        ]
        ours += estimate(rounds).covers(truth)
        low, high = _samples_only_interval(rounds, rng)
        naive += low <= truth <= high
    assert ours / trials >= 0.85, ours
    assert naive / trials <= 0.7, naive  # about 60%


# The timer -------------------------------------------------------------------------------------------


class FakeClock:
    """``perf_counter`` for the timer, advanced by the candidates: times without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def candidate(self, name: str, durations):
        durations = iter(durations)

        def call() -> None:
            self.calls.append(name)
            self.now += next(durations)

        return call


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_candidates_take_turns_each_turn_starting_with_the_next(clock: FakeClock) -> None:
    fns = {name: clock.candidate(name, [0.01] * 100) for name in "ABC"}
    turns = time_in_turns(fns, CPU, RepeatPolicy.fixed(4))
    assert "".join(clock.calls) == "ABC" + "BCA" + "CAB" + "ABC"
    assert turns.turns == 4 and turns.samples_s["A"] == pytest.approx((0.01,) * 4)


def test_steady_times_stop_at_the_minimum_and_noisy_ones_at_the_maximum(clock: FakeClock) -> None:
    policy = RepeatPolicy(min_repeats=5, max_repeats=12, max_time_s=math.inf, target_spread=0.05)
    assert len(time_adaptive(clock.candidate("steady", [0.1] * 100), CPU, policy).samples_s) == 5
    noisy = clock.candidate("noisy", [0.1, 0.2, 0.05, 0.3] * 25)
    assert len(time_adaptive(noisy, CPU, policy).samples_s) == 12


def test_timing_stops_at_the_time_cap_once_the_minimum_is_done(clock: FakeClock) -> None:
    policy = RepeatPolicy(min_repeats=3, max_repeats=100, max_time_s=1.0, target_spread=0.0)
    assert len(time_adaptive(clock.candidate("slow", [0.9, 0.1, 0.2] * 50), CPU, policy).samples_s) == 3
    assert len(time_adaptive(clock.candidate("fast", [0.1, 0.3] * 50), CPU, policy).samples_s) == 6  # 1.2 s


def test_a_paired_ratio_settles_while_the_machine_drifts(clock: FakeClock) -> None:
    """Every turn the machine is 10% slower: each candidate's own spread stays wide, their ratio is 1.3."""
    drift = [1.1**i for i in range(50)]
    fns = {
        "full": clock.candidate("full", [0.1 * d for d in drift]),
        "cache": clock.candidate("cache", [0.13 * d for d in drift]),
    }
    policy = RepeatPolicy(min_repeats=5, max_repeats=50, max_time_s=math.inf, target_spread=0.05)
    turns = time_in_turns(fns, CPU, policy)
    assert turns.turns == 5 and spread(turns.samples_s["full"]) > 0.05
    assert turns.ratios("cache", "full") == pytest.approx((1.3,) * 5)
    ratio = turns.estimate("cache", "full")
    assert ratio.value == pytest.approx(1.3) and ratio.low == pytest.approx(1.3) and ratio.high == pytest.approx(1.3)
    full = turns.estimate("full")  # its own time: as wide as the drift
    assert full.value == pytest.approx(0.1 * 1.1**2) and full.high / full.low > 1.2


def test_ranks_stop_only_when_all_agree(clock: FakeClock) -> None:
    asked: list[bool] = []

    def agree(stop: bool) -> bool:
        asked.append(stop)
        return len(asked) >= 7  # another rank wanted more turns

    timed = time_adaptive(clock.candidate("x", [0.1] * 50), CPU, RepeatPolicy(2, 20, math.inf, 0.05), agree=agree)
    assert len(timed.samples_s) == 7 and asked[:2] == [False, True]


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="min_repeats <= max_repeats"):
        RepeatPolicy(min_repeats=5, max_repeats=3)


# Noise -----------------------------------------------------------------------------------------------

CLEAN = [[0.100, 0.101, 0.099, 0.100, 0.102], [0.101, 0.100, 0.102, 0.099, 0.100]]


def test_clean_rounds_are_not_noisy() -> None:
    assert noise_reasons(CLEAN, load_average=2.2, cores=2) == ()


def test_each_kind_of_noise_is_named() -> None:
    wide = [[0.10, 0.14, 0.08, 0.12, 0.09], CLEAN[1]]
    assert noise_reasons(wide) == ("spread 30% in round 1",)
    apart = [CLEAN[0], [x * 1.2 for x in CLEAN[1]]]
    assert noise_reasons(apart) == ("rounds disagree by 20%",)
    slow = [[0.2, *CLEAN[0]], CLEAN[1]]
    assert noise_reasons(slow) == ("slow start in round 1 (2.0× the median)",)
    assert noise_reasons(CLEAN, load_average=3.5, cores=2) == ("busy machine (load 3.5 on 2 cores)",)


def test_rounds_that_differ_within_their_spread_do_not_disagree() -> None:
    overlapping = [[0.10, 0.11, 0.09, 0.105, 0.095], [0.108, 0.115, 0.1, 0.112, 0.104]]
    assert not any("disagree" in reason for reason in noise_reasons(overlapping))
    close = [CLEAN[0], [x * 1.04 for x in CLEAN[1]]]  # apart, but by less than 5%
    assert noise_reasons(close) == ()


# Rounds merged on reading ----------------------------------------------------------------------------


def timing_record(point: Point, round: int, samples: list[float], ratios: list[float] | None, **fields) -> Record:
    env = Environment(load_average_1m=1.0 + round, cpu_cores=2)
    return Record(
        "x",
        "f",
        point,
        fields.pop("status", "ok"),
        time=time_result([samples], point.batch_size, env.load_average_1m, env.cpu_cores),
        paired=paired_result("full", [ratios], [0.1]) if ratios else None,
        env=env,
        round=round,
        **fields,
    )


CACHE = Point("cache", 64, (8,))


def test_rounds_merge_into_the_first_round_s_record() -> None:
    rounds = [[0.10, 0.11, 0.12], [0.13, 0.12, 0.14, 0.13], [0.11, 0.12, 0.11]]
    ratios = [[1.3, 1.31, 1.29], [1.32, 1.3, 1.31, 1.33], [1.3, 1.3, 1.31]]
    first = timing_record(CACHE, 1, rounds[0], ratios[0], reason=None)
    later = [timing_record(CACHE, i + 1, rounds[i], ratios[i]) for i in (1, 2)]
    failed = replace(later[0], status="error", time=None, paired=None, round=4)
    (merged,) = merge_rounds([first, later[0], failed, later[1]])
    assert merged.time.rounds == [tuple(r) for r in rounds] and merged.time.samples_per_round == (3, 4, 3)
    assert merged.time.median_s == pytest.approx(statistics.median([0.11, 0.13, 0.11]))
    assert merged.time.load_average_1m == 4.0  # the highest of the rounds
    assert merged.paired.rounds == [tuple(r) for r in ratios] and merged.paired.ratio == pytest.approx(1.3)
    assert merged.paired.low <= merged.paired.ratio <= merged.paired.high
    assert merged.time.examples_per_s == pytest.approx(64 / merged.time.median_s)
    assert Record.from_dict(json.loads(merged.to_json())) == merged


def test_concatenated_sweeps_keep_their_rounds_apart_and_orphans_are_dropped() -> None:
    a1, a2 = timing_record(CACHE, 1, [0.1] * 3, None), timing_record(CACHE, 2, [0.2] * 3, None)
    b1, b2 = timing_record(CACHE, 1, [0.3] * 3, None), timing_record(CACHE, 2, [0.4] * 3, None)
    orphan = timing_record(Point("full", 64), 2, [0.5] * 3, None)
    merged = merge_rounds([orphan, a1, a2, b1, b2])
    assert [r.time.rounds for r in merged] == [[(0.1,) * 3, (0.2,) * 3], [(0.3,) * 3, (0.4,) * 3]]


def test_a_retried_round_replaces_its_failure() -> None:
    first = timing_record(CACHE, 1, [0.1] * 3, None)
    timeout = replace(timing_record(CACHE, 2, [0.1] * 3, None), status="timeout", time=None)
    retried = timing_record(CACHE, 2, [0.2] * 3, None)
    (merged,) = current([first, timeout, retried])
    assert merged.time.samples_per_round == (3, 3)
